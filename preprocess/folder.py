"""Any folder of images imported as a few-shot dataset (`--from-folder`).

Two layouts are read from the source folder DIR:

* pre-split: `DIR/{train,val,test}/CLASS/IMAGE`, the split the folder already has (as MAML++ and the
  official CxGrad code read datasets); all three splits must be there, each with a class, and no class
  in two splits;
* flat: `DIR/CLASS/IMAGE`, whose classes are split into train / val / test by `--split-fractions`
  (default 0.64 0.16 0.20, mini-ImageNet's 64/16/20) and `--seed`: the class names, sorted, are
  permuted by `numpy.random.default_rng(seed)`, and the first round(f_train * N) become train, the
  next val, the rest test. A fraction may be 0 (an empty split): `0 0 1` makes every class a test
  class, a dataset for a cross-domain test only.

Images of any size and mode are brought to one size and channel count, `--image-size HxWxC` (e.g.
28x28x1; C is 1 for greyscale or 3 for RGB). By default the size is the median height and median
width of the images, and the channels 1 if every image is greyscale, else 3. The resize is the
official CxGrad loader's (utils.dataset_format.CXGRAD_RESIZE: Pillow BICUBIC to the size, without
cropping, then convert to 'L' or 'RGB'), the one the ImageNet-style datasets are built with and a
cross-domain test set is resized with at load time; JPEG/PNG files already of that size and mode are
copied unchanged. The split, fractions, seed and resize are recorded in the manifest's settings, and
the folder's path and a digest of its files under "sources", so a re-run with the same folder and
options is a no-op and a changed image rebuilds.

What is refused, with the file or class named and nothing written: a source that is missing or
empty, or holds no class folders; a pre-split layout missing a split; class or dataset names that
could leave the destination or hide in it (a path separator, '..', absolute, hidden); a class with
fewer than `--min-images-per-class` images (default 2: one support and one query image, the least any
task draws); a file in a class folder that is not a readable image (left out and listed in the
manifest with `--skip-bad-images`). Hidden files in class folders (.DS_Store, macOS '._' files) are
operating-system metadata and are ignored, with a note; so are files next to the class folders.
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from PIL import Image

from preprocess.archives import PreprocessError, sha256_file
from preprocess.images import BadImages, ImageFormat, convert_files
from utils.dataset_format import (CXGRAD_RESIZE, DECODE_ERRORS, MANIFEST_NAME, SPLITS, image_shape_from_manifest,
                                  classes_in_two_splits, is_written_image, preprocess_command)

DEFAULT_SPLIT_FRACTIONS = (0.64, 0.16, 0.20)
DEFAULT_MIN_IMAGES_PER_CLASS = 2  # one support + one query image: the fewest any task draws from a class
CHANNEL_MODES = {1: "L", 3: "RGB"}
# Pillow modes without colour; a palette ('P') image is grey when every palette entry is.
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass(frozen=True)
class FolderImport:
    """A checked plan of one import: which files become which split's classes, at which shape.

    `classes` maps split -> {class name: the class's image files, sorted}. `image_shape` is (C, H, W).
    """

    name: str
    source: Path
    layout: str  # "pre-split" or "flat"
    classes: dict[str, dict[str, list[Path]]]
    image_shape: tuple[int, int, int]
    settings: dict[str, Any]
    skipped: tuple[dict[str, str], ...]  # files left out while planning (--skip-bad-images)
    min_images_per_class: int


def parse_image_size(text: str) -> tuple[int, int, int]:
    """'HxWxC' (as 84x84x3; C 1 or 3) -> the shape (C, H, W)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise PreprocessError(f"--image-size {text!r}: expected HEIGHTxWIDTHxCHANNELS with positive integers, "
                              f"e.g. 28x28x1 (greyscale) or 84x84x3 (RGB)")
    height, width, channels = map(int, parts)
    if channels not in CHANNEL_MODES:
        raise PreprocessError(f"--image-size {text!r}: channels must be 1 (greyscale) or 3 (RGB), not {channels}")
    return (channels, height, width)


def format_image_size(image_shape: tuple[int, int, int]) -> str:
    """The shape (C, H, W) as --image-size writes it, 'HxWxC'."""
    channels, height, width = image_shape
    return f"{height}x{width}x{channels}"


def check_name(name: str, what: str) -> None:
    """Refuse a dataset or class name that would not stay one visible folder inside the destination."""
    problem = None
    if not name or name.strip() != name:
        problem = "is empty or starts or ends with white space"
    elif PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute():
        problem = "is an absolute path"
    elif "/" in name or "\\" in name:
        problem = "holds a path separator"
    elif name in (".", ".."):
        problem = "names a folder itself or its parent"
    elif name.startswith("."):
        problem = "is hidden (starts with '.')"
    elif any(ord(character) < 32 for character in name):
        problem = "holds a control character"
    if problem:
        raise PreprocessError(f"{what} {name!r} {problem}: it would not be one ordinary folder inside the "
                              f"destination; rename it")


def plan_import(name: str, source: Path, split_fractions: tuple[float, ...] | None, seed: int,
                image_size: str | None, min_images_per_class: int, skip_bad_images: bool) -> FolderImport:
    """Read and check the source folder (image headers only, nothing is written); PreprocessError on bad input."""
    # The options first: they are checked in no time, the folder may take a while to read.
    given_shape = parse_image_size(image_size) if image_size else None
    if split_fractions is not None:
        _check_fractions(split_fractions)
    if not source.is_dir():
        raise PreprocessError(f"{name}: --source {source} is not a folder" if source.exists()
                              else f"{name}: --source {source} does not exist")
    if min_images_per_class < 1:
        raise PreprocessError(f"--min-images-per-class is {min_images_per_class}; it must be at least 1")
    source = source.resolve()  # every path below is relative to it, in messages and in the manifest
    entries = _visible_entries(name, source)
    if not entries:
        raise PreprocessError(f"{name}: {source} is empty; expected {source}/CLASS/IMAGE or "
                              f"{source}/{{train,val,test}}/CLASS/IMAGE")
    folders = [entry.name for entry in entries if entry.is_dir()]
    split_folders = [folder for folder in folders if folder in SPLITS]
    bad_images = BadImages(name, source, [source], skip_bad_images, remedy="Replace or delete it")

    if split_folders:
        if split_fractions is not None:
            raise PreprocessError(f"{name}: {source} is already split into {', '.join(split_folders)}/; "
                                  f"--split-fractions only applies to a flat {source}/CLASS/IMAGE folder")
        classes, layout = _pre_split_classes(name, source, entries, bad_images), "pre-split"
        settings = {"import": "folder", "layout": f"pre-split: the folder's own {'/'.join(SPLITS)} folders"}
    else:
        if not folders:
            raise PreprocessError(f"{name}: {source} holds no class folders ({len(entries)} file(s) directly in "
                                  f"it); expected {source}/CLASS/IMAGE or {source}/{{train,val,test}}/CLASS/IMAGE")
        fractions = _check_fractions(split_fractions if split_fractions is not None else DEFAULT_SPLIT_FRACTIONS)
        all_classes = _read_classes(name, source, bad_images)
        classes, layout = _split_classes(name, source, all_classes, fractions, seed), "flat"
        settings = {"import": "folder", "layout": "flat: class folders split by fractions and seed",
                    "split_fractions": list(fractions), "split_seed": seed,
                    "split_rule": "class names sorted, permuted by numpy.random.default_rng(split_seed); the first "
                                  "round(f_train * N) train, up to round((f_train + f_val) * N) val, the rest test"}

    _check_class_sizes(name, classes, min_images_per_class)
    image_shape = given_shape or _typical_shape(name, classes)
    channels, height, width = image_shape
    mode = CHANNEL_MODES[channels]  # sizes below are Pillow's width x height
    settings["resize"] = (f"{CXGRAD_RESIZE.describe((width, height), mode)}, without cropping; JPEG/PNG files "
                          f"already {width}x{height} {mode} are copied unchanged")
    return FolderImport(name, source, layout, classes, image_shape, settings, tuple(bad_images.skipped),
                        min_images_per_class)


def _pre_split_classes(name: str, source: Path, entries: list[Path],
                       bad_images: BadImages) -> dict[str, dict[str, list[Path]]]:
    """The classes of `source/{train,val,test}/CLASS/`: all three splits there, none empty, no class in two."""
    split_folders = [entry.name for entry in entries if entry.is_dir() and entry.name in SPLITS]
    others = [entry.name for entry in entries if entry.is_dir() and entry.name not in SPLITS]
    if others:
        raise PreprocessError(f"{name}: {source} mixes split folders ({', '.join(split_folders)}) with other folders "
                              f"({', '.join(others[:5])}); use either {source}/{{train,val,test}}/CLASS/IMAGE or "
                              f"{source}/CLASS/IMAGE")
    missing = [split for split in SPLITS if split not in split_folders]
    if missing:
        raise PreprocessError(f"{name}: {source} is split into {'/'.join(split_folders)} but has no "
                              f"{' or '.join(missing)} split: {source}/{missing[0]}/ is missing. Add it (every split "
                              f"needs its own classes), or put all class folders directly in a folder and split them "
                              f"with --split-fractions")
    _note_ignored_files(name, entries)
    classes = {split: _read_classes(name, source / split, bad_images) for split in SPLITS}
    empty = [split for split in SPLITS if not classes[split]]
    if empty:
        raise PreprocessError(f"{name}: {source}/{empty[0]}/ holds no class folders; every split needs classes "
                              f"(a test-only dataset: put its classes in one flat folder and import it with "
                              f"--split-fractions 0 0 1)")
    overlap = classes_in_two_splits(classes)
    if overlap:
        split, later, shared = overlap
        raise PreprocessError(f"{name}: class(es) {', '.join(shared[:5])} are in both {source}/{split} "
                              f"and {source}/{later}; a class must be in one split only")
    return classes


def _visible_entries(name: str, folder: Path) -> list[Path]:
    """The entries of `folder`, sorted, without hidden ones (.ipynb_checkpoints/, .git/, .DS_Store), which
    belong to no class or split: each is named in a note and left out."""
    entries = sorted(folder.iterdir())
    for entry in entries:
        if entry.name.startswith("."):
            print(f"{name}: ignoring {entry}: hidden", flush=True)
    return [entry for entry in entries if not entry.name.startswith(".")]


def _note_ignored_files(name: str, entries: list[Path]) -> None:
    """Files next to class (or split) folders belong to no class (a README, .DS_Store): say so and go on."""
    for entry in entries:
        if not entry.is_dir():
            print(f"{name}: ignoring {entry}: not a class folder", flush=True)


def _read_classes(name: str, folder: Path, bad_images: BadImages) -> dict[str, list[Path]]:
    """{class name: its image files} of the class folders in `folder`; unreadable files per the bad-file rule."""
    classes, hidden = {}, []
    entries = _visible_entries(name, folder)
    _note_ignored_files(name, entries)
    for class_dir in (entry for entry in entries if entry.is_dir()):
        check_name(class_dir.name, f"{name}: class folder {class_dir}:")
        files = []
        for path in sorted(class_dir.iterdir()):
            if path.name.startswith("."):
                hidden.append(path)
            elif _is_image(path, bad_images):
                files.append(path)
        classes[class_dir.name] = files
    if hidden:
        print(f"{name}: ignoring {len(hidden)} hidden file(s) in the class folders of {folder}, e.g. {hidden[0]}",
              flush=True)
    return classes


def _is_image(path: Path, bad_images: BadImages) -> bool:
    """Whether Pillow recognises the file as an image (header only); otherwise the bad-file rule applies."""
    try:
        with Image.open(path):
            return True
    except DECODE_ERRORS as error:
        bad_images.handle(path, error)  # raises unless --skip-bad-images
        return False


def _check_fractions(fractions: tuple[float, ...]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(not 0.0 <= fraction <= 1.0 for fraction in fractions) \
            or abs(sum(fractions) - 1.0) > 1e-6:
        raise PreprocessError(f"--split-fractions {' '.join(map(str, fractions))}: expected three fractions "
                              f"(train val test) between 0 and 1 that add up to 1, e.g. 0.64 0.16 0.20")
    return tuple(float(fraction) for fraction in fractions)  # type: ignore[return-value]


def _split_classes(name: str, source: Path, classes: dict[str, list[Path]], fractions: tuple[float, float, float],
                   seed: int) -> dict[str, dict[str, list[Path]]]:
    """The flat layout's split rule (module docstring); every split with a fraction above 0 gets a class."""
    names = sorted(classes)
    order = [names[index] for index in np.random.default_rng(seed).permutation(len(names))]
    train_end = round(fractions[0] * len(names))
    val_end = round((fractions[0] + fractions[1]) * len(names))
    bounds = {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, len(names))}
    result = {split: {class_name: classes[class_name] for class_name in order[start:end]}
              for split, (start, end) in bounds.items()}
    short = [split for split, fraction in zip(SPLITS, fractions) if fraction > 0 and not result[split]]
    if short:
        raise PreprocessError(f"{name}: {source} holds {len(names)} class folder(s); --split-fractions "
                              f"{' '.join(map(str, fractions))} leave(s) {' and '.join(short)} without a class. "
                              f"Add classes or change the fractions")
    return result


def _check_class_sizes(name: str, classes: dict[str, dict[str, list[Path]]], minimum: int) -> None:
    """Refuse classes too small for a task, naming them and the settings they would allow."""
    small = [(split, class_name, len(files)) for split in SPLITS for class_name, files in classes[split].items()
             if len(files) < minimum]
    if not small:
        return
    split, class_name, count = small[0]
    listed = ", ".join(f"{s}/{c} ({n})" for s, c, n in small[:5]) + (", ..." if len(small) > 5 else "")
    allows = ("no task at all (a task draws at least one support and one query image per class)" if count < 2 else
              f"only tasks with num_samples_per_class + num_target_samples <= {count}")
    raise PreprocessError(
        f"{name}: {len(small)} class(es) hold fewer than --min-images-per-class {minimum} images: {listed}. "
        f"Class {split}/{class_name} has {count} image(s), which allows {allows}. Add images to these classes, "
        f"remove them, or lower --min-images-per-class" + (f" to {count}" if count >= 2 else ""))


def _is_grey(image: Image.Image) -> bool:
    if image.mode == "P":
        palette = image.getpalette() or []
        return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))
    return image.mode in _GREY_MODES


def _typical_shape(name: str, classes: dict[str, dict[str, list[Path]]]) -> tuple[int, int, int]:
    """(C, H, W): the median height and width of the images, 1 channel if all are grey, else 3."""
    heights, widths, grey = [], [], True
    for split_classes in classes.values():
        for files in split_classes.values():
            for path in files:
                with Image.open(path) as image:
                    widths.append(image.width)
                    heights.append(image.height)
                    grey = grey and _is_grey(image)
    shape = (1 if grey else 3, int(statistics.median_low(heights)), int(statistics.median_low(widths)))
    print(f"{name}: image size {format_image_size(shape)} (median height and width of {len(heights)} images, "
          f"{'all greyscale' if grey else 'some in colour: RGB'}); choose another with --image-size HxWxC", flush=True)
    return shape


def fingerprint(plan: FolderImport) -> dict[str, dict[str, Any]]:
    """The manifest's "sources": the source folder, and a sha256 over the path and content of every file read."""
    digest, total, count = hashlib.sha256(), 0, 0
    for split in SPLITS:
        for files in plan.classes[split].values():
            for path in files:
                digest.update(f"{path.relative_to(plan.source).as_posix()}\0{sha256_file(path)}\n".encode())
                total += path.stat().st_size
                count += 1
    return {str(plan.source): {"sha256": digest.hexdigest(), "size_bytes": total, "files": count}}


def write_splits(plan: FolderImport, out_dir: Path, skip_bad_images: bool) -> list[dict[str, str]]:
    """Write `out_dir/SPLIT/CLASS/*` at the plan's shape; returns the files left out as unreadable images."""
    channels, height, width = plan.image_shape
    image_format = ImageFormat(width, height, CHANNEL_MODES[channels], CXGRAD_RESIZE)
    bad_images = BadImages(plan.name, plan.source, [plan.source], skip_bad_images, remedy="Replace or delete it")
    for split in SPLITS:
        (out_dir / split).mkdir(parents=True)  # also a split with no classes: the format has all three
    jobs = [(files, out_dir / split / class_name)
            for split in SPLITS for class_name, files in plan.classes[split].items()]
    convert_files(jobs, image_format, bad_images)
    # A file Pillow recognised may still fail to decode (a truncated JPEG); skipped, it may leave a class short.
    written = {split: {class_dir.name: _written_images(class_dir) for class_dir in (out_dir / split).iterdir()}
               for split in SPLITS}
    _check_class_sizes(plan.name, written, plan.min_images_per_class)
    counts = ", ".join(f"{len(plan.classes[split])} {split}" for split in SPLITS)
    print(f"{plan.name}: imported {plan.source} ({plan.layout}; classes: {counts}). Train on it with "
          f"--dataset_name {plan.name} --image_height {height} --image_width {width} --image_channels {channels}, "
          f"or test a trained model on it with --test_dataset {plan.name}", flush=True)
    return [*plan.skipped, *bad_images.skipped]


def _written_images(class_dir: Path) -> list[Path]:
    return [path for path in class_dir.iterdir() if is_written_image(path.name)]


def rebuild_hint(name: str, dest: Path, manifest: dict[str, Any]) -> str | None:
    """For a dataset imported from a folder, the command that imports it again; None for any other dataset."""
    settings, sources = manifest.get("settings"), manifest.get("sources")
    if not (isinstance(settings, dict) and settings.get("import") == "folder" and isinstance(sources, dict)
            and len(sources) == 1):
        return None
    options = ["--source", next(iter(sources)), "--from-folder"]
    if "split_fractions" in settings:
        options += ["--split-fractions", *map(str, settings["split_fractions"]), "--seed", str(settings["split_seed"])]
    shape = image_shape_from_manifest(manifest)
    if shape is not None:
        options += ["--image-size", format_image_size(shape)]
    return f"{name} in {dest} was imported from a folder ({MANIFEST_NAME} says so); import it again with: " \
           f"{preprocess_command(name, dest, *options)}"
