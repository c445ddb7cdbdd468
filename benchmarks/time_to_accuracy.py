"""How fast a config learns: wall time and meta-iterations until validation accuracy reaches a threshold.

    python benchmarks/time_to_accuracy.py experiment_config/omniglot_5way_1shot/CxGrad_4conv_cpu.yaml
    python benchmarks/time_to_accuracy.py CONFIG --thresholds 0.95 0.99 --out runs.jsonl --experiment_name sweep_lr0.05
    python benchmarks/time_to_accuracy.py CONFIG --init_inner_loop_learning_rate 0.05   # any config key, as for training

The config is trained and tested by `train_maml_system.main`, in this process, exactly as the training
script would (`--key value` overrides included), into a new experiment folder. When it has finished,
stdout gets JSON lines read from the files the experiment wrote:
    {"event": "epoch", ...}      per epoch: iterations so far, wall seconds, validation and train accuracy, train loss
    {"event": "threshold", ...}  per threshold: the first epoch at which validation accuracy reached it (>=),
                                 with its iterations and wall seconds, or "reached": false
    {"event": "test", ...}       the ensemble test accuracy and its 95% CI, the best single model, the wall times
The training's own messages go to stderr. `--out FILE` also appends the lines to FILE.

How the wall time is measured. The builder has no per-epoch hook, so the lines are derived afterwards:
- an epoch's and a threshold's `wall_s` is the sum of `epoch_time_s` (logs/summary_statistics.csv) up to that
  epoch: training and validation of every epoch so far. It leaves out what the builder does around epochs
  (building the model, loading the dataset cache, writing checkpoints), a few seconds in all;
- the test line's `test_wall_s` is the ensemble test's own time (`test_time_s` in test_summary.json), and
  `total_wall_s` is the clock around the whole run, so it includes what lies around epochs too, and the
  ensemble test: training + validation + test. Preprocessing is left out: the dataset must be built
  (preprocess/preprocess.py), and the first use of a dataset at an image size, which decodes it into
  data.py's image cache, is done before the clock starts. Importing PyTorch is not timed either.
Epochs are numbered from 0, as in summary_statistics.csv. One process (the CPU or one GPU), not torchrun.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

if __package__ in (None, ""):  # run as `python benchmarks/time_to_accuracy.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_maml_system
from data import load_split
from utils.config import ConfigError, ExperimentConfig, parse_command_line
from utils.dataset_format import SPLITS, DatasetError, read_manifest
from utils.experiment_paths import ExperimentPaths
from utils.summarize_results import read_epoch_rows, read_summary

DEFAULT_THRESHOLDS = (0.90, 0.95, 0.97, 0.99)


class BenchmarkError(RuntimeError):
    """The run cannot be timed as asked."""


def check_timeable(config: ExperimentConfig, thresholds: Iterable[float]) -> None:
    """Refuse, before anything is trained, what would give a partial or misleading timing."""
    for threshold in thresholds:
        if not 0.0 <= threshold <= 1.0:
            raise BenchmarkError(f"threshold {threshold} is not an accuracy between 0 and 1 (write 0.97 for 97%)")
    folder = config.experiment_folder
    if folder.exists() and any(folder.iterdir()):
        raise BenchmarkError(f"{folder} already holds an experiment: a timing must start from scratch (a resumed "
                             f"run would be timed from its resume). Choose another --experiment_name or remove it")
    if config.evaluate_on_test_set_only:
        raise BenchmarkError("evaluate_on_test_set_only trains nothing, so there is nothing to time")
    if config.total_epochs_before_pause < config.total_epochs:
        raise BenchmarkError(f"total_epochs_before_pause ({config.total_epochs_before_pause}) would pause the run "
                             f"before its {config.total_epochs} epochs and the test; drop it")
    if config.test_dataset:
        raise BenchmarkError("test_dataset (cross-domain) is not timed here: time the in-domain run, then test it "
                             "with train_maml_system.py --evaluate_on_test_set_only true --test_dataset NAME")


def decode_into_cache(config: ExperimentConfig) -> None:
    """Decode every split at the config's image size into data.py's cache, if not done yet: preprocessing,
    which the timing leaves out (memory-mapped, so a split already cached costs next to nothing)."""
    read_manifest(config.dataset_folder, config.dataset_name)
    for split in SPLITS:
        load_split(config.dataset_folder, split, config.image_shape, in_memory=False)


def threshold_crossings(epoch_lines: list[dict[str, Any]], thresholds: Iterable[float]) -> list[dict[str, Any]]:
    """One line per threshold: the first epoch whose validation accuracy is >= it, or "reached": false."""
    lines = []
    for threshold in thresholds:
        first = next((line for line in epoch_lines if line["val_accuracy"] >= threshold), None)
        when = {key: first[key] if first else None for key in ("epoch", "iterations", "wall_s")}
        lines.append({"event": "threshold", "threshold": threshold, "reached": first is not None, **when})
    return lines


def epoch_lines(rows: list[dict[str, float]], iterations_per_epoch: int) -> list[dict[str, Any]]:
    """summary_statistics.csv rows as epoch lines, with the cumulative iterations and wall seconds."""
    lines, wall = [], 0.0
    for row in rows:
        wall += row["epoch_time_s"]
        epoch = int(row["epoch"])
        lines.append({"event": "epoch", "epoch": epoch, "iterations": (epoch + 1) * iterations_per_epoch,
                      "wall_s": wall, "val_accuracy": row["val_accuracy_mean"],
                      "train_accuracy": row["train_accuracy_mean"], "train_loss": row["train_loss_mean"]})
    return lines


def report(config: ExperimentConfig, thresholds: list[float], total_wall_s: float,
           config_file: Optional[str], overrides: list[str]) -> list[dict[str, Any]]:
    """Every JSON line of a finished run, in order: epochs with the thresholds they crossed, the thresholds
    never reached, the test."""
    folder = config.experiment_folder
    epochs = epoch_lines(read_epoch_rows(folder), config.total_iter_per_epoch)
    crossings = threshold_crossings(epochs, thresholds)
    lines = []
    for epoch in epochs:
        lines.append(epoch)
        lines += [line for line in crossings if line["epoch"] == epoch["epoch"]]
    lines += [line for line in crossings if not line["reached"]]
    summary = read_summary(ExperimentPaths(folder).test_summary())
    lines.append({
        "event": "test", "config": config_file, "overrides": overrides, "experiment_folder": str(folder),
        "dataset": summary["dataset"], "ways": summary["ways"], "shots": summary["shots"],
        "num_test_tasks": summary["num_test_tasks"], "models": len(summary["models"]),
        "ensemble_test_accuracy": summary["ensemble_test_accuracy"],
        "ensemble_test_confidence_95": summary["ensemble_test_confidence_95"],
        "best_single_model_epoch": summary["best_single_model_epoch"],
        "best_single_model_test_accuracy": summary["best_single_model_test_accuracy"],
        "best_single_model_test_confidence_95": summary["best_single_model_test_confidence_95"],
        "best_val_accuracy": max(line["val_accuracy"] for line in epochs),
        "epochs": len(epochs), "iterations": epochs[-1]["iterations"],
        "train_val_wall_s": epochs[-1]["wall_s"], "test_wall_s": summary["test_time_s"], "total_wall_s": total_wall_s})
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a config and report when validation accuracy first reaches each threshold.",
        epilog="Any config key can be given as --KEY VALUE, as for train_maml_system.py.",
        allow_abbrev=False)  # --KEY options are the config's, never abbreviations of these
    parser.add_argument("config", help="experiment config (JSON or YAML)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS),
                        help="validation accuracies, as fractions (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    args, overrides = parser.parse_known_args(argv)
    training_argv = ["--name_of_args_json_file", args.config] + overrides
    try:
        config = parse_command_line(training_argv)
        check_timeable(config, args.thresholds)
        decode_into_cache(config)
    except (ConfigError, DatasetError, BenchmarkError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON lines only
        code = train_maml_system.main(training_argv)
    total_wall_s = time.perf_counter() - started
    if code != 0:
        return code  # the training script has said why

    lines = [json.dumps(line) for line in report(config, args.thresholds, total_wall_s, args.config, overrides)]
    print("\n".join(lines), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as handle:
            handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
