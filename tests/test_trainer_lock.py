"""One trainer per experiment folder: the lock of utils/trainer_lock.py against real second processes.

The refusals of the training script itself (exit status 2, nothing changed) are in test_bad_inputs.py,
those of a torchrun run in test_distributed.py.
"""
from __future__ import annotations

import json
import os
import signal
import socket

import pytest

from conftest import folder_held_by_another_process
from utils.experiment_paths import ExperimentPaths
from utils.storage import StorageError
from utils.trainer_lock import ExperimentBusyError, lock_experiment_folder


def test_a_second_trainer_is_refused_and_told_who_holds_the_folder(tmp_path):
    paths = ExperimentPaths(tmp_path / "experiment")
    with folder_held_by_another_process(paths.folder) as holder:
        before = paths.trainer_lock.read_bytes()
        with pytest.raises(ExperimentBusyError) as refused:
            with lock_experiment_folder(paths, training=True):
                pytest.fail("two trainers hold one folder")
        message = str(refused.value)
        assert f"{paths.folder} is in use by another training run (pid {holder.pid} on {socket.gethostname()}, " \
               f"started " in message
        assert f"kill -TERM {holder.pid}" in message and "another --experiment_name" in message
        assert paths.trainer_lock.read_bytes() == before  # the holder's record is left as it was

        with pytest.raises(ExperimentBusyError, match=r"is being trained \(pid .*a test-only run would read "
                                                      r"checkpoints while they are rewritten"):
            with lock_experiment_folder(paths, training=False):
                pytest.fail("a test-only run reads the checkpoints a trainer writes")


def test_test_only_runs_share_the_folder_but_keep_trainers_out(tmp_path):
    paths = ExperimentPaths(tmp_path / "experiment")
    paths.folder.mkdir()  # a trained experiment (a test-only run locks nothing where nothing was trained)
    with folder_held_by_another_process(paths.folder, training=False) as tester:
        with lock_experiment_folder(paths, training=False):  # a second test-only run
            pass
        with pytest.raises(ExperimentBusyError, match=rf"being tested by a test-only run \(pid {tester.pid} "):
            with lock_experiment_folder(paths, training=True):
                pytest.fail("a trainer rewrites the checkpoints a test-only run reads")
        assert paths.trainer_lock.exists()  # the other test-only run still holds it


def test_a_lock_left_by_a_killed_trainer_does_not_block_the_next_run(tmp_path):
    paths = ExperimentPaths(tmp_path / "experiment")
    with folder_held_by_another_process(paths.folder) as holder:
        os.kill(holder.pid, signal.SIGKILL)  # no cleanup: the file and its record stay
        holder.wait()
        assert json.loads(paths.trainer_lock.read_text())["pid"] == holder.pid
    with lock_experiment_folder(paths, training=True):
        assert json.loads(paths.trainer_lock.read_text())["pid"] == os.getpid()
    assert not paths.trainer_lock.exists()  # removed by its last holder
    with lock_experiment_folder(paths, training=False):
        pass


def test_a_test_only_run_creates_no_folder_and_an_unwritable_one_is_a_storage_error(tmp_path):
    missing = ExperimentPaths(tmp_path / "never_trained")
    with lock_experiment_folder(missing, training=False):
        pass
    assert not missing.folder.exists()

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match=r"cannot write .*\.trainer\.lock .*nothing was written"):
        with lock_experiment_folder(ExperimentPaths(blocker / "experiment"), training=True):
            pass
    assert blocker.read_text() == "not a folder"
