"""What the inner loop does: each inner-loop parameter's gradient norm per step, and CxGrad's gamma.

CxGrad's argument is about these numbers (CXGRAD.md, "The problem it addresses"): in MAML the head's
inner-loop gradient dwarfs the backbone's and deep layers get less than shallow ones; CxGrad's gamma
rescales each conv layer's gradient task by task. With `log_inner_loop_statistics` on:

- `InnerLoopRecorder` collects them inside `MAMLFewShotClassifier.inner_loop` as detached tensors on
  the model's device (no host synchronisation per step), stacked once per call into
  `InnerLoopStatistics`;
- `InnerLoopStatisticsLog` averages them over all training tasks of an epoch and writes
  `logs/inner_loop_statistics.csv`, one row per (epoch, inner step, quantity, parameter):
      grad_norm          Frobenius norm of the support-loss gradient of `parameter` (mean, std over tasks)
      gamma              CxGrad's gamma of the conv layer whose weight is `parameter` (mean, std over tasks)
      query_step_weight  the weight of the query loss after this step (MSL's importance vector); std 0
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from utils.checkpoints import CheckpointError
from utils.storage import write_csv

COLUMNS = ("epoch", "step", "quantity", "parameter", "mean", "std")


@dataclass
class InnerLoopStatistics:
    """One inner loop over T tasks, detached."""

    parameter_names: list[str]
    grad_norms: Tensor  # [steps, parameters, T]
    layer_names: list[str]  # the conv weights CxGrad rescales; empty without CxGrad
    gammas: Optional[Tensor]  # [steps, layers, T], or None without CxGrad

    @staticmethod
    def concatenate(parts: Sequence["InnerLoopStatistics"]) -> "InnerLoopStatistics":
        """The tasks of several inner loops (the chunks of one meta-batch) as one."""
        first = parts[0]
        if len(parts) == 1:  # the batched path: one inner loop already holds every task
            return first
        gammas = None if first.gammas is None else torch.cat([part.gammas for part in parts], dim=-1)
        return InnerLoopStatistics(first.parameter_names, torch.cat([part.grad_norms for part in parts], dim=-1),
                                   first.layer_names, gammas)


class InnerLoopRecorder:
    """Filled step by step by the inner loop; `result()` stacks the steps once at the end."""

    def __init__(self, parameter_names: Sequence[str], layer_names: Sequence[str]):
        self.parameter_names = list(parameter_names)
        self.layer_names = list(layer_names)
        self._grad_norms: list[Tensor] = []
        self._gammas: list[Tensor] = []

    def record_step(self, grads: Sequence[Tensor], gamma: Optional[Tensor]) -> None:
        """`grads`: one per-task gradient [T, ...] per parameter; `gamma`: CxGrad's [T, layers] or None."""
        # Norms in float32 whatever the gradients' precision; one small reduction per parameter.
        self._grad_norms.append(torch.stack([
            torch.linalg.vector_norm(grad.detach().flatten(1), dim=1, dtype=torch.float32) for grad in grads]))
        if gamma is not None:
            self._gammas.append(gamma.detach().float().transpose(0, 1))

    def result(self) -> InnerLoopStatistics:
        gammas = torch.stack(self._gammas) if self._gammas else None
        return InnerLoopStatistics(self.parameter_names, torch.stack(self._grad_norms), self.layer_names, gammas)


class _RunningMoments:
    """Sum and sum of squares over tasks, kept on the device until the epoch ends."""

    def __init__(self) -> None:
        self.total: Optional[Tensor] = None
        self.squares: Optional[Tensor] = None
        self.count = 0

    def add(self, values: Tensor) -> None:  # [..., T]
        values = values.double()
        total, squares = values.sum(dim=-1), values.square().sum(dim=-1)
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += values.shape[-1]

    def mean_and_std(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.total.cpu().numpy() / self.count
        variance = np.maximum(self.squares.cpu().numpy() / self.count - mean ** 2, 0.0)
        return mean, np.sqrt(variance)


class InnerLoopStatisticsLog:
    """Per-epoch means and spreads over the training tasks, rewritten atomically after every epoch.

    A resumed run keeps the rows of the epochs before the one it resumes at, as
    `summary_statistics.csv` does.
    """

    def __init__(self, path: Path, first_epoch: int):
        self.path = path
        self.rows = [row for row in read_statistics(path) if int(row["epoch"]) < first_epoch]
        self._start_epoch()

    def _start_epoch(self) -> None:
        self._parameter_names: list[str] = []
        self._layer_names: list[str] = []
        self._grad_norms = _RunningMoments()
        self._gammas = _RunningMoments()

    def add(self, statistics: InnerLoopStatistics) -> None:
        self._parameter_names, self._layer_names = statistics.parameter_names, statistics.layer_names
        self._grad_norms.add(statistics.grad_norms)
        if statistics.gammas is not None:
            self._gammas.add(statistics.gammas)

    def end_epoch(self, epoch: int, query_step_weights: np.ndarray) -> list[dict]:
        """Write this epoch's rows (after the earlier epochs') and return them."""
        rows = []
        for step, weight in enumerate(query_step_weights):
            rows.append(_row(epoch, step, "query_step_weight", "", float(weight), 0.0))
        if self._parameter_names:
            rows += _rows(epoch, "grad_norm", self._parameter_names, *self._grad_norms.mean_and_std())
            if self._layer_names:
                rows += _rows(epoch, "gamma", self._layer_names, *self._gammas.mean_and_std())
        rows.sort(key=lambda row: row["step"])  # step-major, like the inner loop
        self.rows += rows
        write_csv(self.path, self.rows)
        self._start_epoch()
        return rows


def _row(epoch: int, step: int, quantity: str, parameter: str, mean: float, std: float) -> dict:
    return {"epoch": epoch, "step": step, "quantity": quantity, "parameter": parameter, "mean": mean, "std": std}


def _rows(epoch: int, quantity: str, names: list[str], mean: np.ndarray, std: np.ndarray) -> list[dict]:
    return [_row(epoch, step, quantity, name, float(mean[step, index]), float(std[step, index]))
            for step in range(mean.shape[0]) for index, name in enumerate(names)]


def read_statistics(path: Path) -> list[dict]:
    """The rows of an `inner_loop_statistics.csv`, typed; [] when it does not exist."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise CheckpointError(
                f"{path} is not an inner-loop statistics log of this project (columns {reader.fieldnames}, "
                f"expected {list(COLUMNS)}); move it away to start a fresh one")
        try:
            return [{"epoch": int(row["epoch"]), "step": int(row["step"]), "quantity": row["quantity"],
                     "parameter": row["parameter"], "mean": float(row["mean"]), "std": float(row["std"])}
                    for row in reader]
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{path} line {reader.line_num} cannot be read ({error}); "
                                  f"move the file away to start a fresh one") from None
