"""Figures of experiments: learning curves, inner-loop gradient norms per layer, CxGrad's gamma, MSL weights.

    python utils/plot_experiment.py experiments/EXPERIMENT [--compare experiments/OTHER ...] [--out DIR]

Writes into --out (default: EXPERIMENT/plots), one column of panels per experiment where it compares:
    learning_curves.png  train and validation accuracy and loss per epoch (logs/summary_statistics.csv)
    gradient_norms.png   each layer's inner-loop gradient norm (log scale): over the epochs (mean over the
                         inner steps), and per inner step in the last epoch
    gamma.png            CxGrad's gamma per layer over the epochs, mean +- std over tasks (CxGrad runs only)
    msl_importance.png   the weight of the query loss after each inner step over the epochs (MAML++'s MSL)
The last three read logs/inner_loop_statistics.csv, which training writes with log_inner_loop_statistics
on; they are drawn for the experiments that have it, and the script says which figures or experiments
it left out and why. It also prints each layer's gradient norm in the last epoch and the backbone's
share of them. Exit status 2 only when an experiment has no finished epoch or cannot be read.
"""
from __future__ import annotations

import argparse
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as `python utils/plot_experiment.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from utils.checkpoints import CheckpointError  # noqa: E402
from utils.experiment_paths import ExperimentPaths  # noqa: E402
from utils.inner_loop_statistics import read_statistics  # noqa: E402
from utils.storage import atomic_write_bytes  # noqa: E402
from utils.summarize_results import method_name, read_epoch_rows, read_experiment_config  # noqa: E402

PANEL_INCHES = (5.0, 4.0)  # width, height of one panel
DPI = 100
HEAD = "head"
INNER_LOOP_FIGURES = ("gradient_norms.png", "gamma.png", "msl_importance.png")


class PlotError(RuntimeError):
    """An experiment folder lacks the logs a figure needs."""


@dataclass
class Experiment:
    folder: Path
    method: str
    epoch_rows: list[dict[str, float]]  # logs/summary_statistics.csv
    inner_loop_rows: Optional[list[dict]]  # logs/inner_loop_statistics.csv; None when it was not recorded

    @property
    def title(self) -> str:
        return f"{self.folder.name} ({self.method})"


def load_experiment(folder: Path) -> Experiment:
    if not folder.is_dir():
        raise PlotError(f"no experiment folder {folder}")
    paths = ExperimentPaths(folder)
    try:
        epoch_rows = read_epoch_rows(folder)
    except ValueError as error:
        raise PlotError(f"{paths.summary_statistics} cannot be read ({error})") from None
    if not epoch_rows:
        raise PlotError(f"{folder} has no {paths.summary_statistics.relative_to(folder)}: no epoch of it has "
                        f"finished yet (train it with python train_maml_system.py --name_of_args_json_file CONFIG)")
    config = read_experiment_config(folder)
    statistics_path = paths.inner_loop_statistics
    inner_loop_rows = read_statistics(statistics_path) if statistics_path.is_file() else None
    return Experiment(folder, method_name(config) if config is not None else "unknown", epoch_rows, inner_loop_rows)


# ---------------------------------------------------------------------- the statistics as arrays
def pivot(rows: list[dict], quantity: str, field: str = "mean") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The epochs, and per parameter an [epochs, steps] array of `field` of `quantity` (NaN where missing)."""
    chosen = [row for row in rows if row["quantity"] == quantity]
    epochs = sorted({row["epoch"] for row in chosen})
    steps = 1 + max((row["step"] for row in chosen), default=-1)
    position = {epoch: index for index, epoch in enumerate(epochs)}
    table: dict[str, np.ndarray] = {}
    for row in chosen:
        values = table.setdefault(row["parameter"], np.full((len(epochs), steps), np.nan))
        values[position[row["epoch"]], row["step"]] = row[field]
    return np.asarray(epochs), table


def layer_label(parameter: str) -> Optional[str]:
    """A conv weight's label, counted from 1: 'conv1'... for 4-CONV, 'b1.conv1'... and 'b1.shortcut' for
    ResNet-12's blocks; 'head' for the linear weight; None for biases and BatchNorm."""
    match = re.fullmatch(r"layer(\d+)\.conv\.weight", parameter)
    if match:
        return f"conv{int(match.group(1)) + 1}"
    match = re.fullmatch(r"block(\d+)\.(?:layer(\d+)|shortcut)\.conv\.weight", parameter)
    if match:
        block, unit = match.groups()
        return f"b{int(block) + 1}." + (f"conv{int(unit) + 1}" if unit is not None else "shortcut")
    return HEAD if parameter == "linear.weight" else None


def layer_gradient_norms(rows: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The epochs, and per layer ('conv1', ..., 'head') its mean gradient norm per [epoch, step]."""
    epochs, table = pivot(rows, "grad_norm")
    layers = {layer_label(name): values for name, values in table.items() if layer_label(name)}
    return epochs, dict(sorted(layers.items(), key=lambda item: (item[0] == HEAD, item[0])))


def backbone_share(last_epoch_norms: dict[str, float]) -> float:
    """The conv layers' part of the summed per-layer gradient norms: how much of the adaptation reaches features."""
    backbone = sum(value for layer, value in last_epoch_norms.items() if layer != HEAD)
    return backbone / (backbone + last_epoch_norms[HEAD])


# ---------------------------------------------------------------------- figures
def _figure(rows: int, columns: int, **options):
    return plt.subplots(rows, columns, figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows), dpi=DPI,
                        squeeze=False, layout="constrained", **options)


def _save(figure, path: Path) -> Path:
    for axis in figure.axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and steps are whole numbers
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    print(f"wrote {path}")
    return path


def _skipped(what: str, reason: str) -> None:
    """Say on stderr what was not drawn and why, so a missing figure is never a silent surprise."""
    print(f"{what} skipped: {reason}", file=sys.stderr)


def _layer_colours(layers: list[str]) -> dict[str, tuple]:
    convs = [layer for layer in layers if layer != HEAD]
    colours = {layer: plt.cm.viridis(index / max(len(convs) - 1, 1) * 0.85) for index, layer in enumerate(convs)}
    colours[HEAD] = "tab:red"
    return colours


def plot_learning_curves(experiments: list[Experiment], path: Path) -> Path:
    figure, axes = _figure(1, 2)
    for index, experiment in enumerate(experiments):
        colour = f"C{index}"
        epochs = [row["epoch"] for row in experiment.epoch_rows]
        name = experiment.folder.name if len(experiments) > 1 else ""
        for axis, metric in zip(axes[0], ("accuracy", "loss")):
            for split, style in (("train", "-"), ("val", "--")):
                values = [row[f"{split}_{metric}_mean"] for row in experiment.epoch_rows]
                axis.plot(epochs, values, style, marker="o", markersize=3, color=colour,
                          label=f"{name} {split}".strip())
    for axis, metric in zip(axes[0], ("accuracy", "loss")):
        axis.set(title=f"{metric} per epoch", xlabel="epoch", ylabel=f"mean {metric} over tasks")
        axis.legend(fontsize="small")
    figure.suptitle("Learning curves: " + ", ".join(e.title for e in experiments), fontsize="medium")
    return _save(figure, path)


def plot_gradient_norms(experiments: list[Experiment], path: Path) -> Path:
    figure, axes = _figure(2, len(experiments), sharey="row")
    for column, experiment in enumerate(experiments):
        epochs, layers = layer_gradient_norms(experiment.inner_loop_rows)
        colours = _layer_colours(list(layers))
        over_epochs, per_step = axes[0, column], axes[1, column]
        for layer, values in layers.items():
            over_epochs.plot(epochs, np.nanmean(values, axis=1), marker="o", markersize=3, color=colours[layer],
                             label=layer)
            per_step.plot(np.arange(values.shape[1]), values[-1], marker="o", color=colours[layer], label=layer)
        over_epochs.set(title=f"{experiment.title}\nmean over the inner steps", xlabel="epoch",
                        ylabel="inner-loop gradient norm (Frobenius)", yscale="log")
        per_step.set(title=f"per inner step, epoch {int(epochs[-1])}", xlabel="inner step",
                     ylabel="inner-loop gradient norm (Frobenius)", yscale="log")
        for axis in (over_epochs, per_step):
            axis.legend(fontsize="small")
    figure.suptitle("Inner-loop gradient norm of each layer (mean over the training tasks)", fontsize="medium")
    return _save(figure, path)


def plot_gamma(experiments: list[Experiment], path: Path) -> Optional[Path]:
    cxgrad = [e for e in experiments if any(row["quantity"] == "gamma" for row in e.inner_loop_rows)]
    if not cxgrad:
        _skipped(path.name, "no CxGrad run among them (contextual_grad off), so no gamma")
        return None
    figure, axes = _figure(1, len(cxgrad), sharey="row")
    for axis, experiment in zip(axes[0], cxgrad):
        epochs, means = pivot(experiment.inner_loop_rows, "gamma")
        _, stds = pivot(experiment.inner_loop_rows, "gamma", "std")
        labels = {name: layer_label(name) or name for name in means}
        colours = _layer_colours(list(labels.values()))
        for name, mean in means.items():
            # Pool the steps: the spread over every (task, step) of the epoch.
            overall = np.nanmean(mean, axis=1)
            spread = np.sqrt(np.maximum(np.nanmean(stds[name] ** 2 + mean ** 2, axis=1) - overall ** 2, 0.0))
            colour = colours[labels[name]]
            axis.plot(epochs, overall, marker="o", markersize=3, color=colour, label=labels[name])
            axis.fill_between(epochs, overall - spread, overall + spread, color=colour, alpha=0.2)
        axis.set(title=experiment.title, xlabel="epoch", ylabel="gamma (mean +- std over tasks and steps)")
        axis.legend(fontsize="small")
    figure.suptitle("CxGrad: gamma per conv layer (its weight's norm)", fontsize="medium")
    return _save(figure, path)


def plot_msl_importance(experiments: list[Experiment], path: Path) -> Path:
    figure, axes = _figure(1, len(experiments), sharey="row")
    for axis, experiment in zip(axes[0], experiments):
        epochs, table = pivot(experiment.inner_loop_rows, "query_step_weight")
        weights = table[""]
        for step in range(weights.shape[1]):
            axis.plot(epochs, weights[:, step], marker="o", markersize=3, label=f"step {step}")
        axis.set(title=experiment.title, xlabel="epoch", ylabel="weight of the query loss after the step",
                 ylim=(-0.02, 1.02))
        axis.legend(fontsize="small")
    figure.suptitle("Per-step importance of the query loss (MSL; last step only when MSL is off)",
                    fontsize="medium")
    return _save(figure, path)


def print_gradient_norm_summary(experiments: list[Experiment]) -> None:
    """Per experiment: the last epoch's gradient norm per layer and backbone share (the first epoch's share
    too), and for CxGrad each conv layer's gamma and gradient norm / gamma (its relative step)."""
    for experiment in experiments:
        epochs, layers = layer_gradient_norms(experiment.inner_loop_rows)
        last = {layer: float(np.nanmean(values[-1])) for layer, values in layers.items()}
        first = {layer: float(np.nanmean(values[0])) for layer, values in layers.items()}
        norms = "  ".join(f"{layer} {value:.4g}" for layer, value in last.items())
        print(f"{experiment.title}, epoch {int(epochs[-1])}, gradient norm per layer (mean over inner steps): "
              f"{norms}; backbone share {100 * backbone_share(last):.1f}% "
              f"(epoch {int(epochs[0])}: {100 * backbone_share(first):.1f}%)")
        _, gammas = pivot(experiment.inner_loop_rows, "gamma")
        if gammas:
            last_gamma = {layer_label(name): float(np.nanmean(values[-1])) for name, values in gammas.items()}
            relative = "  ".join(f"{layer} {gamma:.4g} ({last[layer] / gamma:.3g})"
                                 for layer, gamma in last_gamma.items())
            print(f"{experiment.title}, epoch {int(epochs[-1])}, gamma per conv layer (gradient norm / gamma): "
                  f"{relative}")


def plot_experiments(folders: list[Path], out: Optional[Path] = None) -> list[Path]:
    """Write every figure the experiments' logs allow and say which were left out and why.

    PlotError only when an experiment cannot be plotted at all (no folder, no finished epoch).
    """
    experiments = [load_experiment(folder) for folder in folders]
    out = out or ExperimentPaths(experiments[0].folder).plots
    written = [plot_learning_curves(experiments, out / "learning_curves.png")]
    recorded = [e for e in experiments if e.inner_loop_rows]  # an empty log (no epoch yet) has nothing to draw
    unrecorded = [str(e.folder) for e in experiments if not e.inner_loop_rows]
    if unrecorded:
        figures = ", ".join(INNER_LOOP_FIGURES)
        statistics_name = ExperimentPaths(Path()).inner_loop_statistics
        _skipped(figures if not recorded else f"{', '.join(unrecorded)} in {figures}",
                 f"no inner-loop statistics ({statistics_name}) in {', '.join(unrecorded)}: they are recorded "
                 f"only with log_inner_loop_statistics on; train with --log_inner_loop_statistics true (a resumed "
                 f"run records from its next epoch on)")
    if recorded:
        written.append(plot_gradient_norms(recorded, out / "gradient_norms.png"))
        written.append(plot_gamma(recorded, out / "gamma.png"))
        written.append(plot_msl_importance(recorded, out / "msl_importance.png"))
        print_gradient_norm_summary(recorded)
    return [path for path in written if path is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot the logs of an experiment (and compare it with others).")
    parser.add_argument("experiment", type=Path, help="experiment folder, e.g. experiments/NAME")
    parser.add_argument("--compare", type=Path, nargs="+", default=[], metavar="OTHER",
                        help="more experiment folders, drawn side by side")
    parser.add_argument("--out", type=Path, default=None, help="where the PNGs go (default: EXPERIMENT/plots)")
    args = parser.parse_args(argv)
    try:
        plot_experiments([args.experiment, *args.compare], args.out)
    except (PlotError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
