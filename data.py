"""Few-shot task sampling from a preprocessed dataset folder ``NAME/{train,val,test}/CLASS/IMAGE``.

A split is decoded once into one uint8 array (cached next to the dataset, memory-mapped when
`load_into_memory` is off, and keyed to the image files it was decoded from). Every task is drawn
from its own seeded generator:
- training task j of meta-iteration i uses the seed (train_seed, 0, i, j), so a resumed run draws
  exactly the tasks it would have drawn, whatever happened before;
- evaluation task t of a split uses (val_seed, split, t), so validation and test tasks are the same
  across epochs, runs and models (the ensemble test depends on it).
Pixels reach the network as `InputScaling` says (config key input_normalisation).
"""
from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from utils.dataset_format import (CXGRAD_RESIZE, DECODE_ERRORS, MANIFEST_NAME, SPLIT_CODES, SPLITS, DatasetError,
                                  is_readable_image, preprocess_command, read_manifest, split_folder)
from utils.storage import atomic_write_text, exclusive_lock

# 2: the index holds the split's channel statistics; 3: and the files it was decoded from;
# 4: other sizes resized BICUBIC, then converted (as the official loader)
CACHE_VERSION = 4
Statistics = tuple[np.ndarray, np.ndarray]  # per-channel (mean, std) of pixels in [0, 1]


@dataclass
class TaskBatch:
    """T tasks: support [T, N*K, C, H, W] with labels [T, N*K]; queries [T, N*Q, C, H, W] likewise."""

    support_images: Tensor
    support_labels: Tensor
    query_images: Tensor
    query_labels: Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_images.shape[0]

    def select(self, index: int) -> "TaskBatch":
        """Task `index` alone, as a batch of one."""
        part = slice(index, index + 1)
        return TaskBatch(self.support_images[part], self.support_labels[part],
                         self.query_images[part], self.query_labels[part])

    def to(self, device: torch.device) -> "TaskBatch":
        if self.support_images.device == device:
            return self
        non_blocking = device.type == "cuda"
        return TaskBatch(*(t.to(device, non_blocking=non_blocking) for t in
                           (self.support_images, self.support_labels, self.query_images, self.query_labels)))


@dataclass
class ImageSplit:
    """Every image of one split in one array [num_images, H, W, C], grouped by class."""

    images: np.ndarray
    class_names: list[str]
    class_starts: np.ndarray  # index of each class's first image
    class_counts: np.ndarray
    statistics: Optional[Statistics] = None  # channel_statistics, kept in the cache

    def class_images(self, class_index: int) -> np.ndarray:
        start = self.class_starts[class_index]
        return self.images[start:start + self.class_counts[class_index]]


@dataclass
class SplitFiles:
    """The image files of one split as they are on disk now: what its cache is decoded from and keyed to."""

    folder: Path
    class_names: list[str]
    file_names: list[list[str]]  # per class, sorted: the order of the images in the cache
    stats: dict[str, list[int]]  # "CLASS/FILE" -> [size in bytes, modification time in ns]


def scan_split(split_folder: Path) -> SplitFiles:
    """List the split's images with their sizes and modification times.

    One stat per file and no reading: 0.3-0.4 s for 60,000 files on this 2-core machine (warm file
    cache), against minutes to decode them, so every load can check that its cache still describes
    the files. Plain names, not Path objects: building 60,000 of those about doubles the time.
    """
    with os.scandir(split_folder) as entries:
        class_names = sorted(entry.name for entry in entries if entry.is_dir())
    file_names, stats = [], {}
    for class_name in class_names:
        with os.scandir(split_folder / class_name) as entries:
            images = sorted((entry for entry in entries if is_readable_image(entry.name)), key=lambda entry: entry.name)
        for entry in images:
            status = entry.stat()
            stats[f"{class_name}/{entry.name}"] = [status.st_size, status.st_mtime_ns]
        file_names.append([entry.name for entry in images])
    return SplitFiles(split_folder, class_names, file_names, stats)


def describe_file_changes(recorded: dict, current: dict[str, list[int]]) -> str:
    """'images changed since its cache was decoded: 2 added, 0 removed, 1 modified (e.g. CLASS/FILE)'."""
    added = current.keys() - recorded.keys()
    removed = recorded.keys() - current.keys()
    modified = {name for name in current.keys() & recorded.keys() if current[name] != recorded[name]}
    example = min(added | removed | modified, default=None)
    return (f"images changed since its cache was decoded: {len(added)} added, {len(removed)} removed, "
            f"{len(modified)} modified" + (f" (e.g. {example})" if example else ""))


def _stale_cache_reason(index: dict, manifest_text: str, files: SplitFiles) -> Optional[str]:
    """Why a readable cache index no longer describes the split on disk; None while it does."""
    if index.get("version") != CACHE_VERSION:
        return f"its cache has format {index.get('version')}, this version of data.py writes {CACHE_VERSION}"
    if index.get("manifest") != manifest_text:
        return f"the dataset was rebuilt (its {MANIFEST_NAME} changed)"
    recorded = index.get("files")
    if recorded != files.stats:
        return describe_file_changes(recorded if isinstance(recorded, dict) else {}, files.stats)
    return None


def _decode(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """One image as uint8 [H, W, C] at `shape` (C, H, W).

    A built training dataset already has the model's size (utils/preflight.py checks it); a cross-domain
    test set of another size is resized as the official CxGrad loader resizes it (BICUBIC, then converted).
    """
    channels, height, width = shape
    with Image.open(path) as image:
        image = CXGRAD_RESIZE(image, (width, height), "L" if channels == 1 else "RGB")
        array = np.asarray(image, dtype=np.uint8)
    return array.reshape(height, width, channels)


def _load_cache(array_path: Path, index_path: Path, manifest_text: str, files: SplitFiles,
                shape: tuple[int, int, int], in_memory: bool) -> Optional[ImageSplit]:
    """The cached split, or None when there is no cache, it is stale (another build, other files) or damaged."""
    try:
        index = json.loads(index_path.read_text())
        if _stale_cache_reason(index, manifest_text, files) is not None:
            return None
        images = np.load(array_path, mmap_mode=None if in_memory else "r")
        counts = np.array(index["class_counts"])
        statistics = tuple(np.array(value, dtype=np.float32) for value in index["statistics"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing or damaged: decode again
        return None
    channels, height, width = shape
    if images.dtype != np.uint8 or images.shape != (int(counts.sum()), height, width, channels):
        return None
    return ImageSplit(images, index["class_names"], np.array(index["class_starts"]), counts, statistics)


def load_split(folder: Path, split: str, shape: tuple[int, int, int], in_memory: bool = True) -> ImageSplit:
    """Decode a split at `shape` (C, H, W) once into a cache file, then load that cache.

    Images of another size are resized, so a model trained at one size can be tested on another
    dataset (cross-domain). The cache is keyed by the manifest and by the path, size and modification
    time of every image, so a rebuilt dataset or an image added, removed or replaced since is decoded
    again (with a warning saying what changed) and never used stale; a damaged cache is decoded again,
    and an interrupted decode leaves nothing that looks complete.
    """
    manifest_text = (folder / MANIFEST_NAME).read_text()
    files = scan_split(split_folder(folder, split))
    channels, height, width = shape
    cache_dir = folder / ".cache"
    stem = f"{split}_{height}x{width}x{channels}"
    array_path, index_path = cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"
    cached = _load_cache(array_path, index_path, manifest_text, files, shape, in_memory)
    if cached is not None:
        return cached
    lock_path = cache_dir / f"{stem}.lock"
    try:
        cache_dir.mkdir(exist_ok=True)
        lock_path.touch()
    except OSError as error:
        raise DatasetError(f"cannot write the image cache {cache_dir} ({error}); the first use of a dataset "
                           f"decodes it there once, so {folder} must be writable") from None
    # One process at a time decodes a split; the others wait and then find its cache.
    with exclusive_lock(lock_path):
        cached = _load_cache(array_path, index_path, manifest_text, files, shape, in_memory)  # decoded meanwhile?
        if cached is None:
            _warn_if_stale(index_path, manifest_text, files, f"dataset '{folder.name}', split '{split}'")
            for leftover in cache_dir.glob(f"{stem}.*.tmp.npy"):  # from a decode that was killed
                leftover.unlink()
            _decode_into_cache(folder, files, shape, array_path, index_path, manifest_text)
            cached = _load_cache(array_path, index_path, manifest_text, files, shape, in_memory)
    if cached is None:
        raise DatasetError(f"the image cache {array_path} cannot be read right after decoding it; check the disk, "
                           f"delete {cache_dir} and run again")
    return cached


def _warn_if_stale(index_path: Path, manifest_text: str, files: SplitFiles, split_name: str) -> None:
    """One line saying why an existing cache is decoded again; nothing for a first decode or a damaged cache."""
    try:
        index = json.loads(index_path.read_text())
        reason = _stale_cache_reason(index, manifest_text, files)
    except (OSError, ValueError, AttributeError):
        return
    if reason is not None:
        warnings.warn(f"{split_name}: {reason}; decoding the split again")


def _decode_into_cache(folder: Path, files: SplitFiles, shape: tuple[int, int, int], array_path: Path,
                       index_path: Path, manifest_text: str) -> None:
    """Decode the images `files` lists into `array_path` (uint8 .npy) and write its index, keyed to `files`.

    `files` was listed before decoding: a file changed meanwhile differs from it, so the next load
    decodes again rather than trusting what was read.
    """
    channels, height, width = shape
    class_names = files.class_names
    counts = np.array([len(names) for names in files.file_names])
    if counts.sum() == 0:
        raise DatasetError(f"split {files.folder} holds no images")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    temporary = array_path.with_name(f"{array_path.stem}.{os.getpid()}.tmp.npy")
    try:
        images = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8,
                                           shape=(int(counts.sum()), height, width, channels))
        position = 0
        for class_name, names in zip(class_names, files.file_names):
            for path in (files.folder / class_name / name for name in names):
                try:
                    images[position] = _decode(path, shape)
                except DECODE_ERRORS as error:
                    raise DatasetError(
                        f"cannot read image {path}: {error}. Rebuild the dataset with: "
                        f"{preprocess_command(folder.name, folder.parent, '--force')}") from None
                position += 1
        images.flush()
        mean, std = channel_statistics(ImageSplit(images, class_names, starts, counts))
        del images
        os.replace(temporary, array_path)
    finally:
        temporary.unlink(missing_ok=True)
    index = {"version": CACHE_VERSION, "manifest": manifest_text, "class_names": class_names,
             "class_starts": starts.tolist(), "class_counts": counts.tolist(),
             "statistics": [mean.tolist(), std.tolist()], "files": files.stats}
    atomic_write_text(index_path, json.dumps(index))


@dataclass(frozen=True, eq=False)
class InputScaling:
    """How uint8 pixels become the network's input: x / 255, in [0, 1]; with statistics, then (x - mean) / std.

    `for_method` makes one from the config key input_normalisation.
    """

    statistics: Optional[Statistics] = None  # None: raw [0, 1]; a checkpoint records exactly this

    @staticmethod
    def for_method(method: str, statistics: Callable[[], Statistics]) -> "InputScaling":
        """The one place that reads input_normalisation.

        'none' feeds raw [0, 1], as the official CxGrad code does for the ImageNet-style datasets in
        training and evaluation alike. 'dataset_statistics' standardises with `statistics()`, which is
        called only then: the training split's, or for a trained model those its checkpoint recorded
        (a cross-domain test applies the trained model's, not the test dataset's).
        """
        if method == "none":
            return InputScaling()
        if method == "dataset_statistics":
            mean, std = statistics()
            return InputScaling((np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)))
        raise ValueError(f"input_normalisation {method!r}: expected 'none' or 'dataset_statistics'")

    def apply(self, images: np.ndarray, out: np.ndarray) -> None:
        """out [n, C, H, W] float32 from uint8 images [n, H, W, C], in place: no temporary copies."""
        np.divide(images.transpose(0, 3, 1, 2), np.float32(255.0), out=out, dtype=np.float32)
        if self.statistics is not None:
            mean, std = self.statistics
            np.subtract(out, mean.reshape(1, -1, 1, 1), out=out)
            np.divide(out, std.reshape(1, -1, 1, 1), out=out)


class TaskSampler:
    """N-way K-shot tasks with Q queries per class from one split."""

    def __init__(self, split: ImageSplit, ways: int, shots: int, queries: int, scaling: InputScaling,
                 rotate_classes: bool = False, split_name: str = "split"):
        self.split, self.ways, self.shots, self.queries = split, ways, shots, queries
        self.scaling = scaling
        self.rotate_classes = rotate_classes
        needed = shots + queries
        self.eligible = np.flatnonzero(split.class_counts >= needed)
        too_small = [name for name, count in zip(split.class_names, split.class_counts) if count < needed]
        if too_small:
            listed = ", ".join(too_small[:5]) + (", ..." if len(too_small) > 5 else "")
            warnings.warn(f"{split_name}: {len(too_small)} classes have fewer than {needed} images "
                          f"({shots} support + {queries} query) and are never sampled: {listed}")
        if len(self.eligible) < ways:
            raise DatasetError(
                f"{split_name}: only {len(self.eligible)} classes have at least {needed} images, "
                f"fewer than the {ways} ways asked for; lower num_classes_per_set, "
                f"num_samples_per_class or num_target_samples")

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One task's uint8 support [N*K, H, W, C] and query [N*Q, H, W, C] images, class by class.

        Label n is the n-th class drawn; the class order is random, so labels are shuffled per task.
        """
        classes = rng.choice(self.eligible, size=self.ways, replace=False)
        support, query = [], []
        for class_index in classes:
            pool = self.split.class_images(class_index)
            images = pool[rng.choice(len(pool), size=self.shots + self.queries, replace=False)]
            if self.rotate_classes:
                images = np.rot90(images, k=int(rng.integers(4)), axes=(1, 2))
            support.append(images[:self.shots])
            query.append(images[self.shots:])
        return np.concatenate(support), np.concatenate(query)

    def batch(self, rngs: list[np.random.Generator], pin_memory: bool = False) -> TaskBatch:
        """One task per generator, scaled straight into the (pinned, for CUDA) batch tensors."""
        height, width, channels = self.split.images.shape[1:]
        tasks = len(rngs)
        support = torch.empty((tasks, self.ways * self.shots, channels, height, width), dtype=torch.float32,
                              pin_memory=pin_memory)
        query = torch.empty((tasks, self.ways * self.queries, channels, height, width), dtype=torch.float32,
                            pin_memory=pin_memory)
        support_out, query_out = support.numpy(), query.numpy()
        for task, rng in enumerate(rngs):
            support_images, query_images = self.draw(rng)
            self.scaling.apply(support_images, support_out[task])
            self.scaling.apply(query_images, query_out[task])
        labels = np.arange(self.ways)
        support_labels = torch.from_numpy(np.tile(np.repeat(labels, self.shots), (tasks, 1)))
        query_labels = torch.from_numpy(np.tile(np.repeat(labels, self.queries), (tasks, 1)))
        if pin_memory:
            support_labels, query_labels = support_labels.pin_memory(), query_labels.pin_memory()
        return TaskBatch(support, support_labels, query, query_labels)


def channel_statistics(split: ImageSplit, max_images: int = 20000, chunk_images: int = 256) -> Statistics:
    """Per-channel mean and std of a split in [0, 1], from an evenly spaced subset of its images.

    Summed exactly in integers, a chunk at a time: a float64 copy of mini-ImageNet's training split
    would take 6 GB. `load_split` computes it once and keeps it in the cache (`ImageSplit.statistics`).
    """
    step = max(1, len(split.images) // max_images)
    selected = range(0, len(split.images), step)
    channels = split.images.shape[-1]
    total = np.zeros(channels, dtype=np.int64)
    squares = np.zeros(channels, dtype=np.int64)
    for first in range(0, len(selected), chunk_images):
        block = selected[first:first + chunk_images]
        pixels = np.asarray(split.images[block.start:block.stop:step]).reshape(-1, channels)
        total += pixels.sum(axis=0, dtype=np.int64)
        squares += np.square(pixels, dtype=np.uint32).sum(axis=0, dtype=np.int64)
    count = len(selected) * int(np.prod(split.images.shape[1:-1]))
    # Variance n*sum(x^2) - sum(x)^2 over n^2 in Python's exact integers, then in [0, 1] units.
    mean = np.array([int(t) / count / 255.0 for t in total])
    variance = np.array([(count * int(q) - int(t) ** 2) / count ** 2 for t, q in zip(total, squares)]) / 255.0 ** 2
    std = np.maximum(np.sqrt(variance), 1e-3)
    return mean.astype(np.float32), std.astype(np.float32)


class FewShotDataProvider:
    """Training batches by iteration number and fixed evaluation batches, for one config.

    The input scaling is the config's input_normalisation. Where it standardises, `input_statistics`
    gives the statistics: a trained model passes those its checkpoint recorded, also when it is
    tested on another dataset; by default they are this dataset's training split's.
    `first_train_task` is the index of this process's first task in every meta-batch: rank r of a
    distributed run draws the global tasks r*B..r*B+B-1 (utils/distributed.py).
    """

    def __init__(self, config, dataset_folder: Optional[Path] = None, dataset_name: Optional[str] = None,
                 input_statistics: Optional[Callable[[], Statistics]] = None,
                 splits: tuple[str, ...] = SPLITS, first_train_task: int = 0):
        self.config = config
        self.first_train_task = first_train_task
        self.folder = Path(dataset_folder or config.dataset_folder)
        self.name = dataset_name or config.dataset_name
        self.manifest = read_manifest(self.folder, self.name)
        self.pin_memory = torch.cuda.is_available() and config.device != "cpu"
        self.splits = {name: load_split(self.folder, name, config.image_shape, config.load_into_memory)
                       for name in splits}
        self.scaling = InputScaling.for_method(config.input_normalisation,
                                               input_statistics or self._training_split_statistics)
        self.samplers = {
            name: TaskSampler(split, config.num_classes_per_set, config.num_samples_per_class,
                              config.num_target_samples, self.scaling,
                              rotate_classes=(name == "train" and config.rotate_training_classes),
                              split_name=f"{self.name}/{name}")
            for name, split in self.splits.items()
        }
        self.workers = config.num_dataprovider_workers
        self._pool = ThreadPoolExecutor(max_workers=self.workers) if self.workers > 0 else None

    def _training_split_statistics(self) -> Statistics:
        """This dataset's training split's channel statistics, kept in its decode cache."""
        train = self.splits.get("train") or load_split(self.folder, "train", self.config.image_shape, False)
        return train.statistics

    def close(self) -> None:
        """Stop the worker threads; batches they were preparing ahead are dropped."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def train_batch(self, iteration: int) -> TaskBatch:
        rngs = [np.random.default_rng([self.config.train_seed, 0, iteration, task])
                for task in range(self.first_train_task, self.first_train_task + self.config.batch_size)]
        return self.samplers["train"].batch(rngs, self.pin_memory)

    def train_batches(self, start_iteration: int, count: int) -> Iterator[TaskBatch]:
        """Batches for iterations start..start+count-1, prepared ahead by the worker threads."""
        if self._pool is None:
            for iteration in range(start_iteration, start_iteration + count):
                yield self.train_batch(iteration)
            return
        ahead = 2 * self.workers
        pending = [self._pool.submit(self.train_batch, it)
                   for it in range(start_iteration, min(start_iteration + ahead, start_iteration + count))]
        next_iteration = start_iteration + len(pending)
        while pending:
            batch = pending.pop(0).result()
            if next_iteration < start_iteration + count:
                pending.append(self._pool.submit(self.train_batch, next_iteration))
                next_iteration += 1
            yield batch

    def evaluation_batches(self, split: str, num_tasks: int, batch_size: int,
                           first_task: int = 0) -> Iterator[TaskBatch]:
        """The fixed tasks first_task..num_tasks-1 of `split`, in batches."""
        sampler = self.samplers[split]
        code = SPLIT_CODES[split]
        for first in range(first_task, num_tasks, batch_size):
            rngs = [np.random.default_rng([self.config.val_seed, code, task])
                    for task in range(first, min(first + batch_size, num_tasks))]
            yield sampler.batch(rngs, self.pin_memory)
