"""benchmarks/time_to_accuracy.py on a tiny toy run: its JSON lines agree with the files the experiment wrote."""
from __future__ import annotations

import json

import pytest
import yaml

from benchmarks import time_to_accuracy
from conftest import command_line, tiny_overrides
from utils.experiment_paths import ExperimentPaths
from utils.summarize_results import read_epoch_rows


def test_thresholds_are_crossed_at_the_first_epoch_that_reaches_them():
    epochs = [{"epoch": e, "iterations": 10 * (e + 1), "wall_s": 2.0 * (e + 1), "val_accuracy": accuracy}
              for e, accuracy in enumerate([0.5, 0.8, 0.7])]
    crossings = time_to_accuracy.threshold_crossings(epochs, [0.0, 0.7, 0.8, 0.9])
    assert [(c["threshold"], c["reached"], c["epoch"], c["iterations"], c["wall_s"]) for c in crossings] == [
        (0.0, True, 0, 10, 2.0), (0.7, True, 1, 20, 4.0), (0.8, True, 1, 20, 4.0), (0.9, False, None, None, None)]


def test_a_tiny_run_prints_epochs_thresholds_and_the_test(toy_datasets, tmp_path, capsys):
    experiments = tmp_path / "experiments"
    settings = tiny_overrides(toy_datasets, experiments)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump({**settings, "total_epochs": 5}))
    out = tmp_path / "runs.jsonl"
    out.write_text('{"earlier": "run"}\n')
    thresholds = [0.0, 0.3, 0.6, 1.0]
    code = time_to_accuracy.main([str(config_file), "--total_epochs", "2", "--thresholds", *map(str, thresholds),
                                  "--experiment_name", "timed", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "epoch 1:" in printed.err  # the training's own messages stay off stdout
    lines = [json.loads(line) for line in printed.out.splitlines()]  # every stdout line is JSON

    folder = experiments / "timed"
    rows = read_epoch_rows(folder)
    assert len(rows) == 2  # the command line overrode the file's total_epochs
    epochs = [line for line in lines if line["event"] == "epoch"]
    assert [(e["epoch"], e["iterations"]) for e in epochs] == [(0, 3), (1, 6)]
    assert epochs[0]["wall_s"] == rows[0]["epoch_time_s"]
    assert epochs[1]["wall_s"] == pytest.approx(rows[0]["epoch_time_s"] + rows[1]["epoch_time_s"])
    for epoch, row in zip(epochs, rows):
        assert (epoch["val_accuracy"], epoch["train_accuracy"], epoch["train_loss"]) == (
            row["val_accuracy_mean"], row["train_accuracy_mean"], row["train_loss_mean"])

    crossings = {line["threshold"]: line for line in lines if line["event"] == "threshold"}
    assert sorted(crossings) == thresholds
    assert crossings[0.0]["reached"] and crossings[0.0]["epoch"] == 0 and crossings[0.0]["wall_s"] == epochs[0]["wall_s"]
    for threshold, crossing in crossings.items():
        first = next((e for e in epochs if e["val_accuracy"] >= threshold), None)
        assert crossing["reached"] == (first is not None)
        assert crossing["epoch"] == (first["epoch"] if first else None)
        # A crossing is printed right after the epoch that reached it; the unreached ones before the test.
        position = lines.index(crossing)
        assert lines[position - 1]["event"] in ("epoch", "threshold")
        if crossing["reached"]:
            assert [line for line in lines[:position] if line["event"] == "epoch"][-1]["epoch"] == crossing["epoch"]
        else:
            assert all(line["event"] != "epoch" for line in lines[position:])

    test = lines[-1]
    summary = json.loads(ExperimentPaths(folder).test_summary().read_text())
    assert test["event"] == "test" and [line["event"] for line in lines].count("test") == 1
    for key in ("ensemble_test_accuracy", "ensemble_test_confidence_95", "best_single_model_test_accuracy",
                "best_single_model_test_confidence_95", "best_single_model_epoch", "num_test_tasks"):
        assert test[key] == summary[key]
    assert (test["epochs"], test["iterations"], test["models"]) == (2, 6, 2)
    assert test["train_val_wall_s"] == epochs[-1]["wall_s"]
    assert test["total_wall_s"] > test["train_val_wall_s"] > 0  # the total adds the test, checkpoints, loading
    assert 0 < test["test_wall_s"] < test["total_wall_s"] - test["train_val_wall_s"]
    assert test["overrides"][:2] == ["--total_epochs", "2"]
    assert out.read_text().splitlines() == ['{"earlier": "run"}'] + printed.out.splitlines()  # appended


def test_refusals_speak_before_anything_trains(toy_datasets, tmp_path, capsys):
    experiments = tmp_path / "experiments"
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_overrides(toy_datasets, experiments)))
    ExperimentPaths(experiments / "tiny").logs.mkdir(parents=True)
    assert time_to_accuracy.main([str(config_file)]) == 2
    assert "already holds an experiment" in capsys.readouterr().err

    fresh = ["--experiment_name", "fresh"]
    assert time_to_accuracy.main([str(config_file), "--thresholds", "97", *fresh]) == 2
    assert "write 0.97 for 97%" in capsys.readouterr().err
    assert time_to_accuracy.main([str(config_file), *fresh, *command_line({"total_epochs_before_pause": 1})]) == 2
    assert "total_epochs_before_pause" in capsys.readouterr().err
    assert time_to_accuracy.main([str(config_file), *fresh, "--batch_sise", "2"]) == 2
    assert "did you mean 'batch_size'" in capsys.readouterr().err
    assert not (experiments / "fresh").exists()
