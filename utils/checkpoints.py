"""The checkpoints of an experiment: what one holds, how it is saved, found, checked and loaded.

A checkpoint is one `torch.save`d dict (format 1):
    format       CHECKPOINT_FORMAT
    network      the model's state dict
    optimizer    the outer Adam's state;  scheduler  the cosine schedule's state
    rng          torch's random state (and CUDA's): task sampling has seeded generators of its own
    experiment   the experiment builder's bookkeeping (epoch rows, the epoch in progress, normalisation)
    config       the config it was trained with, for the architecture check
    world_size   how many ranks trained it (batch_size counts tasks per rank)

`CheckpointStore` keeps them in EXPERIMENT/saved_models (utils/experiment_paths.py): `train_model_latest`
after every epoch and on a signal, and `train_model_{epoch}` for the best `max_models_to_save` epochs by
validation accuracy, which the ensemble test averages. Files are written atomically (utils/storage.py),
read with `weights_only=True` (a checkpoint from elsewhere can never run code) and checked for the
format and for the architecture keys of the config (utils/config.py, `architecture=True`). A file that
cannot be read is skipped when resuming, never deleted.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from utils.config import ARCHITECTURE_KEYS, ExperimentConfig, command_line_value, value_before_key_existed
from utils.experiment_paths import ExperimentPaths
from utils.storage import atomic_write_bytes

CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = ("format", "network", "optimizer", "scheduler", "rng", "experiment", "config")

Checkpoint = dict[str, Any]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not belong to this experiment."""


def best_epochs(epoch_rows: list[dict[str, Any]], how_many: int) -> list[int]:
    """The `how_many` epochs with the best validation accuracy, best first (later epochs win ties)."""
    rows = sorted(epoch_rows, key=lambda r: (-r["val_accuracy_mean"], -r["epoch"]))
    return [row["epoch"] for row in rows[:how_many]]


def read_checkpoint(path: Path) -> Checkpoint:
    """Load with `weights_only=True` and check that it is a checkpoint of this project's format."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, foreign or not a torch file at all
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error})") from None
    if (not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT
            or any(key not in checkpoint for key in CHECKPOINT_KEYS)):
        raise CheckpointError(f"{path} is not a checkpoint of this project (format {CHECKPOINT_FORMAT})")
    return checkpoint


class CheckpointStore:
    """The `saved_models` folder of one experiment, seen from a run with `config`."""

    def __init__(self, paths: ExperimentPaths, config: ExperimentConfig):
        self.paths = paths
        self.config = config

    @property
    def folder(self) -> Path:
        return self.paths.saved_models

    @property
    def latest(self) -> Path:
        return self.paths.latest_checkpoint

    def path(self, tag: Union[int, str]) -> Path:
        return self.paths.checkpoint(tag)

    def saved_epochs(self) -> list[int]:
        return self.paths.saved_epochs()

    def resume_candidates(self) -> list[Path]:
        """The checkpoints to resume from, best first: `train_model_latest`, then the epochs newest first."""
        epochs = [self.path(epoch) for epoch in reversed(self.saved_epochs())]
        return ([self.latest] if self.latest.exists() else []) + epochs

    # ------------------------------------------------------------------ writing
    def capture(self, model: nn.Module, experiment: dict[str, Any], world_size: int) -> Checkpoint:
        """A checkpoint of `model` (with its `optimizer` and `scheduler`) and the builder's `experiment` state."""
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"format": CHECKPOINT_FORMAT, "network": model.state_dict(),
                "optimizer": model.optimizer.state_dict(), "scheduler": model.scheduler.state_dict(),
                "rng": rng, "experiment": experiment, "config": self.config.to_dict(), "world_size": world_size}

    def save_latest(self, checkpoint: Checkpoint) -> None:
        """Only `train_model_latest`: what a signal mid-epoch saves (epoch checkpoints stay whole epochs)."""
        self._write(checkpoint, self.latest)

    def save_epoch(self, checkpoint: Checkpoint, epoch: int, keep: list[int]) -> None:
        """`train_model_{epoch}` and `train_model_latest`; then delete the epoch checkpoints up to `epoch`
        that are not in `keep` (the best epochs)."""
        self._write(checkpoint, self.path(epoch), self.latest)
        for old in self.saved_epochs():
            if old not in keep and old <= epoch:
                self.path(old).unlink()

    @staticmethod
    def _write(checkpoint: Checkpoint, *paths: Path) -> None:
        """Serialise once, write atomically to each path."""
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        for path in paths:
            atomic_write_bytes(path, buffer.getvalue())

    def bytes_needed(self, model: nn.Module) -> int:
        """Disk space for the run's checkpoints: the best epochs, latest, and one being written. One is
        about the parameters and Adam's two moments of each."""
        one = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
        return one * (self.config.max_models_to_save + 2)

    # ------------------------------------------------------------------ reading
    def read_epoch(self, epoch: int) -> Checkpoint:
        """The checkpoint of `epoch`, asked for by the user (--continue_from_epoch N)."""
        path = self.path(epoch)
        if not path.exists():
            raise CheckpointError(f"no checkpoint {path}; saved epochs: {self.saved_epochs()}")
        return read_checkpoint(path)

    def newest_valid(self) -> tuple[Optional[Checkpoint], Optional[Path]]:
        """`train_model_latest`, else the newest readable epoch checkpoint (with a warning); (None, None) if
        there are none at all. Unreadable ones are skipped, never deleted."""
        unreadable = []
        for path in self.resume_candidates():
            try:
                checkpoint = read_checkpoint(path)
            except CheckpointError as error:
                unreadable.append(str(error))
                continue
            if path != self.latest:
                problems = unreadable or [f"{self.latest} does not exist"]
                print(f"warning: {'; '.join(problems)}. Falling back to {path}, the newest valid checkpoint: "
                      f"training repeats what came after it", file=sys.stderr, flush=True)
            return checkpoint, path
        if unreadable:
            raise CheckpointError(
                f"no checkpoint in {self.folder} can be read: " + "; ".join(unreadable)
                + ". Move them away to start again, or use another --experiment_name")
        return None, None

    def check_architecture(self, checkpoint: Checkpoint, path: Path) -> None:
        """Refuse a checkpoint trained with other values of the architecture keys than this run's config."""
        saved_config = checkpoint["config"]
        saved = {key: saved_config.get(key, value_before_key_existed(key)) for key in ARCHITECTURE_KEYS}
        keys = [key for key in ARCHITECTURE_KEYS if saved[key] != getattr(self.config, key)]
        if keys:
            differing = [f"{key} (checkpoint: {saved[key]!r}, now: {getattr(self.config, key)!r})" for key in keys]
            # A config.yaml written before a key existed lacks it, so the options are spelled out too.
            options = " ".join(f"--{key} {command_line_value(saved[key])}" for key in keys)
            raise CheckpointError(
                f"checkpoint {path} was trained with another architecture; differing keys: "
                + "; ".join(differing) + ". Use the config it was trained with (saved in "
                f"{self.paths.config}; these options restore it: {options}) or another --experiment_name.")

    def restore(self, checkpoint: Checkpoint, path: Path, model: nn.Module, restore_training: bool) -> None:
        """Load `checkpoint` (read from `path`) into `model`; with `restore_training` also the optimizer, the
        schedule and the random state, so that training continues exactly. The builder's `experiment`
        state is the caller's to take."""
        self.check_architecture(checkpoint, path)
        model.load_state_dict(checkpoint["network"])
        if restore_training:
            model.optimizer.load_state_dict(checkpoint["optimizer"])
            model.scheduler.load_state_dict(checkpoint["scheduler"])
            rng = checkpoint["rng"]
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
