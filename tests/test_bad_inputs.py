"""Bad inputs: each case asserts what the user is told and that no file made earlier was changed.

Configs and datasets, checkpoints, non-finite losses, a full or unwritable disk, archives and
signals. Most cases run `train_maml_system.main` against a copy of one trained tiny experiment
and compare the copy's files byte for byte afterwards.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import utils.storage as storage
from conftest import command_line, folder_held_by_another_process, make_toy_dataset, tiny_overrides, write_archive
from experiment_builder import ExperimentBuilder
from preprocess.archives import PreprocessError, safe_extract
from train_maml_system import main
from utils.config import ConfigError, load_config
from utils.dataset_format import MANIFEST_NAME
from utils.interrupt import HANDLED_SIGNALS, INTERRUPTED_EXIT_CODE, StopRequest, TrainingInterrupted
from utils.nonfinite import TrainingDiverged
from utils.checkpoints import read_checkpoint
from utils.experiment_paths import ExperimentPaths

REPO = Path(__file__).resolve().parents[1]
EPOCHS = dict(total_epochs=2, max_models_to_save=2)  # the trained experiment: epochs 0 and 1, both kept


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def without_the_config(files: dict[str, str]) -> dict[str, str]:
    """A fingerprint of the experiments folder less tiny/config.yaml, which it must hold: a rerun with other
    overrides rewrites the config, and must touch nothing else."""
    assert "tiny/config.yaml" in files
    return {name: digest for name, digest in files.items() if name != "tiny/config.yaml"}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_input_datasets")
    make_toy_dataset(root, "toy", seed=0)
    make_toy_dataset(root, "toy_rgb", channels=3, seed=2)
    (make_toy_dataset(root, "toy_damaged", seed=3) / MANIFEST_NAME).write_text('{"name": "toy_dam')
    shutil.rmtree(make_toy_dataset(root, "toy_no_val", seed=4) / "val")
    return root


@pytest.fixture(scope="module")
def trained(datasets, tmp_path_factory) -> Path:
    """experiments/tiny after two epochs: saved_models/train_model_{0,1,latest}, config, logs, test summary."""
    experiments = tmp_path_factory.mktemp("trained")
    ExperimentBuilder(load_config(overrides=tiny_overrides(datasets, experiments, **EPOCHS))).run_experiment()
    return experiments


@pytest.fixture
def experiments(trained, tmp_path) -> Path:
    """A private copy of the trained experiments folder."""
    copy = tmp_path / "experiments"
    shutil.copytree(trained, copy)
    return copy


def overrides(datasets: Path, experiments: Path, **extra) -> dict:
    return tiny_overrides(datasets, experiments, **{**EPOCHS, **extra})


def run_cli(capsys, datasets: Path, experiments: Path, **extra) -> tuple[int, str]:
    code = main(command_line(overrides(datasets, experiments, **extra)))
    return code, capsys.readouterr().err


def paths(experiments: Path) -> ExperimentPaths:
    return ExperimentPaths(experiments / "tiny")


# ---------------------------------------------------------------------------------- configs and datasets
@pytest.mark.parametrize("extra, message", [
    (dict(num_classes_per_set=7), r"num_classes_per_set is 7 but .*toy/val holds only 6 classes"),
    (dict(image_height=28, image_width=28), r"28x28 but dataset 'toy' .*manifest.json\) holds 16x16 images; "
                                            r"training images are not resized"),
    (dict(image_channels=3), r"image_channels is 3 but dataset 'toy' .* holds 1-channel images"),
    (dict(num_target_samples=8), r"1 \+ 8 = 9 images per class, but only 0 of the 12 classes in .*toy/train"),
    (dict(test_dataset="toy_rgb"), r"image_channels is 1 but dataset 'toy_rgb' .*the test_dataset, holds "
                                   r"3-channel images"),
    (dict(test_dataset="toy_rgb", evaluate_on_test_set_only=True), r"dataset 'toy_rgb' .* 3-channel images"),
    (dict(test_dataset="CUBB"), r"dataset 'CUBB' is not built.*python preprocess/preprocess.py --datasets CUBB"),
    (dict(dataset_name="toy_damaged", experiment_name="other"), r"toy_damaged/manifest.json is damaged"),
    (dict(dataset_name="toy_no_val", experiment_name="other"), r"dataset 'toy_no_val' has no 'val' split"),
    (dict(meta_learning_rate="nan"), r"key 'meta_learning_rate' in the command line: expected a finite number"),
    (dict(experiment_name="../elsewhere"), r"key 'experiment_name'.*expected a folder name"),
])
def test_config_contradicting_the_dataset_fails_before_training(capsys, datasets, experiments, extra, message):
    before = fingerprint(experiments)
    code, err = run_cli(capsys, datasets, experiments, total_epochs=3, **extra)
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and re.search(message, err, re.S), err
    assert fingerprint(experiments) == before  # nothing trained, nothing written


@pytest.mark.parametrize("content, message", [
    ("1: 2\n", r"key 1 in .*config.yaml is not a name \(int\); keys are names"),
    ("meta_learning_rate: " + "9" * 400 + "\n", r"key 'meta_learning_rate'.*expected a number"),
])
def test_config_file_with_odd_keys_or_values(tmp_path, content, message):
    path = tmp_path / "config.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    assert path.read_text() == content


# ---------------------------------------------------------------------------------- checkpoints
def test_truncated_latest_falls_back_to_the_newest_valid_epoch(capsys, datasets, experiments):
    latest = paths(experiments).checkpoint("latest")
    latest.write_bytes(latest.read_bytes()[:1000])
    before = fingerprint(experiments)
    builder = ExperimentBuilder(load_config(overrides=overrides(datasets, experiments, total_epochs=3)))
    builder._resume()
    err = capsys.readouterr().err
    assert f"checkpoint {latest} cannot be read" in err
    assert f"Falling back to {paths(experiments).checkpoint(1)}, the newest valid checkpoint" in err
    assert builder.state["next_epoch"] == 2
    assert fingerprint(experiments) == before  # the unreadable file is skipped, not deleted


def test_checkpoint_that_would_run_code_is_refused_without_running_it(capsys, datasets, experiments, tmp_path):
    marker = tmp_path / "code_ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    latest = paths(experiments).checkpoint("latest")
    torch.save({"format": 1, "network": Exploit()}, latest)  # torch.save pickles: os.system on a plain load
    before = fingerprint(experiments)
    builder = ExperimentBuilder(load_config(overrides=overrides(datasets, experiments)))
    builder._resume()
    err = capsys.readouterr().err
    assert f"checkpoint {latest} cannot be read (UnpicklingError" in err and "Falling back" in err
    assert not marker.exists()
    assert fingerprint(experiments) == before


def test_foreign_torch_file_is_not_a_checkpoint(capsys, datasets, experiments):
    epoch_one = paths(experiments).checkpoint(1)
    torch.save({"state_dict": {"weight": torch.zeros(3)}}, epoch_one)
    before = fingerprint(experiments)
    code, err = run_cli(capsys, datasets, experiments, continue_from_epoch=1, total_epochs=3)
    assert code == 2 and f"{epoch_one} is not a checkpoint of this project" in err
    assert fingerprint(experiments) == before


def test_no_readable_checkpoint_names_every_file(capsys, datasets, experiments):
    for path in paths(experiments).saved_models.iterdir():
        path.write_bytes(b"not a checkpoint")
    before = fingerprint(experiments)
    code, err = run_cli(capsys, datasets, experiments, total_epochs=3)
    assert code == 2 and f"no checkpoint in {paths(experiments).saved_models} can be read" in err
    for tag in ("latest", 1, 0):
        assert f"checkpoint {paths(experiments).checkpoint(tag)} cannot be read" in err
    assert fingerprint(experiments) == before


def test_truncated_epoch_checkpoint_asked_for_is_named(capsys, datasets, experiments):
    epoch_zero = paths(experiments).checkpoint(0)
    epoch_zero.write_bytes(epoch_zero.read_bytes()[:-100])
    before = fingerprint(experiments)
    code, err = run_cli(capsys, datasets, experiments, continue_from_epoch=0, total_epochs=3)
    assert code == 2 and f"checkpoint {epoch_zero} cannot be read" in err
    assert fingerprint(experiments) == before


@pytest.mark.parametrize("extra, key", [(dict(num_classes_per_set=4), "num_classes_per_set (checkpoint: 5, now: 4)"),
                                        (dict(contextual_grad=True), "contextual_grad (checkpoint: False, now: True)")])
def test_resuming_with_an_incompatible_config_is_refused(capsys, datasets, experiments, extra, key):
    before = fingerprint(experiments)
    code, err = run_cli(capsys, datasets, experiments, total_epochs=3, **extra)
    assert code == 2 and "was trained with another architecture; differing keys: " + key in err
    assert fingerprint(experiments) == before


def test_test_only_without_a_trained_model(capsys, datasets, experiments):
    before = fingerprint(experiments)
    code, err = run_cli(capsys, datasets, experiments, experiment_name="never_trained", evaluate_on_test_set_only=True)
    assert code == 2 and "no trained model in" in err and "train first" in err
    assert fingerprint(experiments) == before


# ---------------------------------------------------------------------------------- one trainer per folder
def test_a_second_trainer_on_the_same_folder_is_refused_and_changes_nothing(capsys, datasets, experiments):
    with folder_held_by_another_process(paths(experiments).folder) as holder:
        before = fingerprint(experiments)
        code, err = run_cli(capsys, datasets, experiments, total_epochs=3)
        assert code == 2 and "Traceback" not in err
        assert err.startswith(f"error: {paths(experiments).folder} is in use by another training run (pid "
                              f"{holder.pid} on ")
        assert fingerprint(experiments) == before


def test_test_only_is_refused_while_a_trainer_writes_the_checkpoints(capsys, datasets, experiments):
    with folder_held_by_another_process(paths(experiments).folder) as holder:
        before = fingerprint(experiments)
        code, err = run_cli(capsys, datasets, experiments, evaluate_on_test_set_only=True)
        assert code == 2 and f"is being trained (pid {holder.pid} on " in err
        assert "a test-only run would read checkpoints while they are rewritten" in err
        assert fingerprint(experiments) == before
    # The trainer has ended (killed, even): the test runs.
    code, err = run_cli(capsys, datasets, experiments, evaluate_on_test_set_only=True)
    assert code == 0, err


# ---------------------------------------------------------------------------------- non-finite losses
def poison_iterations(builder: ExperimentBuilder, first_iteration: int, poisoned: set[int], record=None) -> None:
    """Make the loss of the given meta-iterations NaN (NaN support images), counting from `first_iteration`."""
    original, calls = builder.model.run_train_iter, [first_iteration]

    def run_train_iter(task, epoch):
        iteration = calls[0]
        calls[0] += 1
        if iteration not in poisoned:
            return original(task, epoch)
        bad = dataclasses.replace(task, support_images=task.support_images * float("nan"))
        before = {k: v.clone() for k, v in builder.model.state_dict().items()}
        metrics = original(bad, epoch)
        if record is not None:
            record.append((before, {k: v.clone() for k, v in builder.model.state_dict().items()}, metrics))
        return metrics

    builder.model.run_train_iter = run_train_iter


def test_isolated_nonfinite_iteration_is_skipped_and_counted(datasets, experiments):
    builder = ExperimentBuilder(load_config(overrides=overrides(datasets, experiments, total_epochs=3)))
    record = []
    poison_iterations(builder, first_iteration=6, poisoned={7}, record=record)
    builder.run_experiment()
    (before, after, metrics), = record
    assert metrics["skipped"]
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), f"{name} changed by a skipped update"
    row = builder.state["epoch_rows"][2]
    assert row["nonfinite_iterations_skipped"] == 1 and not math.isnan(row["train_loss_mean"])
    assert builder.state["nonfinite_in_a_row"] == 0


def test_nonfinite_iterations_in_a_row_stop_the_run_and_keep_the_checkpoint(capsys, datasets, experiments):
    before = fingerprint(experiments)
    builder = ExperimentBuilder(load_config(overrides=overrides(
        datasets, experiments, total_epochs=4, max_consecutive_nonfinite_iterations=3)))
    poison_iterations(builder, first_iteration=6, poisoned=set(range(6, 100)))
    with pytest.raises(TrainingDiverged, match=r"meta-iteration 8: the loss or the gradients were not finite for 3 "
                                               r"iterations in a row \(6 to 8; max_consecutive_nonfinite_iterations"):
        builder.run_experiment()
    assert "meta-iteration 6 (epoch 2): loss or gradient not finite, update skipped (1 in a row" in \
        capsys.readouterr().err
    assert without_the_config(fingerprint(experiments)) == without_the_config(before)  # total_epochs=4 now


# ---------------------------------------------------------------------------------- disk
def test_unwritable_experiment_folder_fails_before_training(capsys, datasets, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = run_cli(capsys, datasets, blocker / "experiments")
    assert code == 2 and "error: cannot write" in err and "nothing was written" in err and "Training from" not in err
    assert blocker.read_text() == "not a folder"


def test_disk_too_full_for_the_checkpoints_fails_before_training(capsys, monkeypatch, datasets, experiments):
    before = fingerprint(experiments)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    code, err = run_cli(capsys, datasets, experiments, total_epochs=3)
    assert code == 2 and "MiB free but the checkpoints of this run need about" in err
    assert fingerprint(experiments) == before


def test_disk_full_while_saving_keeps_the_previous_checkpoint(capsys, monkeypatch, datasets, experiments):
    latest = paths(experiments).checkpoint("latest")
    latest_bytes = latest.read_bytes()

    class FullDiskFile(io.FileIO):
        """Writes half of what it is given, then fails as a full disk does."""
        def write(self, payload):
            super().write(payload[:len(payload) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        if "train_model_latest" in str(path) and "w" in mode:
            return FullDiskFile(path, mode)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(storage, "open", open_on_a_full_disk, raising=False)
    code, err = run_cli(capsys, datasets, experiments, total_epochs=3)
    assert code == 2 and f"error: cannot write {latest} (No space left on device); the previous version is kept" in err
    assert latest.read_bytes() == latest_bytes
    assert not [p for p in paths(experiments).saved_models.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    resumed = ExperimentBuilder(load_config(overrides=overrides(datasets, experiments, total_epochs=3)))
    resumed._resume()
    assert resumed.state["next_epoch"] == 2  # from the intact latest (after epoch 1)


# ---------------------------------------------------------------------------------- archives
@pytest.fixture
def victim(tmp_path) -> Path:
    """A file beside the extraction folder that an archive member tries to reach."""
    path = tmp_path / "victim.txt"
    path.write_text("precious")
    return path


def test_archive_member_overwriting_a_file_outside_is_refused(tmp_path, victim):
    archive = tmp_path / "evil.tar.gz"
    write_archive(archive, [("../victim.txt", "file", "evil")])
    dest = tmp_path / "dest"
    with pytest.raises(PreprocessError, match=r"refusing to extract member '../victim.txt': path leaves the "
                                              r"destination"):
        safe_extract(archive, dest)
    assert victim.read_text() == "precious" and not any(dest.iterdir())


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_archive_link_then_write_through_it_is_refused(tmp_path, victim):
    archive = tmp_path / "evil.zip"
    write_archive(archive, [("data/link", "symlink", "../../victim.txt"), ("data/link", "file", "evil")])
    with pytest.raises(PreprocessError, match=r"'data/link': link target '../../victim.txt' leaves the destination"):
        safe_extract(archive, tmp_path / "dest")
    assert victim.read_text() == "precious"


def test_truncated_archive_is_named(tmp_path):
    archive = tmp_path / "images_background.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/b.png", b"x" * 1000)
    archive.write_bytes(archive.read_bytes()[:200])
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "kept.txt").write_text("kept")
    with pytest.raises(PreprocessError, match=r"images_background.zip: not a valid zip file .* fetch it again"):
        safe_extract(archive, dest)
    assert fingerprint(dest) == {"kept.txt": hashlib.sha256(b"kept").hexdigest()}


# ---------------------------------------------------------------------------------- signals
@pytest.fixture
def python_signal_defaults():
    """SIGINT raises KeyboardInterrupt and SIGTERM terminates, whatever this process inherited: started as
    `pytest &` from a script, it has SIGINT ignored, which the training then rightly leaves ignored."""
    previous = {number: signal.getsignal(number) for number in HANDLED_SIGNALS}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for number, handler in previous.items():
        signal.signal(number, handler)


def test_a_signal_inherited_as_ignored_stays_ignored(python_signal_defaults):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with StopRequest() as stop:
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        signal.raise_signal(signal.SIGINT)
        assert not stop.requested
        signal.raise_signal(signal.SIGTERM)  # not ignored, so caught
        assert stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def signal_after(builder: ExperimentBuilder, number: signal.Signals, calls: int, times: int = 1) -> None:
    """Deliver `number` to this process `times` times right after the `calls`-th meta-iteration."""
    original, count = builder.model.run_train_iter, [0]

    def run_train_iter(task, epoch):
        metrics = original(task, epoch)
        count[0] += 1
        if count[0] == calls:
            for _ in range(times):
                signal.raise_signal(number)
        return metrics

    builder.model.run_train_iter = run_train_iter


def final_state(experiments: Path, name: str) -> dict:
    return read_checkpoint(ExperimentPaths(experiments / name).latest_checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_epoch_saves_and_resumes_exactly(datasets, tmp_path, number, python_signal_defaults):
    experiments = tmp_path / "experiments"
    build = lambda name: ExperimentBuilder(load_config(overrides=overrides(  # noqa: E731
        datasets, experiments, experiment_name=name, total_epochs=2, total_iter_per_epoch=4)))
    build("straight").run_experiment()

    stopped = build("stopped")
    handler_before = signal.getsignal(number)
    signal_after(stopped, number, calls=6)  # epoch 1, after its second iteration
    with pytest.raises(TrainingInterrupted, match=rf"stopped by {number.name} after meta-iteration 5 \(epoch 1, 2 of "
                                                  r"4 iterations\); saved .*train_model_latest"):
        stopped.run_experiment()
    assert signal.getsignal(number) == handler_before  # the handlers are restored
    saved = final_state(experiments, "stopped")["experiment"]
    assert saved["next_epoch"] == 1 and saved["epoch_progress"]["iterations"] == 2
    build("stopped").run_experiment()

    straight, resumed = final_state(experiments, "straight"), final_state(experiments, "stopped")
    for name, tensor in straight["network"].items():
        assert torch.equal(tensor, resumed["network"][name]), f"{name} differs after the interrupted run"
    for row, other in zip(straight["experiment"]["epoch_rows"], resumed["experiment"]["epoch_rows"], strict=True):
        assert {k: v for k, v in row.items() if k != "epoch_time_s"} == \
            {k: v for k, v in other.items() if k != "epoch_time_s"}


@pytest.mark.slow
def test_second_signal_stops_at_once_and_damages_nothing(datasets, experiments, python_signal_defaults):
    before = fingerprint(experiments)
    builder = ExperimentBuilder(load_config(overrides=overrides(datasets, experiments, total_epochs=3)))
    signal_after(builder, signal.SIGINT, calls=1, times=2)
    with pytest.raises(KeyboardInterrupt):
        builder.run_experiment()
    assert without_the_config(fingerprint(experiments)) == without_the_config(before)  # total_epochs=3 now


@pytest.mark.slow
def test_sigterm_kills_a_real_training_process_which_resumes_to_the_same_weights(datasets, trained, tmp_path):
    # `trained` has filled the dataset's decoding cache, which the two first processes then only read.
    def command(name):
        args = overrides(datasets, tmp_path, experiment_name=name, total_epochs=2, total_iter_per_epoch=5)
        return [sys.executable, "train_maml_system.py", *command_line(args)]

    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.Popen(command("straight"), cwd=REPO, env=environment, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    process = subprocess.Popen(command("stopped"), cwd=REPO, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.startswith("Training from epoch 0"):
                process.send_signal(signal.SIGTERM)
                break
        out, err = process.communicate(timeout=300)
        straight_err = straight.communicate(timeout=300)[1]
    finally:
        process.kill()
        straight.kill()
    assert straight.returncode == 0, straight_err
    assert process.returncode == INTERRUPTED_EXIT_CODE, err
    assert "stopped by SIGTERM after meta-iteration" in err and "--continue_from_epoch latest" in err
    assert "Traceback" not in err

    resumed = subprocess.run(command("stopped"), cwd=REPO, env=environment, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed" in resumed.stdout
    straight_state, resumed_state = final_state(tmp_path, "straight"), final_state(tmp_path, "stopped")
    for name, tensor in straight_state["network"].items():
        assert torch.equal(tensor, resumed_state["network"][name]), f"{name} differs after SIGTERM and resume"
    assert json.loads(ExperimentPaths(tmp_path / "straight").test_summary().read_text())["ensemble_test_accuracy"] == \
        json.loads(ExperimentPaths(tmp_path / "stopped").test_summary().read_text())["ensemble_test_accuracy"]


def test_an_empty_split_is_named_as_such(tmp_path):
    """A split with no classes (an import with a 0 fraction) gets its own message, not 'lower to at most 0'."""
    from utils.preflight import _check_split
    (tmp_path / "val").mkdir()
    with pytest.raises(ConfigError, match=r"val holds no classes .* use this one only as --test_dataset"):
        _check_split(load_config(), tmp_path / "val")
