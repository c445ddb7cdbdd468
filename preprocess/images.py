"""Converting the images of extracted class folders, and the rule for files that are not images.

Every recipe that builds from an archive ends the same way: each class folder of the
extracted archive becomes `SPLIT/CLASS/` in the output, every file in it decoded in full and
written at the dataset's size and colour mode. Files already in the target format (size,
mode, and a JPEG or PNG with a matching suffix) are copied byte for byte instead: that is
lossless and keeps an 84x84 JPEG at a few kB instead of a PNG several times larger. Every
other image is brought to the format by the dataset's `Resize` recipe and written as PNG under
its original stem. Two recipes exist (utils/dataset_format.py, since data.py resizes with them
too): the official CxGrad loader's (Pillow BICUBIC, resize then convert the colour mode), used by
the ImageNet-style datasets, imported folders and data.py for a cross-domain test set; and
convert-then-LANCZOS, which Omniglot keeps from MAML++.

Bad files: archives from the internet sometimes hold a truncated JPEG or a stray
`notes.txt` among the images. By default such a file stops the build with an error
naming it by its path inside the archive, so nobody trains on a silently different
dataset. With `skip=True` (`--skip-bad-images`) it is left out, printed, and listed in the
manifest under "skipped_images".
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from preprocess.archives import PreprocessError
from utils.dataset_format import (CONVERT_THEN_LANCZOS, DECODE_ERRORS, MANIFEST_NAME, WRITTEN_SUFFIXES_BY_FORMAT,
                                  Resize)


@dataclass(frozen=True)
class ImageFormat:
    """The size and PIL colour mode ('L' or 'RGB') every output image has, and how other images get them."""

    width: int
    height: int
    mode: str
    resize: Resize = CONVERT_THEN_LANCZOS


@dataclass
class BadImages:
    """Applies the bad-file rule for one build and collects what was skipped.

    `extract_root` is the folder the archives were extracted into, so that paths relative
    to it are the member paths the user sees when listing the archive (for an imported folder:
    the folder itself, and `archives` is that folder). `remedy` is what to do about a damaged file.
    """

    dataset: str
    extract_root: Path
    archives: list[Path]
    skip: bool
    skipped: list[dict[str, str]] = field(default_factory=list)
    remedy: str = "Fetch the archive again if it is damaged"

    @property
    def sources(self) -> str:
        return ", ".join(str(archive) for archive in self.archives)

    def handle(self, path: Path, error: BaseException) -> None:
        member = path.relative_to(self.extract_root).as_posix()
        # Pillow names the file in its message; the temporary extraction path means nothing later.
        reason = f"{type(error).__name__}: {error}".replace(str(path), member)
        if not self.skip:
            raise PreprocessError(
                f"{self.dataset}: {member} (in {self.sources}) is not a readable image ({reason}). "
                f"{self.remedy}, or run with --skip-bad-images "
                f"(skip_bad_images=True) to leave such files out; they are then listed in {MANIFEST_NAME}")
        print(f"{self.dataset}: skipping {member}: not a readable image ({reason})", flush=True)
        self.skipped.append({"path": member, "reason": reason})


def _decode(path: Path, image_format: ImageFormat) -> Image.Image | None:
    """The image converted to `image_format`, or None if the file is already in it and can be copied.

    The file is decoded in full even when it will be copied: Pillow reads lazily, and a
    truncated JPEG only fails once its pixels are read.
    """
    size = (image_format.width, image_format.height)
    with Image.open(path) as image:
        image.load()
        if (image.size == size and image.mode == image_format.mode
                and path.suffix.lower() in WRITTEN_SUFFIXES_BY_FORMAT.get(image.format or "", ())):
            return None
        return image_format.resize(image, size, image_format.mode)


def _convert_class(files: list[Path], target_dir: Path, image_format: ImageFormat, bad_images: BadImages) -> int:
    """Write the images `files` of one class into `target_dir`; returns the number written."""
    target_dir.mkdir(parents=True)
    written = 0
    for path in files:
        try:
            converted = _decode(path, image_format)
        except DECODE_ERRORS as error:
            bad_images.handle(path, error)
            continue
        # Writing stays outside the try: a full disk must not be mistaken for a bad image.
        target = target_dir / (path.name if converted is None else f"{path.stem}.png")
        if target.exists():
            raise PreprocessError(
                f"{bad_images.dataset}: two files of {path.parent.relative_to(bad_images.extract_root).as_posix()} "
                f"would both be written as {target.name}; rename one of them in {bad_images.sources}")
        if converted is None:
            shutil.copyfile(path, target)
        else:
            converted.save(target)
        written += 1
    return written


def convert_classes(jobs: list[tuple[Path, Path]], image_format: ImageFormat, bad_images: BadImages) -> None:
    """Convert (source class folder, target class folder) pairs: every file of each source folder."""
    convert_files([(sorted(source_dir.iterdir()), target_dir) for source_dir, target_dir in jobs],
                  image_format, bad_images)


def convert_files(jobs: list[tuple[list[Path], Path]], image_format: ImageFormat, bad_images: BadImages) -> None:
    """Convert (files of one class, target class folder) pairs, printing five progress lines."""
    report_every = max(1, -(-len(jobs) // 5))
    images = 0
    for done, (files, target_dir) in enumerate(jobs, start=1):
        images += _convert_class(files, target_dir, image_format, bad_images)
        if done % report_every == 0 or done == len(jobs):
            print(f"{bad_images.dataset}: converted {done}/{len(jobs)} classes ({images} images)", flush=True)
