"""A results table of every finished experiment, laid out like the tables of the papers.

    python utils/summarize_results.py experiments/ [--out DIR]

A finished experiment is a folder holding `test_summary.json` (written by the ensemble test). For
each one the table gives the dataset, ways, shots, the method (from its `config.yaml`), the ensemble
and best-single-model test accuracy +- the 95% confidence interval, the epochs trained, the training
wall time (the sum of `epoch_time_s` in `logs/summary_statistics.csv`: training and validation,
not the test), the ensemble test's wall time (`test_time_s` in the summary; blank for summaries written
before it was logged), and one column per cross-domain test set (`test_summary_DATASET.json`). The table is
printed, and written as `results.md` and `results.csv` into the scanned folder (or --out).

Runs whose configs differ only in their seeds (`seed`, `train_seed`, `val_seed`) and in bookkeeping keys
(BOOKKEEPING_KEYS: where a run is written, how fast it computes, what it logs), and that trained as many
epochs, are repeats of one experiment. Each run's CSV row gives its group (`seed_group`), the group's number
of runs (`seeds`) and of different seed triples among them (`distinct_seeds`: fewer when a run was repeated,
e.g. on another device), and the mean and sample standard deviation over them of the ensemble and
best-single-model test accuracy (the std is blank for a lone run); the markdown adds one row per group of two
or more runs.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as `python utils/summarize_results.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.config import FIELDS, ConfigError, read_config_file, value_before_key_existed
from utils.experiment_paths import ExperimentPaths
from utils.storage import atomic_write_text, write_csv

SUMMARY_FILE = ExperimentPaths.test_summary_name()  # test_summary.json: an experiment that has finished
# Any of these on makes a run MAML++ rather than MAML (CxGrad wins over both).
MAML_PLUS_PLUS_KEYS = ("use_multi_step_loss_optimization", "learnable_per_layer_per_step_inner_loop_learning_rate",
                       "per_step_bn_statistics")
# Keys that change where a run is written, how fast it computes (the same arithmetic) or what it logs, never
# what it learns: runs that differ only in these and in SEED_KEYS are repeats of one experiment.
BOOKKEEPING_KEYS = frozenset({
    "experiment_name", "experiments_dir", "datasets_dir", "device", "show_progress", "progress_interval_s",
    "distributed_timeout_s", "load_into_memory", "num_dataprovider_workers", "continue_from_epoch",
    "total_epochs_before_pause", "evaluate_on_test_set_only", "test_dataset",
    "max_consecutive_nonfinite_iterations", "log_inner_loop_statistics", "use_tensorboard", "task_batching",
    "evaluation_batch_size", "channels_last", "cudnn_benchmark", "compile_backbone", "cpu_memory_caching"})
SEED_KEYS = ("seed", "train_seed", "val_seed")
OVER_SEEDS = ("ensemble_test_accuracy", "best_single_model_test_accuracy")  # averaged over a group's runs


class ResultsError(RuntimeError):
    """Nothing to summarise."""


def method_name(config: dict[str, Any]) -> str:
    """'CxGrad', 'MAML++' or 'MAML' from a resolved config, with ' (first order)' when it was."""
    if config.get("contextual_grad"):
        name = "CxGrad"
    elif any(config.get(key) for key in MAML_PLUS_PLUS_KEYS):
        name = "MAML++"
    else:
        name = "MAML"
    return name + (" (first order)" if config.get("second_order") is False else "")


def read_experiment_config(folder: Path) -> Optional[dict[str, Any]]:
    """The experiment's resolved `config.yaml`, or None when it is missing or unreadable."""
    try:
        return read_config_file(ExperimentPaths(folder).config)
    except (ConfigError, OSError):
        return None


def replicate_identity(config: dict[str, Any]) -> tuple[str, tuple]:
    """(what the run is, which seeds it used): the config without bookkeeping keys and seeds, as text, and its
    seeds. A key missing from an older config.yaml counts as what that run trained with (an old run was
    ReLU, and standardised its input), not as today's default."""
    resolved = {key: value_before_key_existed(key) for key in FIELDS} | config
    experiment = {key: value for key, value in resolved.items() if key not in BOOKKEEPING_KEYS | set(SEED_KEYS)}
    return json.dumps(experiment, sort_keys=True, default=str), tuple(resolved[key] for key in SEED_KEYS)


def read_epoch_rows(folder: Path) -> list[dict[str, float]]:
    """`logs/summary_statistics.csv` as floats; [] when the experiment has none."""
    path = ExperimentPaths(folder).summary_statistics
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def read_summary(path: Path) -> dict[str, Any]:
    """A `test_summary*.json`; KeyError names the keys it lacks."""
    summary = json.loads(path.read_text())
    missing = [key for key in ("dataset", "ways", "shots", "ensemble_test_accuracy", "ensemble_test_confidence_95",
                               "best_single_model_test_accuracy", "best_single_model_test_confidence_95")
               if key not in summary]
    if missing:
        raise KeyError(", ".join(missing))
    return summary


def experiment_result(folder: Path) -> dict[str, Any]:
    """One row of the table; raises ValueError/KeyError/OSError when the summary cannot be read."""
    summary = read_summary(ExperimentPaths(folder).test_summary())
    config = read_experiment_config(folder)
    epochs = read_epoch_rows(folder)
    # A run without a readable config is a group of its own. Runs of one config paused after different numbers
    # of epochs (`total_epochs_before_pause` is bookkeeping) tested ensembles chosen among different epochs,
    # e.g. omniglot_twins.py's --iterations 2000 and 7000: not repeats, so the group key holds the epochs too.
    experiment, seeds = replicate_identity(config) if config is not None else (str(folder.resolve()), ())
    row = {"experiment": folder.name, "dataset": summary["dataset"], "ways": summary["ways"],
           "shots": summary["shots"], "method": method_name(config) if config is not None else "unknown",
           "ensemble_test_accuracy": summary["ensemble_test_accuracy"],
           "ensemble_test_confidence_95": summary["ensemble_test_confidence_95"],
           "best_single_model_test_accuracy": summary["best_single_model_test_accuracy"],
           "best_single_model_test_confidence_95": summary["best_single_model_test_confidence_95"],
           "epochs": len(epochs), "wall_time_s": sum(row["epoch_time_s"] for row in epochs),
           "test_time_s": summary.get("test_time_s", ""),
           "seed": seeds[0] if seeds else "", "cross_domain": {},
           "_replicate": ((experiment, len(epochs)), seeds)}  # popped by group_over_seeds
    for path in ExperimentPaths(folder).cross_domain_summaries():
        cross = read_summary(path)
        row["cross_domain"][cross["dataset"]] = (cross["ensemble_test_accuracy"], cross["ensemble_test_confidence_95"])
    return row


def collect_results(root: Path) -> list[dict[str, Any]]:
    """Every finished experiment under `root` (itself included), sorted; unreadable ones are reported and skipped."""
    if not root.is_dir():
        raise ResultsError(f"{root} is not a folder; give the folder holding the experiments, e.g. experiments/")
    results = []
    for summary_path in sorted(root.rglob(SUMMARY_FILE)):
        try:
            results.append(experiment_result(summary_path.parent))
        except (OSError, ValueError, KeyError) as error:
            print(f"warning: skipped {summary_path.parent}: {summary_path.name} or a file beside it cannot be "
                  f"read ({type(error).__name__}: {error})", file=sys.stderr)
    if not results:
        raise ResultsError(f"no finished experiment under {root} (a folder with {SUMMARY_FILE}, written by the "
                           f"ensemble test at the end of train_maml_system.py)")
    results.sort(key=lambda r: (r["dataset"], r["ways"], r["shots"], r["method"], r["experiment"]))
    group_over_seeds(results)
    return results


def group_over_seeds(results: list[dict[str, Any]]) -> None:
    """Give each run its group's number (`seed_group`), size (`seeds`), number of different seed triples
    (`distinct_seeds`), and the mean and sample std over the group of OVER_SEEDS (std "" for a lone run).
    Runs of a group that share their seeds too are reported: they still count as two runs (e.g. the same
    run on two devices, whose arithmetic differs), but not as two seeds."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for result in results:
        experiment, _ = result["_replicate"]
        groups.setdefault(experiment, []).append(result)
    for number, runs in enumerate(groups.values(), 1):
        over_seeds: dict[str, Any] = {"seed_group": number, "seeds": len(runs),
                                      "distinct_seeds": len({run["_replicate"][1] for run in runs})}
        for key in OVER_SEEDS:
            values = [run[key] for run in runs]
            over_seeds[f"{key}_mean_over_seeds"] = statistics.mean(values)
            over_seeds[f"{key}_std_over_seeds"] = statistics.stdev(values) if len(values) > 1 else ""
        seen: dict[tuple, str] = {}
        for run in runs:
            _, seeds = run.pop("_replicate")
            if seeds and seeds in seen:
                print(f"warning: {seen[seeds]} and {run['experiment']} differ only in bookkeeping keys, seeds "
                      f"included ({dict(zip(SEED_KEYS, seeds))}); both count among the {len(runs)} runs of "
                      f"their group, which has {over_seeds['distinct_seeds']} different seeds", file=sys.stderr)
            seen.setdefault(seeds, run["experiment"])
            run.update(over_seeds)


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _accuracy(mean: float, spread: float) -> str:
    return f"{100 * mean:.2f} +- {100 * spread:.2f}"


def cross_domain_datasets(results: list[dict[str, Any]]) -> list[str]:
    return sorted({name for result in results for name in result["cross_domain"]})


def markdown_table(results: list[dict[str, Any]]) -> str:
    crosses = cross_domain_datasets(results)
    header = (["experiment", "dataset", "ways", "shots", "method", "ensemble test acc. (%)", "best single model (%)",
               "epochs", "wall time", "test time"] + [f"-> {name} (ensemble, %)" for name in crosses])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["experiment"], r["dataset"], str(r["ways"]), str(r["shots"]), r["method"],
                 _accuracy(r["ensemble_test_accuracy"], r["ensemble_test_confidence_95"]),
                 _accuracy(r["best_single_model_test_accuracy"], r["best_single_model_test_confidence_95"]),
                 str(r["epochs"]), format_duration(r["wall_time_s"]) if r["epochs"] else "",
                 format_duration(r["test_time_s"]) if r["test_time_s"] != "" else ""]
        cells += [_accuracy(*r["cross_domain"][name]) if name in r["cross_domain"] else "" for name in crosses]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seeds_cell(result: dict[str, Any]) -> str:
    """'3', or '4 runs, 2 seeds' when some runs of the group repeat another's seeds."""
    if result["distinct_seeds"] == result["seeds"]:
        return str(result["seeds"])
    return f"{result['seeds']} runs, {result['distinct_seeds']} seeds"


def seeds_table(results: list[dict[str, Any]]) -> str:
    """Markdown, one row per group of two or more runs that differ only in their seeds; "" when there is none."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault(result["seed_group"], []).append(result)
    repeated = [runs for runs in groups.values() if len(runs) > 1]
    if not repeated:
        return ""
    header = ["experiments", "dataset", "ways", "shots", "method", "seeds",
              "ensemble test acc. (%, mean +- std)", "best single model (%, mean +- std)"]
    lines = ["Over seeds (runs that differ only in their seeds; std: the sample standard deviation over runs):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for runs in repeated:
        r = runs[0]
        cells = [", ".join(run["experiment"] for run in runs), r["dataset"], str(r["ways"]), str(r["shots"]),
                 r["method"], seeds_cell(r)]
        cells += [_accuracy(r[f"{key}_mean_over_seeds"], r[f"{key}_std_over_seeds"]) for key in OVER_SEEDS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows, accuracies as fractions as in the summary files; every row has every column."""
    crosses = cross_domain_datasets(results)
    rows = []
    for result in results:
        row = {key: value for key, value in result.items() if key != "cross_domain"}
        for name in crosses:
            mean, interval = result["cross_domain"].get(name, ("", ""))
            row[f"{name}_ensemble_test_accuracy"] = mean
            row[f"{name}_ensemble_test_confidence_95"] = interval
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Table of every finished experiment under a folder.")
    parser.add_argument("folder", type=Path, help="folder holding the experiment folders, e.g. experiments/")
    parser.add_argument("--out", type=Path, default=None,
                        help="where results.md and results.csv go (default: the scanned folder)")
    args = parser.parse_args(argv)
    try:
        results = collect_results(args.folder)
    except ResultsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = markdown_table(results)
    over_seeds = seeds_table(results)
    if over_seeds:
        table += "\n" + over_seeds
    out = args.out or args.folder
    atomic_write_text(out / "results.md", table)
    write_csv(out / "results.csv", csv_rows(results))
    print(table, end="")
    print(f"wrote {out / 'results.md'} and {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
