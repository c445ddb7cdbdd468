"""Writing files safely: atomically (checkpoints, CSV, JSON, text), a probe of free space, an exclusive lock.

Every file is written to a temporary name in the same folder and renamed into place, so a crash
or a full disk mid-write leaves the previous version intact, never a truncated one.
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class StorageError(RuntimeError):
    """The experiment folder cannot be written (full disk, no permission, not a folder)."""


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        kept = "the previous version is kept" if path.exists() else "nothing was written"
        raise StorageError(f"cannot write {path} ({error.strerror or error}); {kept}. Free space or fix the "
                           f"permissions of {path.parent}, then rerun with --continue_from_epoch latest") from error
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass  # the folder itself is unusable: the error above says so


def probe_writable(folder: Path, needed_bytes: int = 0) -> None:
    """Fail now, not after an epoch, when `folder` cannot take files or `needed_bytes` more of them."""
    atomic_write_bytes(folder / ".write_probe", b"probe")
    (folder / ".write_probe").unlink()
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise StorageError(f"{folder} has {free / 2**20:.1f} MiB free but the checkpoints of this run need about "
                           f"{needed_bytes / 2**20:.1f} MiB (max_models_to_save + 2 copies); free space, lower "
                           f"max_models_to_save or choose another --experiments_dir")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """One column per key any row has, in the order they first appear; a row without a key leaves its cell blank
    (the epochs of a checkpoint from before a logged quantity existed, resumed by a version that logs it)."""
    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(key for row in rows for key in row)), restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


@contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """One process at a time in the block (an flock on `lock_path`); the others wait their turn."""
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
