"""The on-disk dataset format: what preprocess/ writes and data.py and utils/preflight.py read.

A built dataset is a folder `DEST/NAME/{train,val,test}/CLASS/IMAGE` plus `DEST/NAME/manifest.json`.
Images are PNG, except JPEGs (and PNGs) copied unchanged from a source because they already had the
dataset's size and mode (preprocess/images.py):

    {
      "format_version": 1,
      "dataset": "omniglot",
      "image_size": [28, 28, 1],                      # [H, W, C]: see "Image shapes" below
      "splits": {"train": {"classes": 1150, "images": 23000}, ...},
      "sources": {"images_background.zip": {"sha256": "...", "size_bytes": 8382694}, ...},
      "settings": {...},                              # seed for generated data, split rule, resize recipe, ...
      "skipped_images": [{"path": "...", "reason": "..."}],  # unreadable files left out (--skip-bad-images)
      "built_at": "2025-01-01T12:00:00+00:00"
    }

A folder counts as built only if its manifest exists; the builder writes it last. A dataset made by
hand needs only the class folders and a manifest (`image_size` lets utils/preflight.py check it).

Image shapes: in code a shape is (C, H, W) everywhere, the order of torch tensors, the config's
`image_shape` and the model. The manifest keeps "image_size" as [H, W, C], the order format version 1
was written in, so existing builds stay valid; `manifest_image_size` and `image_shape_from_manifest`
are the only code that knows that order.

This module imports nothing of the project, so the builder (preprocess/) and the loader (data.py)
can both depend on it without depending on each other.
"""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from PIL import Image

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# A split's code seeds its evaluation tasks (data.py), so these numbers must never change; the split
# order train, val, test is also the order everything iterates in.
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
SPLITS = tuple(SPLIT_CODES)

# What the builder writes, by Pillow format: a PNG, or a JPEG/PNG copied unchanged under a suffix that
# names its real format (the loader selects files by suffix, so it reads every file the builder writes).
WRITTEN_SUFFIXES_BY_FORMAT = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg")}
WRITTEN_IMAGE_SUFFIXES = frozenset(suffix for suffixes in WRITTEN_SUFFIXES_BY_FORMAT.values() for suffix in suffixes)
# What the loader reads: also the formats a dataset folder made by hand may hold. Other files in a class
# folder are not images of the dataset (the builder never writes them; a hand-made folder's notes.txt).
READABLE_IMAGE_SUFFIXES = WRITTEN_IMAGE_SUFFIXES | {".bmp", ".gif", ".tif", ".tiff", ".webp"}

# What Pillow raises for unreadable, truncated or absurdly large files, and IsADirectoryError (an
# OSError) for a folder where an image should be: the builder's bad-file rule and the loader's error.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

PREPROCESS_SCRIPT = "preprocess/preprocess.py"


class DatasetError(ValueError):
    """A dataset is missing, malformed or too small for the requested tasks."""


def is_readable_image(file_name: str) -> bool:
    """Whether the loader reads this file of a class folder as an image (by its suffix, any case)."""
    return os.path.splitext(file_name)[1].lower() in READABLE_IMAGE_SUFFIXES


def is_written_image(file_name: str) -> bool:
    """Whether this file of a built class folder is one of the images the builder wrote (as the manifest counts)."""
    return os.path.splitext(file_name)[1].lower() in WRITTEN_IMAGE_SUFFIXES


def manifest_image_size(image_shape: tuple[int, int, int]) -> list[int]:
    """The manifest's "image_size" [H, W, C] for a shape (C, H, W)."""
    channels, height, width = image_shape
    return [height, width, channels]


def image_shape_from_manifest(manifest: dict[str, Any]) -> Optional[tuple[int, int, int]]:
    """The (C, H, W) a manifest records, or None when it records none (a dataset made by hand)."""
    size = manifest.get("image_size")
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(value, int) for value in size)):
        return None
    height, width, channels = size
    return (channels, height, width)


# ------------------------------------------------------------------ resizing
@dataclass(frozen=True)
class Resize:
    """How an image of another size and colour mode is brought to the target ones, without cropping.

    `filter` names a Pillow resampling filter; `convert_first` converts the colour mode before
    resizing instead of after. The order matters beyond rounding: Pillow resizes palette ('P')
    and bilevel ('1') images with NEAREST whatever the filter, and RGBA with premultiplied alpha.
    """

    filter: str
    convert_first: bool

    def __call__(self, image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
        """`image` at `size` (width, height) in `mode`; an image already that size is only converted."""
        if self.convert_first:
            image = image.convert(mode)
        if image.size != size:
            image = image.resize(size, Image.Resampling[self.filter])
        return image if self.convert_first else image.convert(mode)

    def describe(self, size: tuple[int, int], mode: str) -> str:
        """The recipe in words, as the manifest records it (a changed recipe rebuilds the dataset)."""
        resize = f"Pillow {self.filter} resize to {size[0]}x{size[1]}"
        convert = f"convert('{mode}')"
        return f"{convert}, then {resize}" if self.convert_first else f"{resize}, then {convert}"


# The official CxGrad loader: `Image.open(path).resize((H, W)).convert('RGB')` with Pillow's default
# filter, BICUBIC. The ImageNet-style datasets and imported folders are built with it, and data.py
# resizes a cross-domain test set with it, so all see the pixels the official code sees.
CXGRAD_RESIZE = Resize("BICUBIC", convert_first=False)
# MAML++'s Omniglot preprocessing (greyscale, then LANCZOS), which Omniglot keeps.
CONVERT_THEN_LANCZOS = Resize("LANCZOS", convert_first=True)


# ------------------------------------------------------------------ manifest and folders
def preprocess_command(name: str, dest: Path, *options: str) -> str:
    """The command that builds dataset `name` into `dest`, for error messages."""
    return " ".join(["python", PREPROCESS_SCRIPT, "--datasets", name, "--dest", str(dest), *options])


def read_manifest(folder: Path, name: Optional[str] = None) -> dict[str, Any]:
    """The manifest of the dataset in `folder` (named `name`, default the folder's name).

    Raises DatasetError saying that the dataset is not built, or that its manifest is damaged, with
    the command that builds it.
    """
    folder = Path(folder)
    name = name or folder.name
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise DatasetError(f"dataset '{name}' is not built: {path} does not exist. Build it with:\n"
                           f"  {preprocess_command(name, folder.parent)}")
    try:
        content = json.loads(path.read_text())
        problem = None if isinstance(content, dict) else f"it holds a JSON {type(content).__name__}, not an object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = str(error)
    if problem:
        raise DatasetError(f"dataset '{name}': {path} is damaged ({problem}); rebuild the dataset with:\n"
                           f"  {preprocess_command(name, folder.parent, '--force')}")
    return content


def split_folder(folder: Path, split: str, name: Optional[str] = None) -> Path:
    """`folder/split`; DatasetError naming it, with the command that rebuilds the dataset, if it is missing."""
    path = Path(folder) / split
    if not path.is_dir():
        name = name or Path(folder).name
        raise DatasetError(f"dataset '{name}' has no '{split}' split ({path} is missing); rebuild it with:\n"
                           f"  {preprocess_command(name, Path(folder).parent, '--force')}")
    return path


def classes_in_two_splits(classes: dict[str, Any]) -> Optional[tuple[str, str, list[str]]]:
    """The first two splits that share a class, with the shared names (a class lies in one split only);
    `classes` maps each split to its class names (any mapping or set of them)."""
    for index, split in enumerate(SPLITS):
        for later in SPLITS[index + 1:]:
            shared = sorted(set(classes[split]) & set(classes[later]))
            if shared:
                return split, later, shared
    return None


def count_split_contents(folder: Path) -> dict[str, dict[str, int]]:
    """Classes and written images per split of a dataset folder, as the manifest's "splits" records them."""
    counts = {}
    for split in SPLITS:
        class_dirs = [entry for entry in (folder / split).iterdir() if entry.is_dir()]
        images = sum(1 for class_dir in class_dirs for entry in class_dir.iterdir() if is_written_image(entry.name))
        counts[split] = {"classes": len(class_dirs), "images": images}
    return counts


def write_manifest(folder: Path, dataset: str, image_shape: tuple[int, int, int], sources: dict[str, Any],
                   settings: dict[str, Any], skipped_images: list[dict[str, str]]) -> dict[str, Any]:
    """Count the splits written in `folder`, write its manifest (last: it marks the build complete), return it.

    `image_shape` is (C, H, W); `settings` must be JSON-serialisable (tuples are stored as lists).
    """
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "image_size": manifest_image_size(image_shape),
        "splits": count_split_contents(folder),
        "sources": sources,
        "settings": settings,
        "skipped_images": skipped_images,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
