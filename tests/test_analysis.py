"""Seeing what the method does: inner-loop statistics, the plot script, the results table, TensorBoard."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from data import FewShotDataProvider
from experiment_builder import ExperimentBuilder
from few_shot_learning_system import MAMLFewShotClassifier, last_step_only, per_task_cross_entropy
from utils.inner_loop_statistics import InnerLoopStatistics, InnerLoopStatisticsLog, read_statistics
from tests.conftest import tiny_overrides
from utils import plot_experiment, summarize_results
from utils.config import ConfigError, ExperimentConfig, load_config
from utils.checkpoints import CheckpointError
from utils.experiment_paths import ExperimentPaths

REPO = Path(__file__).resolve().parents[1]
STEPS = 2  # number_of_training_steps_per_iter of the tiny config
NO_CHECKPOINTS = shutil.ignore_patterns(ExperimentPaths(Path()).saved_models.name)  # copies without saved_models


@pytest.fixture(scope="module")
def finished_runs(toy_datasets, tmp_path_factory) -> Path:
    """Two finished tiny experiments with inner-loop statistics: 'cxgrad' (with MSL) and 'maml' (also
    tested cross-domain on toy_other)."""
    experiments = tmp_path_factory.mktemp("analysis") / "experiments"

    def config(**extra):
        return load_config(overrides=tiny_overrides(toy_datasets, experiments, log_inner_loop_statistics=True,
                                                    total_epochs=2, **extra))

    ExperimentBuilder(config(experiment_name="cxgrad", contextual_grad=True, use_multi_step_loss_optimization=True,
                             multi_step_loss_num_epochs=2)).run_experiment()
    ExperimentBuilder(config(experiment_name="maml")).run_experiment()
    ExperimentBuilder(config(experiment_name="maml", evaluate_on_test_set_only=True,
                             test_dataset="toy_other")).run_experiment()
    return experiments


def first_batch(config):
    return FewShotDataProvider(config, splits=("train",)).train_batch(0)


# ---------------------------------------------------------------------- recording in the inner loop
def test_recorded_norms_are_each_tasks_own_gradient_norms(tiny_config):
    config = tiny_config(log_inner_loop_statistics=True)
    torch.manual_seed(0)
    model = MAMLFewShotClassifier(config, torch.device("cpu"))
    task = first_batch(config)
    # Step 0 adapts from the meta-parameters: its gradients are those of each task's support loss there.
    losses = per_task_cross_entropy(model.classifier(task.support_images, step=0), task.support_labels)
    params = dict(model.classifier.named_parameters())
    expected = torch.tensor([[torch.autograd.grad(losses[t], params[name], retain_graph=True)[0].norm().item()
                              for t in range(task.num_tasks)] for name in model.inner_loop_param_names])

    statistics = model.run_train_iter(task, epoch=0)["inner_loop_statistics"]
    assert statistics.parameter_names == model.inner_loop_param_names
    assert statistics.grad_norms.shape == (STEPS, len(model.inner_loop_param_names), task.num_tasks)
    assert statistics.gammas is None and statistics.layer_names == []
    assert bool((statistics.grad_norms > 0).all()) and bool(statistics.grad_norms.isfinite().all())
    torch.testing.assert_close(statistics.grad_norms[0], expected, rtol=1e-4, atol=1e-7)
    assert not statistics.grad_norms.requires_grad


def test_cxgrad_records_gamma_and_task_by_task_chunks_agree(tiny_config):
    recorded = {}
    for batching in ("batched", "loop"):
        config = tiny_config(log_inner_loop_statistics=True, contextual_grad=True, task_batching=batching)
        torch.manual_seed(0)
        model = MAMLFewShotClassifier(config, torch.device("cpu"))
        recorded[batching] = model.run_train_iter(first_batch(config), epoch=0)["inner_loop_statistics"]
    batched, loop = recorded.values()
    layers = model.context.scaled_param_names
    assert batched.layer_names == layers
    assert batched.gammas.shape == (STEPS, len(layers), config.batch_size)
    assert bool((batched.gammas > 0).all()) and bool((batched.grad_norms > 0).all())
    torch.testing.assert_close(loop.grad_norms, batched.grad_norms, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loop.gammas, batched.gammas, rtol=1e-5, atol=1e-7)


def test_nothing_is_recorded_when_off_or_at_evaluation(tiny_config):
    config = tiny_config()
    model = MAMLFewShotClassifier(config, torch.device("cpu"))
    assert "inner_loop_statistics" not in model.run_train_iter(first_batch(config), epoch=0)
    config = tiny_config(log_inner_loop_statistics=True)
    model = MAMLFewShotClassifier(config, torch.device("cpu"))
    result = model.inner_loop(first_batch(config), STEPS, second_order=False, query_step_weights=last_step_only(STEPS),
                              track_meta_graph=False)
    assert result.statistics is None


def test_epoch_log_averages_over_every_task_of_the_epoch(tmp_path):
    names, layers = ["layer0.conv.weight", "linear.weight"], ["layer0.conv.weight"]
    # Two iterations of 2 and 1 tasks, 1 step: the epoch mean and std are over all 3 tasks.
    path = ExperimentPaths(tmp_path).inner_loop_statistics
    log = InnerLoopStatisticsLog(path, first_epoch=0)
    log.add(InnerLoopStatistics(names, torch.tensor([[[1.0, 3.0], [10.0, 10.0]]]), layers,
                                torch.tensor([[[0.5, 1.5]]])))
    log.add(InnerLoopStatistics(names, torch.tensor([[[5.0], [40.0]]]), layers, torch.tensor([[[1.0]]])))
    log.end_epoch(0, np.array([1.0]))
    rows = {(r["quantity"], r["parameter"]): r for r in read_statistics(path)}
    assert rows["grad_norm", "layer0.conv.weight"]["mean"] == pytest.approx(3.0)
    assert rows["grad_norm", "layer0.conv.weight"]["std"] == pytest.approx(np.std([1.0, 3.0, 5.0]))
    assert rows["grad_norm", "linear.weight"]["mean"] == pytest.approx(20.0)
    assert rows["gamma", "layer0.conv.weight"]["mean"] == pytest.approx(1.0)
    assert rows["gamma", "layer0.conv.weight"]["std"] == pytest.approx(np.std([0.5, 1.5, 1.0]))
    assert rows["query_step_weight", ""]["mean"] == 1.0
    assert len(rows) == 4

    foreign = tmp_path / "foreign.csv"
    foreign.write_text("epoch,loss\n0,1.5\n")
    with pytest.raises(CheckpointError, match="foreign.csv is not an inner-loop statistics log"):
        InnerLoopStatisticsLog(foreign, first_epoch=1)


# ---------------------------------------------------------------------- the log of a training run
def test_training_writes_inner_loop_statistics_per_epoch_and_step(finished_runs):
    for name, is_cxgrad in (("cxgrad", True), ("maml", False)):
        folder = finished_runs / name
        builder = ExperimentBuilder(load_config(ExperimentPaths(folder).config))
        rows = read_statistics(ExperimentPaths(folder).inner_loop_statistics)
        assert sorted({(r["epoch"], r["step"]) for r in rows}) == [(e, s) for e in range(2) for s in range(STEPS)]
        for epoch in range(2):
            of_epoch = [r for r in rows if r["epoch"] == epoch]
            weights = [r["mean"] for r in of_epoch if r["quantity"] == "query_step_weight"]
            np.testing.assert_allclose(weights, builder.model.query_step_weights(epoch))
            norms = {(r["step"], r["parameter"]): r for r in of_epoch if r["quantity"] == "grad_norm"}
            assert set(norms) == {(s, p) for s in range(STEPS) for p in builder.model.inner_loop_param_names}
            assert all(r["mean"] > 0 and r["std"] >= 0 for r in norms.values())
            gammas = [r for r in of_epoch if r["quantity"] == "gamma"]
            if is_cxgrad:
                assert {r["parameter"] for r in gammas} == set(builder.model.classifier.conv_weight_names)
                assert all(r["mean"] > 0 and r["std"] >= 0 for r in gammas)
            else:
                assert gammas == []
    # MSL (2 epochs) weights the steps 1/2, 1/2 in epoch 0, then 1/4, 3/4.
    cxgrad_rows = read_statistics(ExperimentPaths(finished_runs / "cxgrad").inner_loop_statistics)
    epoch1 = [r["mean"] for r in cxgrad_rows if r["epoch"] == 1 and r["quantity"] == "query_step_weight"]
    np.testing.assert_allclose(epoch1, [0.25, 0.75])


def test_a_resumed_run_keeps_the_earlier_epochs_once(tiny_config):
    first = ExperimentBuilder(tiny_config(log_inner_loop_statistics=True, total_epochs=2, total_epochs_before_pause=1))
    first._resume()
    assert first.train() is False
    path = first.paths.inner_loop_statistics
    epoch0 = read_statistics(path)
    second = ExperimentBuilder(tiny_config(log_inner_loop_statistics=True, total_epochs=2))
    second._resume()
    assert second.train() is True
    rows = read_statistics(path)
    assert [r for r in rows if r["epoch"] == 0] == epoch0
    assert sorted({r["epoch"] for r in rows}) == [0, 1]
    assert len(rows) == 2 * len(epoch0)


# ---------------------------------------------------------------------- the plot script
def test_plot_script_writes_the_figures(finished_runs, tmp_path, capsys):
    out = tmp_path / "plots"
    code = plot_experiment.main([str(finished_runs / "cxgrad"), "--compare", str(finished_runs / "maml"),
                                 "--out", str(out)])
    assert code == 0
    panel = tuple(int(inches * plot_experiment.DPI) for inches in plot_experiment.PANEL_INCHES)
    expected_sizes = {"learning_curves.png": (2 * panel[0], panel[1]),
                      "gradient_norms.png": (2 * panel[0], 2 * panel[1]),  # one column per experiment
                      "gamma.png": (panel[0], panel[1]),  # the CxGrad run only
                      "msl_importance.png": (2 * panel[0], panel[1])}
    assert sorted(p.name for p in out.iterdir()) == sorted(expected_sizes)
    for name, size in expected_sizes.items():
        with Image.open(out / name) as image:
            assert image.size == size, name
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert len(colours) > 50, f"{name} looks blank"

    # The printed backbone share, recomputed from the CSV: last epoch, mean over the inner steps.
    rows = [r for r in read_statistics(ExperimentPaths(finished_runs / "maml").inner_loop_statistics)
            if r["epoch"] == 1 and r["quantity"] == "grad_norm"]
    mean = {p: np.mean([r["mean"] for r in rows if r["parameter"] == p]) for p in {r["parameter"] for r in rows}}
    backbone = sum(v for p, v in mean.items() if ".conv.weight" in p)
    share = re.search(r"maml \(MAML\).*backbone share ([\d.]+)%", capsys.readouterr().out)
    assert float(share.group(1)) == pytest.approx(100 * backbone / (backbone + mean["linear.weight"]), abs=0.051)


def test_plot_script_draws_what_it_can_and_says_what_it_skipped(finished_runs, tmp_path, capsys):
    unrecorded = tmp_path / "unrecorded"
    shutil.copytree(finished_runs / "maml", unrecorded, ignore=NO_CHECKPOINTS)
    ExperimentPaths(unrecorded).inner_loop_statistics.unlink()
    script = [sys.executable, "utils/plot_experiment.py"]
    done = subprocess.run(script + [str(unrecorded)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert re.search(r"gradient_norms.png, gamma.png, msl_importance.png skipped: no inner-loop statistics .* in "
                     rf"{re.escape(str(unrecorded))}: .* --log_inner_loop_statistics true", done.stderr), done.stderr
    assert sorted(path.name for path in ExperimentPaths(unrecorded).plots.iterdir()) == ["learning_curves.png"]
    assert (ExperimentPaths(unrecorded).plots / "learning_curves.png").stat().st_size > 0

    # Compared with a run that has them, the inner-loop figures show that run alone, and say so.
    out = tmp_path / "compared"
    assert plot_experiment.main([str(finished_runs / "cxgrad"), "--compare", str(unrecorded), "--out", str(out)]) == 0
    assert f"{unrecorded} in gradient_norms.png, gamma.png, msl_importance.png skipped" in capsys.readouterr().err
    panel = tuple(int(inches * plot_experiment.DPI) for inches in plot_experiment.PANEL_INCHES)
    with Image.open(out / "learning_curves.png") as both, Image.open(out / "gradient_norms.png") as one_column:
        assert both.size == (2 * panel[0], panel[1]) and one_column.size == (panel[0], 2 * panel[1])

    # Exit status 2 is kept for what leaves nothing to draw.
    never_trained = tmp_path / "never_trained"
    never_trained.mkdir()
    with pytest.raises(plot_experiment.PlotError, match="summary_statistics.csv"):
        plot_experiment.plot_experiments([never_trained])
    assert plot_experiment.main([str(never_trained)]) == 2
    assert plot_experiment.main([str(tmp_path / "missing")]) == 2
    assert "no experiment folder" in capsys.readouterr().err


# ---------------------------------------------------------------------- the results table
def test_results_table_lists_finished_experiments_with_their_numbers(finished_runs, tmp_path, capsys):
    root = tmp_path / "experiments"
    for name in ("cxgrad", "maml"):
        shutil.copytree(finished_runs / name, root / name, ignore=NO_CHECKPOINTS)
    # Trained, never tested.
    shutil.copytree(ExperimentPaths(root / "maml").logs, ExperimentPaths(root / "unfinished").logs)
    (root / "broken").mkdir()
    ExperimentPaths(root / "broken").test_summary().write_text("{not json")

    assert summarize_results.main([str(root)]) == 0
    printed = capsys.readouterr()
    assert "skipped" in printed.err and "broken" in printed.err
    rows = {row["experiment"]: row for row in csv.DictReader(open(root / "results.csv"))}
    assert sorted(rows) == ["cxgrad", "maml"]
    assert (rows["cxgrad"]["method"], rows["maml"]["method"]) == ("CxGrad", "MAML")
    for name, row in rows.items():
        summary = json.loads(ExperimentPaths(root / name).test_summary().read_text())
        epochs = list(csv.DictReader(open(ExperimentPaths(root / name).summary_statistics)))
        assert (row["dataset"], int(row["ways"]), int(row["shots"])) == ("toy", 5, 1)
        for key in ("ensemble_test_accuracy", "ensemble_test_confidence_95", "best_single_model_test_accuracy",
                    "best_single_model_test_confidence_95"):
            assert float(row[key]) == pytest.approx(summary[key])
        assert int(row["epochs"]) == 2
        assert float(row["wall_time_s"]) == pytest.approx(sum(float(e["epoch_time_s"]) for e in epochs))
        assert float(row["test_time_s"]) == pytest.approx(summary["test_time_s"]) and summary["test_time_s"] > 0
        # The best epoch's validation, with the interval the test uses over the config's validation tasks.
        tasks = yaml.safe_load(ExperimentPaths(root / name).config.read_text())["num_evaluation_tasks"]
        best = max(epochs, key=lambda e: float(e["val_accuracy_mean"]))
        assert int(row["best_val_epoch"]) == int(best["epoch"])
        assert float(row["best_val_accuracy"]) == pytest.approx(float(best["val_accuracy_mean"]))
        interval = 1.96 * float(best["val_accuracy_std"]) / tasks**0.5
        assert float(row["best_val_confidence_95"]) == pytest.approx(interval)
        assert float(row["last_val_accuracy"]) == pytest.approx(float(epochs[-1]["val_accuracy_mean"]))
        validation = f"{100 * float(best['val_accuracy_mean']):.2f} +- {100 * interval:.2f} (epoch {best['epoch']})"
        cells = {cells["experiment"]: cells for cells in per_run_table(root / "results.md")}[name]
        assert cells["best val. acc. (%)"] == validation
        cell = f"{100 * summary['ensemble_test_accuracy']:.2f} +- {100 * summary['ensemble_test_confidence_95']:.2f}"
        assert cell in printed.out and cell in (root / "results.md").read_text()
    cross = json.loads(ExperimentPaths(root / "maml").test_summary("toy_other").read_text())
    assert float(rows["maml"]["toy_other_ensemble_test_accuracy"]) == pytest.approx(cross["ensemble_test_accuracy"])
    assert rows["cxgrad"]["toy_other_ensemble_test_accuracy"] == ""
    assert "-> toy_other" in (root / "results.md").read_text()
    # The markdown table's "test time" column shows the same seconds the CSV holds, in words.
    for cells in per_run_table(root / "results.md"):
        assert cells["test time"] == summarize_results.format_duration(float(rows[cells["experiment"]]["test_time_s"]))
    # Different methods are no seeds of one experiment: each run is its own group, and no seeds table.
    assert {(row["seed_group"], row["seeds"], row["ensemble_test_accuracy_std_over_seeds"]) for row in rows.values()} \
        == {("1", "1", ""), ("2", "1", "")}
    for row in rows.values():
        assert float(row["ensemble_test_accuracy_mean_over_seeds"]) == pytest.approx(float(row["ensemble_test_accuracy"]))
    assert "Over seeds" not in printed.out
    # The run that trained but was never tested is in a table of its own, not in the CSV.
    untested = printed.out.split("Trained, not tested")[1]
    assert "| unfinished |" in untested and "| cxgrad |" not in untested

    empty = tmp_path / "nothing"
    empty.mkdir()
    assert summarize_results.main([str(empty)]) == 2
    assert "no finished experiment" in capsys.readouterr().err


def test_runs_without_a_test_are_tabled_by_their_validation(finished_runs, tmp_path, capsys):
    """Runs still training (or run with the test left out) show their best and last validation; two runs in
    folders of one name (omniglot_twins.py's --out layout) are told apart by their paths."""
    root = tmp_path / "experiments"
    for probe in ("probe_a", "probe_b"):
        shutil.copytree(finished_runs / "cxgrad", root / probe / "run", ignore=NO_CHECKPOINTS)
    for summary in ExperimentPaths(root / "probe_b" / "run").logs.parent.glob("test_summary*.json"):
        summary.unlink()
    ExperimentPaths(root / "probe_a" / "run").test_summary().unlink()
    statistics = ExperimentPaths(root / "probe_b" / "run").summary_statistics
    rows = list(csv.DictReader(open(statistics)))
    rows[0]["val_accuracy_mean"], rows[1]["val_accuracy_mean"] = "0.75", "0.5"  # the best epoch is not the last
    rows[0]["val_accuracy_std"] = "0.2"
    with open(statistics, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (root / "stopped_before_an_epoch" / "logs").mkdir(parents=True)  # nothing to show: no row
    (root / "stopped_before_an_epoch" / "logs" / "summary_statistics.csv").write_text("epoch,epoch_time_s\n")

    assert summarize_results.main([str(root)]) == 0
    printed = capsys.readouterr()
    assert "no results.csv" in printed.out and not (root / "results.csv").exists()
    table = (root / "results.md").read_text()
    assert table == printed.out.split("wrote ")[0] and table.startswith("Trained, not tested")
    tasks = yaml.safe_load(ExperimentPaths(root / "probe_b" / "run").config.read_text())["num_evaluation_tasks"]
    interval = 100 * 1.96 * 0.2 / tasks**0.5
    assert (f"| probe_b/run | toy | 5 | 1 | CxGrad | 75.00 +- {interval:.2f} (epoch 0) | 50.00 | 2 |"
            in table)
    assert "| probe_a/run | toy | 5 | 1 | CxGrad |" in table and "stopped_before_an_epoch" not in table

    # A tested run of the same folder name: each table names its runs by path.
    shutil.copytree(finished_runs / "cxgrad", root / "probe_c" / "run", ignore=NO_CHECKPOINTS)
    assert summarize_results.main([str(root)]) == 0
    tested, untested = capsys.readouterr().out.split("Trained, not tested")
    assert [cells["experiment"] for cells in per_run_table(root / "results.md")] == ["probe_c/run"]
    assert "| probe_b/run |" in untested and "| probe_a/run |" in untested and "probe_c" not in untested
    assert [row["experiment"] for row in csv.DictReader(open(root / "results.csv"))] == ["probe_c/run"]


def per_run_table(results_md: Path) -> list[dict[str, str]]:
    """The rows of results.md's first table (one per run), each as {column header: cell}."""
    lines = results_md.read_text().split("\n\n")[0].splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def write_finished_run(root: Path, name: str, ensemble: float, best_single: float, **config) -> None:
    """An experiment folder as the ensemble test leaves it, reduced to what the table reads."""
    folder = root / name
    folder.mkdir(parents=True)
    ExperimentPaths(folder).config.write_text(yaml.safe_dump({"experiment_name": name, **config}))
    ExperimentPaths(folder).test_summary().write_text(json.dumps({
        "dataset": "omniglot", "ways": 5, "shots": 1, "ensemble_test_accuracy": ensemble,
        "ensemble_test_confidence_95": 0.01, "best_single_model_test_accuracy": best_single,
        "best_single_model_test_confidence_95": 0.012}))


def test_runs_that_differ_only_in_seeds_are_grouped(tmp_path, capsys):
    root = tmp_path / "experiments"
    cxgrad = dict(contextual_grad=True, meta_learning_rate=0.002)
    # Three seeds of one config, however they were run (folder, device, speed and logging options).
    write_finished_run(root, "cx_s0", 0.90, 0.89, seed=0, **cxgrad)
    write_finished_run(root / "gpu", "cx_s1", 0.92, 0.90, seed=1, train_seed=1, device="cuda",
                       task_batching="loop", log_inner_loop_statistics=True, **cxgrad)
    write_finished_run(root, "cx_s2", 0.97, 0.93, seed=2, experiments_dir="elsewhere", show_progress=False, **cxgrad)
    # Not seeds of it: another meta learning rate, and a config that leaves a key at its default implicitly.
    write_finished_run(root, "cx_lr", 0.80, 0.79, seed=0, contextual_grad=True, meta_learning_rate=0.01)
    write_finished_run(root, "maml_s0", 0.85, 0.84, seed=0)
    write_finished_run(root, "maml_s1", 0.87, 0.86, seed=1, meta_learning_rate=0.001)  # the default, written out

    assert summarize_results.main([str(root)]) == 0
    printed = capsys.readouterr()
    rows = {row["experiment"]: row for row in csv.DictReader(open(root / "results.csv"))}
    groups = {name: (row["seed_group"], int(row["seeds"])) for name, row in rows.items()}
    assert groups["cx_s0"] == groups["cx_s1"] == groups["cx_s2"] and groups["cx_s0"][1] == 3
    assert groups["maml_s0"] == groups["maml_s1"] and groups["maml_s0"][1] == 2
    assert groups["cx_lr"][1] == 1 and len(set(groups.values())) == 3
    assert [rows[name]["seed"] for name in ("cx_s0", "cx_s1", "cx_s2")] == ["0", "1", "2"]

    seeds = rows["cx_s1"]
    assert float(seeds["ensemble_test_accuracy_mean_over_seeds"]) == pytest.approx(0.93)
    assert float(seeds["ensemble_test_accuracy_std_over_seeds"]) == pytest.approx(np.sqrt((0.03**2 + 0.01**2 + 0.04**2) / 2))
    assert float(seeds["best_single_model_test_accuracy_mean_over_seeds"]) == pytest.approx(np.mean([0.89, 0.90, 0.93]))
    assert float(seeds["best_single_model_test_accuracy_std_over_seeds"]) == pytest.approx(np.std([0.89, 0.90, 0.93], ddof=1))
    assert float(rows["cx_s2"]["ensemble_test_confidence_95"]) == 0.01  # each run keeps its own CI
    assert rows["cx_lr"]["ensemble_test_accuracy_std_over_seeds"] == ""
    assert rows["cx_s0"]["test_time_s"] == ""  # a summary written before the test's time was logged

    table = (root / "results.md").read_text()
    assert table == printed.out.split("wrote ")[0]
    assert {cells["experiment"]: cells["test time"] for cells in per_run_table(root / "results.md")}["cx_s0"] == ""
    assert "| cx_s0, cx_s1, cx_s2 | omniglot | 5 | 1 | CxGrad | 3 | 93.00 +- 3.61 | 90.67 +- 2.08 |" in table
    assert "| maml_s0, maml_s1 | omniglot | 5 | 1 | MAML | 2 | 86.00 +- 1.41 | 85.00 +- 1.41 |" in table
    assert "cx_lr |" not in table.split("Over seeds")[1]  # a lone run has no row over seeds
    assert "warning" not in printed.err

    # The same seeds twice (e.g. one run repeated on another device) still count as a run, not as a seed.
    assert {row["distinct_seeds"] for row in rows.values() if row["seed_group"] == seeds["seed_group"]} == {"3"}
    write_finished_run(root, "cx_s2_again", 0.95, 0.93, seed=2, device="cpu", **cxgrad)
    assert summarize_results.main([str(root)]) == 0
    printed = capsys.readouterr()
    assert "cx_s2 and cx_s2_again differ only in bookkeeping keys" in printed.err
    assert "4 runs of their group, which has 3 different seeds" in printed.err
    cxgrad_rows = [row for row in csv.DictReader(open(root / "results.csv")) if row["method"] == "CxGrad"]
    assert {(row["seeds"], row["distinct_seeds"]) for row in cxgrad_rows} == {("4", "3"), ("1", "1")}
    assert "| cx_s0, cx_s1, cx_s2, cx_s2_again | omniglot | 5 | 1 | CxGrad | 4 runs, 3 seeds |" in printed.out


def test_runs_paused_after_different_epochs_are_not_seeds_of_one_experiment(tmp_path, capsys):
    """omniglot_twins.py --iterations 2000 and 7000 of one config differ only in `total_epochs_before_pause`
    (bookkeeping), but the longer run's ensemble chose among more epochs: it is no repeat of the shorter."""
    root = tmp_path / "experiments"
    for name, seed, epochs in (("cx_s0_4", 0, 4), ("cx_s1_4", 1, 4), ("cx_s0_14", 0, 14)):
        write_finished_run(root, name, 0.80 + epochs / 100, 0.79, seed=seed, contextual_grad=True,
                           total_epochs_before_pause=epochs)
        statistics = ExperimentPaths(root / name).summary_statistics
        statistics.parent.mkdir(parents=True)
        statistics.write_text("epoch,epoch_time_s\n" + "".join(f"{epoch},300.0\n" for epoch in range(epochs)))

    assert summarize_results.main([str(root)]) == 0
    printed = capsys.readouterr()
    rows = {row["experiment"]: row for row in csv.DictReader(open(root / "results.csv"))}
    assert rows["cx_s0_4"]["seed_group"] == rows["cx_s1_4"]["seed_group"] != rows["cx_s0_14"]["seed_group"]
    assert (rows["cx_s0_4"]["seeds"], rows["cx_s0_14"]["seeds"], rows["cx_s0_14"]["epochs"]) == ("2", "1", "14")
    assert float(rows["cx_s1_4"]["ensemble_test_accuracy_mean_over_seeds"]) == pytest.approx(0.84)
    assert "warning" not in printed.err  # seed 0 twice would be reported as a repeated run


def test_method_names():
    name = summarize_results.method_name
    assert name({"contextual_grad": True, "use_multi_step_loss_optimization": True}) == "CxGrad"
    assert name({"contextual_grad": False, "per_step_bn_statistics": True}) == "MAML++"
    assert name({"contextual_grad": False, "second_order": False}) == "MAML (first order)"


# ---------------------------------------------------------------------- TensorBoard
def test_tensorboard_without_the_package_is_a_config_error(tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        ExperimentBuilder(tiny_config(use_tensorboard=True)).train()


def test_tensorboard_logs_the_epoch_and_inner_loop_scalars(tiny_config):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    builder = ExperimentBuilder(tiny_config(use_tensorboard=True, log_inner_loop_statistics=True, total_epochs=2))
    builder.train()
    events = EventAccumulator(str(builder.paths.tensorboard))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "epoch/val_accuracy_mean" in tags and "inner_loop/grad_norm/linear.weight/step0" in tags
    values = [event.value for event in events.Scalars("epoch/val_accuracy_mean")]
    assert values == pytest.approx([row["val_accuracy_mean"] for row in builder.state["epoch_rows"]])


def test_layer_labels_cover_both_backbones():
    """The figures name every conv weight of 4-CONV and ResNet-12 (a missed one would vanish from them)."""
    from utils.plot_experiment import layer_label
    assert [layer_label(f"layer{i}.conv.weight") for i in range(2)] == ["conv1", "conv2"]
    assert layer_label("block0.layer2.conv.weight") == "b1.conv3"
    assert layer_label("block3.shortcut.conv.weight") == "b4.shortcut"
    assert layer_label("linear.weight") == "head"
    assert layer_label("block0.layer0.norm.weight") is None and layer_label("layer0.conv.bias") is None
    config = load_config(overrides=dict(backbone="resnet12", resnet_widths=[2, 2, 2, 2], image_height=16,
                                        image_width=16, device="cpu"))
    model = MAMLFewShotClassifier(config, torch.device("cpu"))
    labels = [layer_label(name) for name in model.inner_loop_param_names]
    assert len({label for label in labels if label and label != "head"}) == 16  # 12 convs + 4 shortcuts


def test_a_run_from_before_a_key_existed_is_not_grouped_with_todays_default():
    """An old config.yaml without `activation` was trained with ReLU: not a seed repeat of a leaky-ReLU run."""
    today = ExperimentConfig().to_dict()
    old = {key: value for key, value in today.items() if key not in ("activation", "input_normalisation")}
    assert summarize_results.replicate_identity(old)[0] != summarize_results.replicate_identity(today)[0]
    explicit_old = {**old, "activation": "relu", "input_normalisation": "dataset_statistics"}
    assert summarize_results.replicate_identity(old) == summarize_results.replicate_identity(explicit_old)


def test_best_validation_without_a_logged_std_shows_the_accuracy_alone():
    """A log with validation means but no std (a hand-made or older CSV) gives no interval rather than a crash."""
    epochs = [{"epoch": 0.0, "val_accuracy_mean": 0.8}, {"epoch": 1.0, "val_accuracy_mean": 0.9},
              {"epoch": 2.0, "val_accuracy_mean": 0.85}]
    best = summarize_results.best_validation(epochs, {"num_evaluation_tasks": 100})
    assert best == {"best_val_accuracy": 0.9, "best_val_confidence_95": "", "best_val_epoch": 1,
                    "last_val_accuracy": 0.85}
    assert summarize_results._validation(best) == "90.00 (epoch 1)"
    with_std = summarize_results.best_validation([{**row, "val_accuracy_std": 0.1} for row in epochs],
                                                 {"num_evaluation_tasks": 100})
    assert summarize_results._validation(with_std) == "90.00 +- 1.96 (epoch 1)"
    assert summarize_results.best_validation([{"epoch": 0.0, "epoch_time_s": 3.0}], None)["best_val_epoch"] == ""
