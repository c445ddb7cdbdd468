"""Non-finite losses and gradients: skip the meta-update, count, give up after too many in a row.

One NaN gradient step would turn every weight and Adam moment into NaN for the rest of the run, so
such an iteration is skipped instead. A run that keeps producing them has diverged; stopping it
keeps the last good checkpoint rather than training on garbage for days.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor


class TrainingDiverged(RuntimeError):
    """Too many meta-iterations in a row had a non-finite loss or gradient."""


def poison_gradients_if_nonfinite(losses: Tensor, parameters: Iterable[Tensor]) -> None:
    """Make the gradients non-finite when a loss is, without a host sync: 0 * loss is 0 or NaN.

    A non-finite loss can come with finite gradients (cross-entropy of a label whose probability
    underflows to 0); folded into the gradients, it reaches every rank through their all-reduce.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        grads[0].view(-1)[:1].add_(0.0 * losses.detach().sum().to(grads[0].dtype))


def finiteness_probe(parameters: Iterable[Tensor]) -> Tensor:
    """A number that is finite exactly when every gradient entry is finite (their total norm).

    It stays on the device, so the caller reads it in the same host sync as its metrics.
    """
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # One grouped kernel per device and dtype instead of one norm per parameter (the weights are float32).
    return torch.stack(torch._foreach_norm(grads)).norm()


def count_skipped(in_a_row: int, skipped: bool, iteration: int, limit: int, checkpoint: Path) -> int:
    """The number of skipped iterations in a row up to `iteration`; raises TrainingDiverged at `limit`."""
    if not skipped:
        return 0
    in_a_row += 1
    if in_a_row >= limit:
        first = iteration - in_a_row + 1
        raise TrainingDiverged(
            f"meta-iteration {iteration}: the loss or the gradients were not finite for {in_a_row} iterations in "
            f"a row ({first} to {iteration}; max_consecutive_nonfinite_iterations is {limit}), so training "
            f"stopped without saving. The last good checkpoint, {checkpoint}, is untouched. Lower "
            f"meta_learning_rate or init_inner_loop_learning_rate (resuming with the same config repeats these "
            f"iterations exactly), then rerun with --continue_from_epoch latest")
    return in_a_row
