"""A results table of every finished experiment, laid out like the tables of the papers.

    python utils/summarize_results.py experiments/ [--out DIR]

A finished experiment is a folder holding `test_summary.json` (written by the ensemble test). For
each one the table gives the dataset, ways, shots, the method (from its `config.yaml`), the ensemble
and best-single-model test accuracy +- the 95% confidence interval, the best validation accuracy +- its
95% confidence interval and its epoch (from `logs/summary_statistics.csv`: 1.96 * the std over the
`num_evaluation_tasks` validation tasks / their square root, as the test's), the epochs trained, the training
wall time (the sum of `epoch_time_s` in `logs/summary_statistics.csv`: training and validation,
not the test), the ensemble test's wall time (`test_time_s` in the summary; blank for summaries written
before it was logged), and one column per cross-domain test set (`test_summary_DATASET.json`). The table is
printed, and written as `results.md` and `results.csv` into the scanned folder (or --out). A run is named by
its folder, or by its path under the scanned folder where folders share a name (omniglot_twins.py's layout).

Experiments that trained at least one epoch but have no `test_summary.json` yet (still training, paused, or
run with the test left out) get a table of their own in `results.md`, with the same validation columns and
the last epoch's validation accuracy, so that a run's progress is read with the command that prints it;
they are not in `results.csv`, whose rows are tested runs.

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
import math
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
    """`logs/summary_statistics.csv` as floats, a blank cell left out of its row; [] when the experiment has none."""
    path = ExperimentPaths(folder).summary_statistics
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(handle)]


def best_validation(epochs: list[dict[str, float]], config: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The epoch of highest validation accuracy: `best_val_accuracy`, `best_val_confidence_95` (1.96 * std / sqrt of
    the number of validation tasks, as the test's interval), `best_val_epoch` (0-based, as in the CSV), and
    `last_val_accuracy`; all "" when no epoch logged a validation accuracy."""
    logged = [row for row in epochs if "val_accuracy_mean" in row]
    if not logged:
        return dict.fromkeys(("best_val_accuracy", "best_val_confidence_95", "best_val_epoch", "last_val_accuracy"), "")
    best = max(logged, key=lambda row: row["val_accuracy_mean"])  # the earliest of equal epochs
    tasks = int((config or {}).get("num_evaluation_tasks", FIELDS["num_evaluation_tasks"].default))
    interval = 1.96 * best["val_accuracy_std"] / math.sqrt(tasks) if "val_accuracy_std" in best else ""
    return {"best_val_accuracy": best["val_accuracy_mean"], "best_val_confidence_95": interval,
            "best_val_epoch": int(best["epoch"]), "last_val_accuracy": logged[-1]["val_accuracy_mean"]}


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
    row = {"experiment": folder.name, "_folder": folder, "dataset": summary["dataset"], "ways": summary["ways"],
           "shots": summary["shots"], "method": method_name(config) if config is not None else "unknown",
           "ensemble_test_accuracy": summary["ensemble_test_accuracy"],
           "ensemble_test_confidence_95": summary["ensemble_test_confidence_95"],
           "best_single_model_test_accuracy": summary["best_single_model_test_accuracy"],
           "best_single_model_test_confidence_95": summary["best_single_model_test_confidence_95"],
           **best_validation(epochs, config),
           "epochs": len(epochs), "wall_time_s": sum(row["epoch_time_s"] for row in epochs),
           "test_time_s": summary.get("test_time_s", ""),
           "seed": seeds[0] if seeds else "", "cross_domain": {},
           "_replicate": ((experiment, len(epochs)), seeds)}  # popped by group_over_seeds
    for path in ExperimentPaths(folder).cross_domain_summaries():
        cross = read_summary(path)
        row["cross_domain"][cross["dataset"]] = (cross["ensemble_test_accuracy"], cross["ensemble_test_confidence_95"])
    return row


def experiment_folders(root: Path) -> list[Path]:
    """Every folder under `root` (itself included) that holds a test summary or a run's
    `logs/summary_statistics.csv`, sorted: one walk of the tree, shared by both tables and their names."""
    if not root.is_dir():
        raise ResultsError(f"{root} is not a folder; give the folder holding the experiments, e.g. experiments/")
    tested = {path.parent for path in root.rglob(SUMMARY_FILE)}
    trained = {path.parent.parent for path in root.rglob(ExperimentPaths(root).summary_statistics.name)
               if ExperimentPaths(path.parent.parent).summary_statistics == path}
    return sorted(tested | trained)


def name_by_path(results: list[dict[str, Any]], root: Path, folders: list[Path]) -> None:
    """Name each run by its folder, or by its path under `root` where experiment folders share a name (e.g. the
    `omniglot_20way_5shot_CxGrad` inside each of omniglot_twins.py's --out folders), tested or not, so that the
    rows of both tables tell apart."""
    counts: dict[str, int] = {}
    for folder in folders:
        counts[folder.name] = counts.get(folder.name, 0) + 1
    for result in results:
        folder = result.pop("_folder")
        if counts.get(result["experiment"], 0) > 1:
            result["experiment"] = folder.relative_to(root).as_posix()


def collect_results(root: Path, folders: list[Path]) -> list[dict[str, Any]]:
    """The finished experiments among `folders` (from experiment_folders(root)), sorted; unreadable ones are
    reported and skipped."""
    results = []
    for folder in folders:
        if not ExperimentPaths(folder).test_summary().is_file():
            continue
        try:
            results.append(experiment_result(folder))
        except (OSError, ValueError, KeyError) as error:
            print(f"warning: skipped {folder}: {SUMMARY_FILE} or a file beside it cannot be "
                  f"read ({type(error).__name__}: {error})", file=sys.stderr)
    name_by_path(results, root, folders)
    results.sort(key=lambda r: (r["dataset"], r["ways"], r["shots"], r["method"], r["experiment"]))
    group_over_seeds(results)
    return results


def untested_result(folder: Path) -> dict[str, Any]:
    """A row of the table of runs without a test: what the config says the run is, and its validation so far."""
    config = read_experiment_config(folder)
    settings = config or {}
    epochs = read_epoch_rows(folder)
    return {"experiment": folder.name, "_folder": folder, "dataset": settings.get("dataset_name", ""),
            "ways": settings.get("num_classes_per_set", ""), "shots": settings.get("num_samples_per_class", ""),
            "method": method_name(config) if config is not None else "unknown", **best_validation(epochs, config),
            "epochs": len(epochs), "wall_time_s": sum(row.get("epoch_time_s", 0.0) for row in epochs)}


def collect_untested(root: Path, folders: list[Path]) -> list[dict[str, Any]]:
    """The experiments among `folders` that trained at least one epoch and have no `test_summary.json`, sorted."""
    results = []
    for folder in folders:
        paths = ExperimentPaths(folder)
        if paths.test_summary().is_file() or not paths.summary_statistics.is_file():
            continue  # a tested run (in the main table), or a test summary without logs
        try:
            row = untested_result(folder)
        except (OSError, ValueError, KeyError) as error:
            print(f"warning: skipped {folder}: {paths.summary_statistics.name} cannot be read "
                  f"({type(error).__name__}: {error})", file=sys.stderr)
            continue
        if row["epochs"]:
            results.append(row)
    name_by_path(results, root, folders)
    # Ways and shots are "" for a run without a readable config: those sort first.
    results.sort(key=lambda r: (str(r["dataset"]), r["ways"] or 0, r["shots"] or 0, r["method"], r["experiment"]))
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


def _validation(result: dict[str, Any]) -> str:
    """'96.90 +- 0.32 (epoch 3)', or "" for a run that logged no validation accuracy."""
    if result["best_val_accuracy"] == "":
        return ""
    accuracy, spread = result["best_val_accuracy"], result["best_val_confidence_95"]
    accuracy = _accuracy(accuracy, spread) if spread != "" else f"{100 * accuracy:.2f}"
    return f"{accuracy} (epoch {result['best_val_epoch']})"


def cross_domain_datasets(results: list[dict[str, Any]]) -> list[str]:
    return sorted({name for result in results for name in result["cross_domain"]})


def markdown_table(results: list[dict[str, Any]]) -> str:
    crosses = cross_domain_datasets(results)
    header = (["experiment", "dataset", "ways", "shots", "method", "ensemble test acc. (%)", "best single model (%)",
               "best val. acc. (%)", "epochs", "wall time", "test time"]
              + [f"-> {name} (ensemble, %)" for name in crosses])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["experiment"], r["dataset"], str(r["ways"]), str(r["shots"]), r["method"],
                 _accuracy(r["ensemble_test_accuracy"], r["ensemble_test_confidence_95"]),
                 _accuracy(r["best_single_model_test_accuracy"], r["best_single_model_test_confidence_95"]),
                 _validation(r), str(r["epochs"]), format_duration(r["wall_time_s"]) if r["epochs"] else "",
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


def untested_table(untested: list[dict[str, Any]]) -> str:
    """Markdown, one row per run that trained but has no test yet; "" when there is none."""
    if not untested:
        return ""
    header = ["experiment", "dataset", "ways", "shots", "method", "best val. acc. (%)", "last val. acc. (%)",
              "epochs", "wall time"]
    lines = ["Trained, not tested (no test_summary.json yet; the test's numbers come with it):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in untested:
        last = f"{100 * r['last_val_accuracy']:.2f}" if r["last_val_accuracy"] != "" else ""
        cells = [r["experiment"], str(r["dataset"]), str(r["ways"]), str(r["shots"]), r["method"], _validation(r),
                 last, str(r["epochs"]), format_duration(r["wall_time_s"])]
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
        folders = experiment_folders(args.folder)
    except ResultsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = collect_results(args.folder, folders)
    untested = collect_untested(args.folder, folders)
    if not results and not untested:
        print(f"error: no finished experiment under {args.folder} (a folder with {SUMMARY_FILE}, written by the "
              f"ensemble test at the end of train_maml_system.py), and none that trained an epoch", file=sys.stderr)
        return 2
    sections = [markdown_table(results), seeds_table(results)] if results else []
    sections.append(untested_table(untested))
    table = "\n".join(section for section in sections if section)
    out = args.out or args.folder
    atomic_write_text(out / "results.md", table)
    written = [out / "results.md"]
    if results:
        write_csv(out / "results.csv", csv_rows(results))
        written.append(out / "results.csv")
    print(table, end="")
    print("wrote " + " and ".join(str(path) for path in written)
          + ("" if results else " (no tested experiment: no results.csv)"))
    return 0

if __name__ == "__main__":
    sys.exit(main())
