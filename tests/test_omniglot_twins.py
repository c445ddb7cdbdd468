"""benchmarks/omniglot_twins.py: the shipped Omniglot configs at one budget, CxGrad against its MAML twin."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import omniglot_twins
from conftest import command_line, tiny_overrides


def result(setting, method, accuracies):
    return {"setting": setting, "method": method, "iterations": 1000, "val_accuracy": accuracies,
            "epoch_time_s": [10.0] * len(accuracies)}


def test_the_verdict_compares_cxgrad_with_maml_at_the_budget_not_before():
    results = [result("5way_1shot", "CxGrad", [0.5, 0.95]), result("5way_1shot", "maml", [0.8, 0.9]),
               result("20way_1shot", "CxGrad", [0.9, 0.7]), result("20way_1shot", "maml", [0.1, 0.8])]
    lines, behind = omniglot_twins.table(results)
    assert behind
    assert "| 5way_1shot | CxGrad | 50.0% / 95.0% | 10 | - | +5.0 points |" in lines
    assert "| 20way_1shot | CxGrad | 90.0% / 70.0% | 10 | - | -10.0 points (BEHIND) |" in lines
    assert not omniglot_twins.table(results[:2])[1]
    # A twin that did not reach the budget gives no verdict.
    unfinished = [results[0], dict(results[1], iterations=None)]
    assert omniglot_twins.table(unfinished)[0][2].endswith("| - |  |")


def test_the_budget_must_be_whole_epochs(tmp_path):
    with pytest.raises(SystemExit, match="--iterations 750 is not a whole number of .*500 meta-iterations each"):
        omniglot_twins.main(["--settings", "5way_1shot", "--iterations", "750", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # refused before anything is made


def test_twins_train_to_the_budget_test_and_resume(toy_datasets, tmp_path, capsys):
    settings = tiny_overrides(toy_datasets, tmp_path)
    del settings["experiment_name"], settings["experiments_dir"]  # the benchmark names its runs
    settings["dataset_path"] = "toy"  # the shipped configs name their folder (omniglot)
    overrides = command_line(settings)
    out = tmp_path / "twins"
    common = ["--settings", "5way_1shot", "--methods", "CxGrad", "maml", "--out", str(out), "--"] + overrides
    handlers = [signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)]
    code = omniglot_twins.main(["--iterations", "6", *common])  # two epochs of 3 meta-iterations
    assert [signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)] == handlers  # put back
    printed = capsys.readouterr().out.splitlines()
    lines = [json.loads(line) for line in printed if line.startswith("{")]
    assert code in (0, 1), (out / "omniglot_5way_1shot_CxGrad.log").read_text()
    assert [(line["method"], line["epochs"], line["iterations"]) for line in lines] == [("CxGrad", 2, 6), ("maml", 2, 6)]
    assert lines[0]["config"] == "experiment_config/omniglot_5way_1shot/CxGrad_4conv.yaml"
    for line in lines:
        summary = json.loads((out / f"omniglot_5way_1shot_{line['method']}" / "test_summary.json").read_text())
        assert line["ensemble_test_accuracy"] == round(summary["ensemble_test_accuracy"], 4)
        assert [model["epoch"] for model in summary["models"]] and len(summary["models"]) == 2  # max_models_to_save
    verdict = next(row for row in printed if row.startswith("| 5way_1shot | CxGrad"))
    gap = 100 * (lines[0]["val_accuracy"][-1] - lines[1]["val_accuracy"][-1])
    assert f"{gap:+.1f} points" in verdict and (code == 1) == (gap < 0)

    # A larger budget trains only the missing epoch, and the test is redone for the longer run.
    code = omniglot_twins.main(["--iterations", "9", *common])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert code in (0, 1)
    assert [(line["epochs"], line["iterations"]) for line in lines] == [(3, 9), (3, 9)]
    log = (out / "omniglot_5way_1shot_maml.log").read_text()
    assert log.count("Training from epoch 0") == 1 and log.count("Training from epoch 2") == 1
    assert log.count("Ensemble of") == 2

    # A smaller budget than the folders hold is refused: their tests chose among all 3 epochs.
    with pytest.raises(SystemExit, match=r"omniglot_5way_1shot_CxGrad holds 3 trained epochs, more than the 2 of "
                                         r"--iterations 6.*give another --out, or --iterations 9"):
        omniglot_twins.main(["--iterations", "6", *common])


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_sigterm_stops_every_run_resumably(toy_datasets, tmp_path):
    """Under `timeout` (SIGTERM), the trainings stop at a checkpoint with the benchmark; a rerun continues.
    Started the way a shell starts `command &` (SIGINT ignored), it stays deaf to SIGINT."""
    settings = tiny_overrides(toy_datasets, tmp_path, total_iter_per_epoch=400, num_evaluation_tasks=4)
    del settings["experiment_name"], settings["experiments_dir"]
    settings["dataset_path"] = "toy"
    out = tmp_path / "twins"
    command = [sys.executable, str(Path(omniglot_twins.__file__)), "--settings", "5way_1shot", "--methods", "CxGrad",
               "maml", "--iterations", "400", "--no-test", "--out", str(out), "--",
               *command_line(settings)]
    logs = [out / f"omniglot_5way_1shot_{method}.log" for method in ("CxGrad", "maml")]
    benchmark = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=ignore_sigint)
    deadline = time.monotonic() + 120
    while not all(log.is_file() and "Training from epoch 0" in log.read_text() for log in logs):
        assert benchmark.poll() is None and time.monotonic() < deadline, benchmark.communicate()
        time.sleep(0.2)
    benchmark.send_signal(signal.SIGINT)  # ignored: a stopped training would log it within a meta-iteration
    time.sleep(1.0)
    assert benchmark.poll() is None and not any("stopped by" in log.read_text() for log in logs)
    benchmark.send_signal(signal.SIGTERM)
    _, errors = benchmark.communicate(timeout=120)
    assert benchmark.returncode == 75, errors
    assert "rerun the same command to continue" in errors
    for log in logs:  # each training saved where it was and exited; none is left running
        assert "stopped by SIGTERM" in log.read_text(), log.read_text()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode in (0, 1), rerun.stderr
    for log in logs:
        assert "Training from epoch 0, iteration 0" in log.read_text()
        resumed = log.read_text().split("stopped by SIGTERM")[1]
        assert "Training from epoch 0, iteration " in resumed and "iteration 0;" not in resumed
    lines = [json.loads(line) for line in rerun.stdout.splitlines() if line.startswith("{")]
    assert [(line["epochs"], line["iterations"]) for line in lines] == [(1, 400), (1, 400)]
