"""A results table of every finished experiment, laid out like the tables of the papers.

    python utils/summarize_results.py experiments/ [--out DIR]

A finished experiment is a folder holding `test_summary.json` (written by the ensemble test). For
each one the table gives the dataset, ways, shots, the method (from its `config.yaml`), the ensemble
and best-single-model test accuracy +- the 95% confidence interval, the epochs trained, the training
wall time (the sum of `epoch_time_s` in `logs/summary_statistics.csv`: training and validation,
not the test), and one column per cross-domain test set (`test_summary_DATASET.json`). The table is
printed, and written as `results.md` and `results.csv` into the scanned folder (or --out).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as `python utils/summarize_results.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.config import ConfigError, read_config_file
from utils.storage import atomic_write_text, write_csv

SUMMARY_FILE = "test_summary.json"
# Any of these on makes a run MAML++ rather than MAML (CxGrad wins over both).
MAML_PLUS_PLUS_KEYS = ("use_multi_step_loss_optimization", "learnable_per_layer_per_step_inner_loop_learning_rate",
                       "per_step_bn_statistics")


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
        return read_config_file(folder / "config.yaml")
    except (ConfigError, OSError):
        return None


def read_epoch_rows(folder: Path) -> list[dict[str, float]]:
    """`logs/summary_statistics.csv` as floats; [] when the experiment has none."""
    path = folder / "logs" / "summary_statistics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def _read_summary(path: Path) -> dict[str, Any]:
    summary = json.loads(path.read_text())
    missing = [key for key in ("dataset", "ways", "shots", "ensemble_test_accuracy", "ensemble_test_confidence_95",
                               "best_single_model_test_accuracy", "best_single_model_test_confidence_95")
               if key not in summary]
    if missing:
        raise KeyError(", ".join(missing))
    return summary


def experiment_result(folder: Path) -> dict[str, Any]:
    """One row of the table; raises ValueError/KeyError/OSError when the summary cannot be read."""
    summary = _read_summary(folder / SUMMARY_FILE)
    config = read_experiment_config(folder)
    epochs = read_epoch_rows(folder)
    row = {"experiment": folder.name, "dataset": summary["dataset"], "ways": summary["ways"],
           "shots": summary["shots"], "method": method_name(config) if config is not None else "unknown",
           "ensemble_test_accuracy": summary["ensemble_test_accuracy"],
           "ensemble_test_confidence_95": summary["ensemble_test_confidence_95"],
           "best_single_model_test_accuracy": summary["best_single_model_test_accuracy"],
           "best_single_model_test_confidence_95": summary["best_single_model_test_confidence_95"],
           "epochs": len(epochs), "wall_time_s": sum(row["epoch_time_s"] for row in epochs),
           "cross_domain": {}}
    for path in sorted(folder.glob("test_summary_*.json")):
        cross = _read_summary(path)
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
    return sorted(results, key=lambda r: (r["dataset"], r["ways"], r["shots"], r["method"], r["experiment"]))


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _accuracy(mean: float, interval: float) -> str:
    return f"{100 * mean:.2f} +- {100 * interval:.2f}"


def cross_domain_datasets(results: list[dict[str, Any]]) -> list[str]:
    return sorted({name for result in results for name in result["cross_domain"]})


def markdown_table(results: list[dict[str, Any]]) -> str:
    crosses = cross_domain_datasets(results)
    header = (["experiment", "dataset", "ways", "shots", "method", "ensemble test acc. (%)", "best single model (%)",
               "epochs", "wall time"] + [f"-> {name} (ensemble, %)" for name in crosses])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["experiment"], r["dataset"], str(r["ways"]), str(r["shots"]), r["method"],
                 _accuracy(r["ensemble_test_accuracy"], r["ensemble_test_confidence_95"]),
                 _accuracy(r["best_single_model_test_accuracy"], r["best_single_model_test_confidence_95"]),
                 str(r["epochs"]), format_duration(r["wall_time_s"]) if r["epochs"] else ""]
        cells += [_accuracy(*r["cross_domain"][name]) if name in r["cross_domain"] else "" for name in crosses]
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
    out = args.out or args.folder
    atomic_write_text(out / "results.md", table)
    write_csv(out / "results.csv", csv_rows(results))
    print(table, end="")
    print(f"wrote {out / 'results.md'} and {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
