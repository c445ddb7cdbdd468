"""The experiment loop on a tiny dataset: checkpoints, exact resume, the ensemble test, test-only mode."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import experiment_builder
from data import FewShotDataProvider, load_split
from experiment_builder import ExperimentBuilder, mean_and_confidence, progress_line
from utils import summarize_results
from utils.checkpoints import CheckpointError, read_checkpoint
from utils.experiment_paths import ExperimentPaths

REPO = Path(__file__).resolve().parents[1]


def run(config):
    builder = ExperimentBuilder(config)
    summary = builder.run_experiment()
    return builder, summary


def weights_of(builder) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in builder.model.state_dict().items()}


@pytest.mark.parametrize("method", ["cxgrad", "maml++"])
def test_resume_is_exact(tiny_config, method):
    extra = (dict(contextual_grad=True) if method == "cxgrad" else
             dict(use_multi_step_loss_optimization=True, multi_step_loss_num_epochs=2, per_step_bn_statistics=True,
                  learnable_per_layer_per_step_inner_loop_learning_rate=True, first_order_to_second_order_epoch=0))
    straight = ExperimentBuilder(tiny_config(experiment_name="straight", total_epochs=2, **extra))
    straight._resume()
    straight.train()

    first = ExperimentBuilder(tiny_config(experiment_name="resumed", total_epochs=2, total_epochs_before_pause=1,
                                          **extra))
    first._resume()
    assert first.train() is False  # paused after one epoch
    second = ExperimentBuilder(tiny_config(experiment_name="resumed", total_epochs=2, **extra))
    second._resume()
    assert second.state["next_epoch"] == 1
    assert second.train() is True

    for name, tensor in weights_of(straight).items():
        assert torch.equal(tensor, weights_of(second)[name]), f"{name} differs after resume"
    straight_optimizer = straight.model.optimizer.state_dict()["state"]
    resumed_optimizer = second.model.optimizer.state_dict()["state"]
    for key in straight_optimizer:
        assert torch.equal(straight_optimizer[key]["exp_avg"], resumed_optimizer[key]["exp_avg"])
    assert straight.state["epoch_rows"][1]["val_accuracy_mean"] == second.state["epoch_rows"][1]["val_accuracy_mean"]


def checkpoint_paused_after_epoch_0(tiny_config) -> tuple[Path, dict]:
    """Train one epoch of two and pause: the latest checkpoint's path and contents, to edit as an older version's."""
    first = ExperimentBuilder(tiny_config(total_epochs=2, total_epochs_before_pause=1))
    first._resume()
    assert first.train() is False  # paused after epoch 0
    return first.paths.latest_checkpoint, read_checkpoint(first.paths.latest_checkpoint)


def test_a_checkpoint_from_before_a_logged_column_resumes_and_leaves_its_epochs_blank_there(tiny_config):
    latest, checkpoint = checkpoint_paused_after_epoch_0(tiny_config)
    # An older version's checkpoint: its epoch rows lack a column this version logs.
    for row in checkpoint["experiment"]["epoch_rows"]:
        del row["nonfinite_iterations_skipped"]
    torch.save(checkpoint, latest)

    second = ExperimentBuilder(tiny_config(total_epochs=2))
    second._resume()
    assert second.train() is True
    rows = list(csv.DictReader(open(second.paths.summary_statistics)))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert [row["nonfinite_iterations_skipped"] for row in rows] == ["", "0"]
    assert rows[0]["val_accuracy_mean"] == str(checkpoint["experiment"]["epoch_rows"][0]["val_accuracy_mean"])
    epochs = summarize_results.read_epoch_rows(second.config.experiment_folder)
    assert "nonfinite_iterations_skipped" not in epochs[0] and epochs[1]["nonfinite_iterations_skipped"] == 0.0
    logged = [row["val_accuracy_mean"] for row in second.state["epoch_rows"]]
    assert summarize_results.best_validation(epochs, None)["best_val_epoch"] == logged.index(max(logged))


def test_a_checkpoint_from_before_a_state_key_resumes_with_its_fresh_value(tiny_config):
    latest, checkpoint = checkpoint_paused_after_epoch_0(tiny_config)
    # An older version's checkpoint: it lacks a top-level state key and two of the epoch progress's keys.
    del checkpoint["experiment"]["nonfinite_in_a_row"]
    del checkpoint["experiment"]["epoch_progress"]["seconds"], checkpoint["experiment"]["epoch_progress"]["skipped"]
    torch.save(checkpoint, latest)

    second = ExperimentBuilder(tiny_config(total_epochs=2))
    second._resume()
    assert second.state["nonfinite_in_a_row"] == 0
    assert second.state["epoch_progress"] == experiment_builder.fresh_epoch_progress()
    assert second.train() is True
    assert [row["epoch"] for row in second.state["epoch_rows"]] == [0, 1]
    assert second.state["epoch_rows"][1]["nonfinite_iterations_skipped"] == 0


def test_experiment_files_checkpoints_and_ensemble_summary(tiny_config):
    config = tiny_config(contextual_grad=True, total_epochs=4, max_models_to_save=2)
    started = time.monotonic()
    builder, summary = run(config)
    folder = config.experiment_folder
    paths = ExperimentPaths(folder)

    rows = list(csv.DictReader(open(paths.summary_statistics)))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    for key in ("train_loss_mean", "train_accuracy_std", "val_loss_std", "val_accuracy_mean", "epoch_time_s"):
        assert float(rows[0][key]) >= 0
    # Only the best max_models_to_save epochs (by validation accuracy) and the latest stay on disk.
    best = builder.best_epochs()
    assert sorted(paths.saved_epochs()) == sorted(best) and len(best) == 2
    assert paths.latest_checkpoint.exists()
    val = {int(r["epoch"]): float(r["val_accuracy_mean"]) for r in rows}
    assert min(val[e] for e in best) >= max(v for e, v in val.items() if e not in best)
    latest = read_checkpoint(paths.latest_checkpoint)
    assert set(latest) >= {"network", "optimizer", "scheduler", "rng", "experiment", "config"}
    assert paths.config.exists()

    # The summary files, and their numbers recomputed independently from the saved checkpoints.
    saved = json.loads(paths.test_summary().read_text())
    assert saved == json.loads(json.dumps(summary))
    assert list(csv.DictReader(open(paths.test_summary(suffix=".csv"))))[0]["ensemble_test_accuracy"]
    # The test's own wall time, which the epochs' times leave out: more than nothing, less than the whole run.
    assert 0 < saved["test_time_s"] < time.monotonic() - started
    assert [m["epoch"] for m in saved["models"]] == best
    provider = FewShotDataProvider(config, input_statistics=lambda: builder.state["normalisation"], splits=("test",))
    batches = list(provider.evaluation_batches("test", config.num_evaluation_tasks, 4))
    labels = torch.cat([b.query_labels for b in batches])
    probabilities = []
    for epoch in best:
        builder.model.load_state_dict(read_checkpoint(paths.checkpoint(epoch))["network"])
        probabilities.append(torch.cat([builder.model.run_validation_iter(b)["probabilities"] for b in batches]))
    per_task = (torch.stack(probabilities).mean(0).argmax(-1) == labels).float().mean(1).numpy()
    accuracy, interval = mean_and_confidence(per_task)
    assert saved["ensemble_test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert saved["ensemble_test_confidence_95"] == pytest.approx(1.96 * per_task.std() / np.sqrt(len(per_task)))
    assert saved["num_test_tasks"] == config.num_evaluation_tasks


def test_scheduler_steps_once_per_epoch_with_cosine_annealing(tiny_config):
    config = tiny_config(total_epochs=3, meta_learning_rate=0.01, min_learning_rate=0.001)
    builder, _ = run(config)
    rates = [row["meta_learning_rate"] for row in builder.state["epoch_rows"]]
    expected = [0.001 + 0.5 * (0.01 - 0.001) * (1 + np.cos(np.pi * e / 3)) for e in range(3)]
    np.testing.assert_allclose(rates, expected, rtol=1e-6)


def test_a_log_without_the_progress_bar_reports_progress_every_interval(tiny_config, capsys):
    builder, _ = run(tiny_config(total_epochs=1, total_iter_per_epoch=3, progress_interval_s=1e-9))
    lines = [line for line in capsys.readouterr().out.splitlines() if "meta-iterations," in line]
    assert [line.split(",")[0] for line in lines] == ["epoch 0: 1/3 meta-iterations", "epoch 0: 2/3 meta-iterations",
                                                      "epoch 0: 3/3 meta-iterations"]
    row = builder.state["epoch_rows"][0]
    assert lines[0].endswith(" so far")  # the first window is the running mean itself
    assert f"ends in about 0 min; train loss {row['train_loss_mean']:.4f} accuracy {row['train_accuracy_mean']:.4f} " \
           "so far; since iteration 2: loss " in lines[-1]
    # None with progress_interval_s 0, nor beside the progress bar.
    for settings in ({"progress_interval_s": 0.0}, {"progress_interval_s": 1e-9, "show_progress": True}):
        run(tiny_config(total_epochs=1, total_iter_per_epoch=3, experiment_name=f"quiet{len(settings)}", **settings))
        assert "meta-iterations," not in capsys.readouterr().out


def test_a_progress_line_gives_the_mean_since_the_last_one():
    """Iterations 2-3 of 4: one skipped (non-finite), so the window holds the last two finite losses."""
    progress = {"iterations": 4, "losses": [1.0, 2.0, 3.0], "accuracies": [0.1, 0.2, 0.6], "skipped": 1, "seconds": 0}
    assert progress_line(0, progress, 10, 8.0, last_report=(2, 1)) == (
        "epoch 0: 4/10 meta-iterations, 2.00 s each, the epoch's training ends in about 0 min; train loss 2.0000 "
        "accuracy 0.3000 so far; since iteration 2: loss 2.5000 accuracy 0.4000 (1 non-finite skipped)")
    assert progress_line(1, dict(progress, skipped=0), 10, 8.0).endswith("accuracy 0.3000 so far")
    assert progress_line(1, dict(progress, losses=[], accuracies=[]), 10, 8.0).endswith("no finite loss yet")


def test_test_only_mode_and_cross_domain(tiny_config):
    config = tiny_config(contextual_grad=True, total_epochs=2)
    _, trained = run(config)
    summary_file = ExperimentPaths(config.experiment_folder).test_summary()
    summary_file.unlink()
    retested = ExperimentBuilder(tiny_config(contextual_grad=True, total_epochs=2,
                                             evaluate_on_test_set_only=True)).run_experiment()
    assert retested["ensemble_test_accuracy"] == pytest.approx(trained["ensemble_test_accuracy"])
    assert summary_file.exists()

    cross = ExperimentBuilder(tiny_config(contextual_grad=True, total_epochs=2, evaluate_on_test_set_only=True,
                                          test_dataset="toy_other")).run_experiment()
    assert cross["dataset"] == "toy_other" and cross["trained_on"] == "toy"
    assert ExperimentPaths(config.experiment_folder).test_summary("toy_other").exists()
    assert json.loads(summary_file.read_text())["dataset"] == "toy"  # the in-domain summary is kept


def test_checkpoint_keeps_input_statistics_only_when_used_and_tests_apply_the_trained_choice(
        tiny_config, toy_datasets, monkeypatch):
    test_providers = []

    class RecordingProvider(FewShotDataProvider):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            test_providers.append(self)

    def config(name, normalisation, **extra):
        return tiny_config(experiment_name=name, input_normalisation=normalisation, total_epochs=1, **extra)

    def latest_checkpoint(name):
        folder = tiny_config(experiment_name=name).experiment_folder
        return read_checkpoint(ExperimentPaths(folder).latest_checkpoint)

    run(config("raw", "none"))
    assert latest_checkpoint("raw")["experiment"]["normalisation"] is None
    run(config("standardised", "dataset_statistics"))
    trained_statistics = data.channel_statistics(load_split(toy_datasets / "toy", "train", (1, 16, 16)))
    np.testing.assert_allclose(latest_checkpoint("standardised")["experiment"]["normalisation"], trained_statistics)

    # A cross-domain test applies the trained model's scaling, not the test dataset's statistics.
    monkeypatch.setattr(experiment_builder, "FewShotDataProvider", RecordingProvider)
    for name, normalisation in (("raw", "none"), ("standardised", "dataset_statistics")):
        summary = ExperimentBuilder(config(name, normalisation, evaluate_on_test_set_only=True,
                                          test_dataset="toy_other")).run_experiment()
        assert summary["dataset"] == "toy_other"
    raw_test, standardised_test = test_providers
    assert raw_test.scaling.statistics is None
    np.testing.assert_allclose(standardised_test.scaling.statistics, trained_statistics)

    # Testing (or resuming) with the other scaling is refused; checkpoints from before the key were standardised.
    with pytest.raises(CheckpointError, match=r"input_normalisation \(checkpoint: 'none', now: 'dataset_statistics'\)"):
        ExperimentBuilder(config("raw", "dataset_statistics", evaluate_on_test_set_only=True)).run_experiment()
    older = {key: value for key, value in latest_checkpoint("standardised")["config"].items()
             if key != "input_normalisation"}
    ExperimentBuilder(config("standardised", "dataset_statistics")).checkpoints.check_architecture(
        {"config": older}, Path("older"))
    with pytest.raises(CheckpointError, match=r"input_normalisation \(checkpoint: 'dataset_statistics', now: 'none'\)"
                                              r".*these options restore it: --input_normalisation dataset_statistics"):
        ExperimentBuilder(config("standardised", "none")).checkpoints.check_architecture({"config": older},
                                                                                         Path("older"))


def test_continue_from_a_given_epoch_and_refusals(tiny_config):
    config = tiny_config(total_epochs=2, max_models_to_save=2)
    run(config)
    rewound = ExperimentBuilder(tiny_config(total_epochs=2, max_models_to_save=2, continue_from_epoch=0))
    rewound._resume()
    assert rewound.state["next_epoch"] == 1 and len(rewound.state["epoch_rows"]) == 1

    with pytest.raises(CheckpointError, match="saved epochs"):
        ExperimentBuilder(tiny_config(total_epochs=2, continue_from_epoch=7))._resume()
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        ExperimentBuilder(tiny_config(total_epochs=2, continue_from_epoch="from_scratch"))._resume()
    with pytest.raises(CheckpointError, match="cnn_num_filters"):
        ExperimentBuilder(tiny_config(total_epochs=2, cnn_num_filters=4))._resume()


def test_training_ends_its_loader_threads_also_when_it_fails(tiny_config, monkeypatch):
    def loader_threads():
        return [thread for thread in threading.enumerate() if thread.name.startswith("ThreadPoolExecutor")]

    already_running = set(loader_threads())
    builder = ExperimentBuilder(tiny_config(num_dataprovider_workers=2, total_epochs=1))
    builder.train()
    assert set(loader_threads()) == already_running

    failing = ExperimentBuilder(tiny_config(num_dataprovider_workers=2, total_epochs=1, experiment_name="fails"))
    def fail(*args, **kwargs):
        raise RuntimeError("a failing iteration")
    monkeypatch.setattr(failing.model, "run_train_iter", fail)
    with pytest.raises(RuntimeError, match="a failing iteration"):
        failing.train()
    assert set(loader_threads()) == already_running


def test_batched_and_loop_training_give_the_same_run(tiny_config):
    runs = {}
    for batching in ("batched", "loop"):
        builder, summary = run(tiny_config(experiment_name=batching, task_batching=batching, contextual_grad=True,
                                           total_epochs=1))
        runs[batching] = (weights_of(builder), builder.state["epoch_rows"][0], summary)
    (batched_weights, batched_row, batched_summary), (loop_weights, loop_row, loop_summary) = runs.values()
    # float32 sums in another order: equal up to rounding, which Adam may turn into one step (lr 1e-3).
    for name, tensor in batched_weights.items():
        torch.testing.assert_close(tensor, loop_weights[name], rtol=0, atol=2e-3)
    for key in ("train_loss_mean", "val_loss_mean"):
        assert batched_row[key] == pytest.approx(loop_row[key], rel=1e-4)
    assert batched_summary["ensemble_test_accuracy"] == pytest.approx(loop_summary["ensemble_test_accuracy"], abs=0.02)


@pytest.mark.slow
def test_command_line_trains_tests_and_reports_errors(toy_datasets, tmp_path):
    command = [sys.executable, "train_maml_system.py", "--name_of_args_json_file",
               "experiment_config/omniglot_5way_1shot/CxGrad_4conv_cpu.yaml",
               "--dataset_name", "toy", "--datasets_dir", str(toy_datasets), "--experiments_dir", str(tmp_path),
               "--image_height", "16", "--image_width", "16", "--cnn_num_filters", "4", "--num_stages", "2",
               "--total_epochs", "1", "--total_iter_per_epoch", "2", "--num_evaluation_tasks", "4",
               "--num_target_samples", "3", "--batch_size", "2", "--show_progress", "false", "--augment_images", "false"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Ensemble of 1 models" in done.stdout

    bad = subprocess.run(command + ["--batch_sise", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "unknown key 'batch_sise'" in bad.stderr and "did you mean 'batch_size'" in bad.stderr
    assert "Traceback" not in bad.stderr

    missing = subprocess.run(command + ["--dataset_name", "nowhere", "--experiment_name", "x"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert "python preprocess/preprocess.py --datasets nowhere" in missing.stderr
