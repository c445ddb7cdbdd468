"""Optional TensorBoard scalars of an experiment (`use_tensorboard`), in EXPERIMENT/logs/tensorboard.

Per epoch: every number of the `summary_statistics.csv` row under `epoch/`, and with
`log_inner_loop_statistics` the inner-loop statistics under `inner_loop/QUANTITY/PARAMETER/stepK`.
TensorBoard is not a requirement of this project: the writer needs the `tensorboard` package.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from utils.config import ConfigError


class TensorBoardLog:
    def __init__(self, log_dir: Path, first_epoch: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("use_tensorboard is on, but the 'tensorboard' package is not installed: "
                              "pip install tensorboard, or set --use_tensorboard false") from None
        # A resumed run drops the events of the epochs it is about to redo.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=first_epoch)

    def log_epoch(self, row: dict[str, Any], inner_loop_rows: list[dict[str, Any]]) -> None:
        epoch = row["epoch"]
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        for inner in inner_loop_rows:
            parts = ["inner_loop", inner["quantity"], inner["parameter"], f"step{inner['step']}"]
            self.writer.add_scalar("/".join(part for part in parts if part), inner["mean"], epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
