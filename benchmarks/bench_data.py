"""Data pipeline benchmark: is the task loader at least 10x faster than a training iteration?

Two settings, each with its shipped config:

- `omniglot`: Omniglot 5-way 1-shot (experiment_config/omniglot_5way_1shot/CxGrad_4conv_cpu.yaml), built
  from the official zips (--omniglot-zips DIR, else $OMNIGLOT_ZIPS, else ../shared/data/omniglot), or
  copied from an already built --datasets-dir DIR/omniglot;
- `mini_imagenet_shaped`: mini-ImageNet 5-way 1-shot CxGrad (experiment_config/mini_imagenet_5way_1shot/
  CxGrad_4conv.json: 48 filters, meta-batch 4, 5 second-order steps, 15 queries) on generated 84x84 RGB
  JPEGs in 64 / 16 / 20 classes of --images-per-class images (600, like mini-ImageNet, by default).

For each it measures
- cold start: the first FewShotDataProvider, which decodes every image of the three splits into the
  uint8 cache (DATASET/.cache) and computes its channel statistics; warm start: the next one, cache present;
- loader throughput: task batches per second out of `train_batches`, with the config's
  num_dataprovider_workers and with 0, 1 and 2 worker threads (--workers);
- training: the median seconds of MAMLFewShotClassifier.run_train_iter over --iterations meta-batches
  after --warmup ones (epoch 0: the config's first- or second-order setting), on the CPU unless
  --device cuda;
- the ratio loader / training = (batches per second with the configured workers) x (seconds per iteration).

It prints one JSON line per setting, then a table, on stdout (progress goes to stderr), and exits
with status 1 if a ratio is below --min-ratio (10). Datasets are built in a temporary folder (in RAM
under /dev/shm when it has room) that is deleted afterwards; nothing under --datasets-dir is written.
Loader and training are timed one after the other, each alone on the machine's cores (torch's
default thread count; set OMP_NUM_THREADS to change it).

    python benchmarks/bench_data.py [--settings omniglot mini_imagenet_shaped]
        [--omniglot-zips DIR | --datasets-dir DIR] [--images-per-class 600] [--iterations 3]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # run as a script, sys.path[0] is benchmarks/

from data import FewShotDataProvider  # noqa: E402
from few_shot_learning_system import MAMLFewShotClassifier  # noqa: E402
from utils.backend import configure_backend, resolve_device  # noqa: E402
from preprocess.omniglot import SOURCE_ZIPS, ZIPS_ENV_VAR  # noqa: E402
from preprocess.preprocess import PreprocessError, prepare_dataset  # noqa: E402
from utils.config import ConfigError, ExperimentConfig, load_config  # noqa: E402
from utils.dataset_format import MANIFEST_NAME, SPLITS, DatasetError, read_manifest, write_manifest  # noqa: E402

SETTINGS = {
    "omniglot": REPO / "experiment_config" / "omniglot_5way_1shot" / "CxGrad_4conv_cpu.yaml",
    "mini_imagenet_shaped": REPO / "experiment_config" / "mini_imagenet_5way_1shot" / "CxGrad_4conv.json",
}
IMAGENET_SHAPED = "mini_imagenet_shaped"
MINI_IMAGENET_CLASSES = (64, 16, 20)
DEFAULT_OMNIGLOT_ZIPS = REPO.parent / "shared" / "data" / "omniglot"


# ------------------------------------------------------------------ datasets
def make_imagenet_shaped(root: Path, images_per_class: int, classes: tuple[int, int, int] = MINI_IMAGENET_CLASSES,
                         size: int = 84, seed: int = 0) -> Path:
    """A dataset shaped like mini-ImageNet: `size`x`size` RGB JPEGs in train/val/test class folders.

    Each class is a smooth colour field from a 12x12 prototype plus pixel noise: JPEGs of 4-5 kB at
    84x84 (quality 90), so the cold start decodes real JPEG data rather than blank images.
    """
    rng = np.random.default_rng(seed)
    folder = root / IMAGENET_SHAPED
    for split, count in zip(SPLITS, classes):
        for index in range(count):
            class_folder = folder / split / f"n{split}{index:05d}"
            class_folder.mkdir(parents=True)
            prototype = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize(
                (size, size), Image.BILINEAR)
            base = np.asarray(prototype, dtype=np.int16)
            for sample in range(images_per_class):
                noisy = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(noisy).save(class_folder / f"{sample:04d}.jpg", quality=90)
    settings = {"generator": "benchmarks/bench_data.py", "seed": seed, "images_per_class": images_per_class}
    write_manifest(folder, IMAGENET_SHAPED, (3, size, size), sources={}, settings=settings, skipped_images=[])
    return folder


def omniglot_dataset(work: Path, zips: Optional[Path], datasets_dir: Optional[Path]) -> Path:
    """Omniglot in `work`: copied from an existing build in `datasets_dir`, else built from the zips."""
    if datasets_dir is not None:
        built = datasets_dir / "omniglot"
        if not (built / MANIFEST_NAME).is_file():
            raise DatasetError(f"--datasets-dir {datasets_dir} holds no built Omniglot ({built / MANIFEST_NAME} "
                               f"is missing); build it with: python preprocess/preprocess.py --datasets omniglot "
                               f"--dest {datasets_dir}, or pass --omniglot-zips DIR instead")
        # A copy without the cache, so that the cold start is measured without touching the user's folder.
        return Path(shutil.copytree(built, work / "omniglot", ignore=shutil.ignore_patterns(".cache")))
    return prepare_dataset("omniglot", source=zips, dest=work, allow_download=False)


# ------------------------------------------------------------------ measurements
def start_times(config: ExperimentConfig) -> tuple[float, float]:
    """Seconds to build the data provider without its cache (cold), then again with it (warm)."""
    shutil.rmtree(config.dataset_folder / ".cache", ignore_errors=True)
    started = time.perf_counter()
    FewShotDataProvider(config)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    FewShotDataProvider(config)
    return cold, time.perf_counter() - started


def loader_batches_per_second(config: ExperimentConfig, workers: int, min_batches: int,
                              min_seconds: float, warmup: int = 2) -> float:
    """Training task batches per second through `train_batches` with `workers` threads."""
    provider = FewShotDataProvider(dataclasses.replace(config, num_dataprovider_workers=workers), splits=("train",))
    stream = provider.train_batches(0, 10 ** 9)
    for _ in range(warmup):
        next(stream)
    drawn, started = 0, time.perf_counter()
    while drawn < min_batches or time.perf_counter() - started < min_seconds:
        next(stream)
        drawn += 1
    rate = drawn / (time.perf_counter() - started)
    provider.close()  # the batches prepared ahead must not run into the next measurement
    return rate


def training_iteration_seconds(config: ExperimentConfig, iterations: int, warmup: int) -> list[float]:
    """Seconds of each timed run_train_iter on `config.device`, on meta-batches drawn beforehand.

    run_train_iter ends by reading the loss (`.item()`), so on CUDA its time includes the GPU's work.
    """
    device = resolve_device(config.device)
    configure_backend(config, device)
    torch.manual_seed(config.seed)
    model = MAMLFewShotClassifier(config, device)
    provider = FewShotDataProvider(config, splits=("train",))
    batches = [provider.train_batch(iteration) for iteration in range(warmup + iterations)]
    seconds = []
    for batch in batches:
        started = time.perf_counter()
        model.run_train_iter(batch, epoch=0)
        seconds.append(time.perf_counter() - started)
    return seconds[warmup:]


def measure(name: str, config: ExperimentConfig, config_label: str, workers: list[int], iterations: int,
            warmup: int, min_batches: int, min_seconds: float) -> dict[str, Any]:
    """Every figure of one setting, as the JSON record the benchmark prints."""
    cold, warm = start_times(config)
    configured = config.num_dataprovider_workers
    throughput = {count: loader_batches_per_second(config, count, min_batches, min_seconds)
                  for count in sorted({*workers, configured})}
    train_seconds = training_iteration_seconds(config, iterations, warmup)
    median = statistics.median(train_seconds)
    manifest = read_manifest(config.dataset_folder, config.dataset_name)
    return {
        "setting": name, "config": config_label,
        "dataset_images": {split: counts["images"] for split, counts in manifest["splits"].items()},
        "image_shape": list(config.image_shape), "ways": config.num_classes_per_set,
        "shots": config.num_samples_per_class, "queries": config.num_target_samples,
        "meta_batch": config.batch_size, "second_order": config.second_order,
        "cold_start_s": round(cold, 6), "warm_start_s": round(warm, 6),
        "configured_workers": configured,
        "loader_batches_per_s": {str(count): round(value, 2) for count, value in throughput.items()},
        "train_iteration_s_median": round(median, 4), "train_iteration_s": [round(s, 4) for s in train_seconds],
        "loader_to_training_ratio": round(throughput[configured] * median, 2),
        "device": config.device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }


# ------------------------------------------------------------------ report
def table(records: list[dict[str, Any]]) -> str:
    """The records as a readable table: one row per setting."""
    worker_counts = sorted({int(count) for record in records for count in record["loader_batches_per_s"]})
    header = (["setting", "cold start s", "warm start s"] + [f"batches/s {count}w" for count in worker_counts]
              + ["workers", "train iter s", "loader/train"])
    rows = [header]
    for record in records:
        per_worker = record["loader_batches_per_s"]
        rows.append([record["setting"], f"{record['cold_start_s']:.2f}", f"{record['warm_start_s']:.2f}"]
                    + [f"{per_worker[str(count)]:.1f}" if str(count) in per_worker else "-" for count in worker_counts]
                    + [str(record["configured_workers"]), f"{record['train_iteration_s_median']:.3f}",
                       f"{record['loader_to_training_ratio']:.1f}x"])
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def too_slow(records: list[dict[str, Any]], min_ratio: float) -> list[str]:
    """A line for every setting whose loader is less than `min_ratio` times faster than training."""
    return [f"{record['setting']}: the loader is only {record['loader_to_training_ratio']}x faster than a training "
            f"iteration, below {min_ratio}x" for record in records if record["loader_to_training_ratio"] < min_ratio]


def work_folder(parent: Optional[Path]) -> Path:
    """A fresh temporary folder: in RAM when /dev/shm has room, so that the disk does not set the pace."""
    if parent is None:
        shm = Path("/dev/shm")
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > (4 << 30):
            parent = shm
    return Path(tempfile.mkdtemp(prefix="bench_data-", dir=parent))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the module docstring (benchmarks/bench_data.py) for what is timed.")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--omniglot-zips", type=Path, metavar="DIR",
                        help=f"folder with {' and '.join(SOURCE_ZIPS)} (default: ${ZIPS_ENV_VAR}, "
                             f"else {DEFAULT_OMNIGLOT_ZIPS})")
    parser.add_argument("--datasets-dir", type=Path, metavar="DIR",
                        help="take Omniglot from DIR/omniglot, already built (copied; DIR is not written)")
    parser.add_argument("--images-per-class", type=int, default=600,
                        help="images per class of the mini-ImageNet-shaped dataset (default: 600, as mini-ImageNet)")
    parser.add_argument("--iterations", type=int, default=3, help="timed training iterations (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training iterations first (default: 1)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="worker thread counts to time the loader with, besides the config's (default: 0 1 2)")
    parser.add_argument("--loader-batches", type=int, default=20,
                        help="time at least this many loader batches (default: 20)")
    parser.add_argument("--loader-seconds", type=float, default=2.0,
                        help="and for at least this many seconds (default: 2)")
    parser.add_argument("--min-ratio", type=float, default=10.0,
                        help="exit with status 1 if loader / training is below this (default: 10)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the training iterations run (default: cpu; cuda also pins the loader's batches)")
    parser.add_argument("--work-dir", type=Path,
                        help="where to make the temporary folder (default: /dev/shm or TMPDIR)")
    args = parser.parse_args(argv)
    for option in ("images_per_class", "iterations", "loader_batches"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or min(args.workers) < 0:
        parser.error("--warmup and --workers must not be negative")
    zips = args.omniglot_zips or Path(os.environ.get(ZIPS_ENV_VAR) or DEFAULT_OMNIGLOT_ZIPS)
    os.environ.pop("DATASET_DIR", None)  # it would override the configs' datasets_dir, the temporary folder

    work = work_folder(args.work_dir)
    records = []
    try:
        for name in args.settings:
            started = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # build progress: stdout holds only the results
                if name == "omniglot":
                    folder = omniglot_dataset(work, None if args.datasets_dir else zips, args.datasets_dir)
                else:
                    folder = make_imagenet_shaped(work, args.images_per_class)
            print(f"{name}: dataset ready in {time.perf_counter() - started:.1f}s at {folder}", file=sys.stderr,
                  flush=True)
            config = load_config(SETTINGS[name], overrides={"dataset_name": folder.name, "dataset_path": folder.name,
                                                            "datasets_dir": str(work), "device": args.device})
            record = measure(name, config, str(SETTINGS[name].relative_to(REPO)), args.workers, args.iterations,
                             args.warmup, args.loader_batches, args.loader_seconds)
            records.append(record)
            print(json.dumps(record), flush=True)
    except (DatasetError, PreprocessError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(records))
    failures = too_slow(records, args.min_ratio)
    for line in failures:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
