"""One trainer per experiment folder: a lock on EXPERIMENT/.trainer.lock while a run uses the folder.

Two runs started with the same experiment name (a job submitted twice, or restarted by a scheduler while
the old one still runs) would write the same checkpoints and logs, each overwriting the other's. So a
training run holds the lock exclusively, and a second one is refused at once, with a message naming
the process that holds it. A test-only run only reads the checkpoints (and writes its test summary): it
holds the lock shared, so that several may test at once, but none while a trainer rewrites the
checkpoints, and no trainer starts while one reads them.

The lock is `flock`, which the kernel releases when the process ends, however it ends (SIGKILL, a
crash), so a lock file left behind never blocks the next run. The file holds a JSON object about its
holder (pid, host, start time, command) for the refusal message only; the lock itself is the flock.
Under torchrun only rank 0 takes it (experiment_builder.py), as only rank 0 writes.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from utils.experiment_paths import ExperimentPaths
from utils.storage import StorageError


class ExperimentBusyError(RuntimeError):
    """Another process trains (or tests) in this experiment folder."""


@contextmanager
def lock_experiment_folder(paths: ExperimentPaths, training: bool) -> Iterator[None]:
    """Hold the folder's lock in the block: exclusively to train, shared to test only.

    Raises ExperimentBusyError, having changed nothing, when another process holds it in a way that
    conflicts; StorageError when the lock file cannot be created (the folder is not writable).
    """
    if not training and not paths.folder.is_dir():
        yield  # nothing trained here to protect (the test-only run will say so); create nothing
        return
    descriptor = _acquire(paths, training)
    try:
        if training or not _another_tester_is_named(paths.trainer_lock):
            _write_holder(descriptor, training)
        yield
    finally:
        _release(descriptor, paths.trainer_lock)


def _acquire(paths: ExperimentPaths, training: bool) -> int:
    path = paths.trainer_lock
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise StorageError(f"cannot write {path} ({error.strerror or error}); nothing was written. Fix the "
                               f"permissions of {path.parent} or choose another --experiments_dir") from error
        try:
            fcntl.flock(descriptor, (fcntl.LOCK_EX if training else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StorageError(f"cannot lock {path} ({error.strerror or error}); the filesystem of "
                                   f"{path.parent} may not support locks (flock)") from error
            raise ExperimentBusyError(_refusal(paths, training, _read_holder(path))) from None
        # A holder that ended between our open and our flock removed the file: our lock is then on a file
        # no other process can find. Lock the file now at the path instead.
        try:
            if os.path.samestat(os.fstat(descriptor), os.stat(path)):
                return descriptor
        except FileNotFoundError:
            pass
        os.close(descriptor)


def _write_holder(descriptor: int, training: bool) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "role": "training" if training else "testing", "command": " ".join(sys.argv)}
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
    except OSError as error:  # a full disk or quota: say so, as the disk probe would
        raise StorageError(f"cannot write the lock record of the experiment folder ({error}); "
                           f"free some space and rerun") from error


def _another_tester_is_named(path: Path) -> bool:
    """Whether the file names a test-only run that shares the lock with this one: then it stays named (one
    record per file). A record of a process that is gone is replaced."""
    holder = _read_holder(path)
    if holder.get("role") != "testing":
        return False
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell from here; it may well run
    try:
        os.kill(int(holder["pid"]), 0)  # signal 0: only whether the process exists
    except PermissionError:
        return True  # it exists, run by another user
    except (ProcessLookupError, KeyError, TypeError, ValueError):
        return False
    return True


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):  # being written this instant, or removed as its holder ended
        return {}
    return holder if isinstance(holder, dict) else {}


def _release(descriptor: int, path: Path) -> None:
    """Unlock; remove the file first when no other process holds it (a test-only run may share it)."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
    except OSError:
        pass  # another test-only run still holds it, and will remove it
    finally:
        os.close(descriptor)  # releases the flock


def _refusal(paths: ExperimentPaths, training: bool, holder: dict[str, Any]) -> str:
    pid = holder.get("pid", "?")
    who = (f"pid {pid} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
           f"{holder.get('command', '?')}" if holder else "a process whose details are not written yet")
    held_for_training = holder.get("role", "training") == "training"
    if training and held_for_training:
        stop = (f"stop it (kill -TERM {pid} saves a resumable checkpoint; rerun this command to resume), "
                if holder else "")
        return (f"{paths.folder} is in use by another training run ({who}). Two runs would overwrite each "
                f"other's checkpoints and logs. Wait for it to end, {stop}or choose another --experiment_name. "
                f"Nothing was changed")
    if training:
        return (f"{paths.folder} is being tested by a test-only run ({who}); training would rewrite the "
                f"checkpoints it reads. Rerun when it has ended. Nothing was changed")
    return (f"{paths.folder} is being trained ({who}); a test-only run would read checkpoints while they are "
            f"rewritten. The training ends with the ensemble test itself; test with "
            f"--evaluate_on_test_set_only true once it has ended or stopped. Nothing was changed")
