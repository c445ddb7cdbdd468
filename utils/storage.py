"""Files of an experiment: checkpoints, statistics CSV and summaries, all written atomically.

Every file is written to a temporary name in the same folder and renamed into place, so a crash
or a full disk mid-write leaves the previous version intact, never a truncated one.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_PREFIX = "train_model_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not belong to this experiment."""


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with `weights_only=True`: a checkpoint from elsewhere can never run code."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated, foreign or not a torch file at all
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error})") from None


def checkpoint_path(models_folder: Path, tag: int | str) -> Path:
    return models_folder / f"{CHECKPOINT_PREFIX}{tag}"


def saved_epochs(models_folder: Path) -> list[int]:
    """Epoch numbers of the `train_model_{epoch}` files in `models_folder`, ascending."""
    if not models_folder.is_dir():
        return []
    pattern = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
    return sorted(int(m.group(1)) for p in models_folder.iterdir() if (m := pattern.match(p.name)))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
