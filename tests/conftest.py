"""Shared fixtures: a tiny dataset on disk and a tiny, fast config for the training system."""
from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from data import TaskBatch
from few_shot_learning_system import MAMLFewShotClassifier
from utils.backend import configure_backend
from utils.config import load_config
from utils.dataset_format import MANIFEST_NAME, SPLITS, manifest_image_size

REPO = Path(__file__).resolve().parents[1]


def tiny_system(*, ways: int, shots: int, queries: int, size: int, channels: int = 1,
                dtype: torch.dtype = torch.float32, **overrides) -> MAMLFewShotClassifier:
    """A tiny meta-learner on the CPU, initialised from seed 0, set up as the entry points set it up."""
    config = load_config(overrides=dict(
        image_height=size, image_width=size, image_channels=channels, num_classes_per_set=ways,
        num_samples_per_class=shots, num_target_samples=queries, device="cpu", **overrides))
    configure_backend(config, torch.device("cpu"))
    torch.manual_seed(0)
    return MAMLFewShotClassifier(config, torch.device("cpu")).to(dtype)


def random_tasks(num_tasks: int, *, ways: int, shots: int, queries: int, size: int, channels: int = 1,
                 seed: int = 0, dtype: torch.dtype = torch.float32) -> TaskBatch:
    """Noise images with class-sorted labels: support then query drawn from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    support = torch.randn(num_tasks, ways * shots, channels, size, size, generator=generator, dtype=dtype)
    query = torch.randn(num_tasks, ways * queries, channels, size, size, generator=generator, dtype=dtype)
    return TaskBatch(support, labels.repeat_interleave(shots).repeat(num_tasks, 1),
                     query, labels.repeat_interleave(queries).repeat(num_tasks, 1))


def make_toy_dataset(root: Path, name: str = "toy", classes=(12, 6, 6), per_class: int = 8, size: int = 16,
                     channels: int = 1, seed: int = 0) -> Path:
    """Classes are random blob prototypes with pixel noise: learnable in a few iterations."""
    rng = np.random.default_rng(seed)
    folder = root / name
    for split, count in zip(SPLITS, classes):
        for index in range(count):
            class_folder = folder / split / f"{split}_class{index:03d}"
            class_folder.mkdir(parents=True)
            prototype = rng.random((size, size, channels)) > 0.6
            for sample in range(per_class):
                noisy = prototype ^ (rng.random(prototype.shape) > 0.92)
                pixels = (noisy * 255).astype(np.uint8)
                image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
                image.save(class_folder / f"{sample:02d}.png")
    # A hand-made manifest: only what utils/preflight.py checks.
    manifest = {"name": name, "image_size": manifest_image_size((channels, size, size))}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="session")
def toy_datasets(tmp_path_factory) -> Path:
    """A datasets folder holding 'toy' (grey, 16x16) and 'toy_other' (another seed, for cross-domain)."""
    root = tmp_path_factory.mktemp("datasets")
    make_toy_dataset(root, "toy", seed=0)
    make_toy_dataset(root, "toy_other", seed=1)
    return root


def tiny_overrides(datasets_dir: Path, experiments_dir: Path, **extra) -> dict:
    overrides = dict(
        dataset_name="toy", datasets_dir=str(datasets_dir), experiments_dir=str(experiments_dir),
        experiment_name="tiny", image_height=16, image_width=16, image_channels=1, cnn_num_filters=8,
        input_normalisation="dataset_statistics",  # grey glyphs, as the Omniglot configs
        num_stages=3, batch_size=2, num_target_samples=3, number_of_training_steps_per_iter=2,
        number_of_evaluation_steps_per_iter=2, total_epochs=3, total_iter_per_epoch=3,
        num_evaluation_tasks=6, max_models_to_save=2, show_progress=False, init_inner_loop_learning_rate=0.1,
        device="cpu")
    overrides.update(extra)
    return overrides


@pytest.fixture(scope="session")
def omniglot_zips() -> Path:
    """The official Omniglot zips' folder from OMNIGLOT_ZIPS (make test sets it to ../shared/data/omniglot)."""
    folder = os.environ.get("OMNIGLOT_ZIPS")
    if not folder:
        pytest.skip("set OMNIGLOT_ZIPS to the folder holding images_background.zip and images_evaluation.zip "
                    "(e.g. OMNIGLOT_ZIPS=../shared/data/omniglot) to run the Omniglot tests")
    zips_dir = Path(folder)
    missing = [name for name in ("images_background.zip", "images_evaluation.zip") if not (zips_dir / name).is_file()]
    if missing:
        pytest.fail(f"OMNIGLOT_ZIPS={folder} but {', '.join(missing)} not found there")
    return zips_dir


def write_archive(path: Path, members) -> None:
    """Write a zip or tar (.tar, .tar.gz/.tgz, .tar.bz2, by suffix) with `members`: a dict {name: bytes} of
    files, or a list of (name, kind, payload) with kind file | symlink | hardlink | chardev."""
    if isinstance(members, dict):
        members = [(name, "file", data) for name, data in members.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, kind, payload in members:
                info = zipfile.ZipInfo(name)
                mode = {"file": stat.S_IFREG | 0o644, "symlink": stat.S_IFLNK | 0o777,
                        "chardev": stat.S_IFCHR | 0o644}[kind]
                info.external_attr = mode << 16
                zf.writestr(info, payload)
        return
    with tarfile.open(path, "w:" + {".tar": "", ".gz": "gz", ".tgz": "gz", ".bz2": "bz2"}[path.suffix]) as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                data = payload.encode() if isinstance(payload, str) else payload
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "chardev": tarfile.CHRTYPE}[kind]
            info.linkname = payload
            tar.addfile(info)


def command_line(overrides: dict) -> list[str]:
    """Config overrides as the training script's arguments: {"batch_size": 2} -> ["--batch_size", "2"]."""
    return [token for key, value in overrides.items() for token in (f"--{key}", str(value))]


@pytest.fixture
def tiny_config(toy_datasets, tmp_path):
    """A factory: tiny_config(contextual_grad=True, ...) -> a validated config for the toy dataset."""
    def build(**extra):
        return load_config(overrides=tiny_overrides(toy_datasets, tmp_path / "experiments", **extra))
    return build


@pytest.fixture
def scratch_dir():
    """A temporary folder in RAM (/dev/shm) when it has room, else on disk; removed afterwards.

    Deleting tens of thousands of files (a built Omniglot) is slow on disks mounted with
    'discard', as pytest's own temporary folders are when it cleans them up later.
    """
    shm = Path("/dev/shm")
    in_ram = shm.is_dir() and shutil.disk_usage(shm).free > (2 << 30)
    folder = Path(tempfile.mkdtemp(prefix="fsl-test-", dir=shm if in_ram else None))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# A process that holds an experiment folder's lock as a training (or test-only) run does, until killed.
_HOLDER = """
import sys, time
from utils.experiment_paths import ExperimentPaths
from utils.trainer_lock import lock_experiment_folder
with lock_experiment_folder(ExperimentPaths(sys.argv[1]), training=sys.argv[2] == "training"):
    print("held", flush=True)
    time.sleep(600)
"""


@contextmanager
def folder_held_by_another_process(folder: Path, training: bool = True) -> Iterator[subprocess.Popen]:
    """A real second process holding `folder`'s lock while the block runs; killed (SIGKILL) afterwards."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), "training" if training else "testing"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n", "the holding process did not take the lock"
        yield holder
    finally:
        holder.kill()
        holder.wait()
