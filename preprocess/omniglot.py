"""Omniglot from the official zips (Lake et al., https://github.com/brendenlake/omniglot).

Sources: `images_background.zip` (964 characters in 30 alphabets) and
`images_evaluation.zip` (659 characters in 20 alphabets). Inside them images lie at
`images_background/ALPHABET/characterNN/*.png` (105x105 binary), likewise for evaluation.

Output: every image converted to greyscale ('L'), resized to 28x28 with LANCZOS and saved
under its original file name in `SPLIT/ALPHABET__CHARACTER/` (e.g. `Latin__character01`).
Polarity is unchanged from the originals: black strokes on a white background.
A file in a character folder that is not a readable image stops the build with an error
naming it, or is skipped and listed in the manifest with --skip-bad-images (preprocess/images.py).

Split (`--omniglot-split`, recorded in the manifest's settings, so changing it rebuilds):

* `maml++` (default): exactly MAML++'s class split. The 1623 class names `ALPHABET/characterNN` of
  both zips merged, in Python's sorted order, are indexed 0..1622; the indices are shuffled with
  `numpy.random.RandomState(s).shuffle` where `s = numpy.random.RandomState(0).randint(1, 999999)`
  (MAML++ derives its split seed from `val_seed` 0 this way); the first 1150 are train, the next 50
  val, the last 423 test (its `train_val_test_split` [0.70918052988, 0.03080714725, 0.2606284658]).
  Validation characters come from many alphabets, like the test characters.
* `sorted`: the 964 background characters and the first 186 evaluation characters, sorted by
  (alphabet, character), train; the next 50 evaluation characters val; the last 423 test. Validation
  then holds one or two alphabets, and its accuracy trails the test accuracy by several points.

Every character has 20 images (drawn by 20 different people).

Rotation augmentation is NOT done here: the training sampler rotates training classes
by multiples of 90 degrees when it samples tasks, so the folders hold each character
exactly once.

Source lookup (see `locate_zips`): `--source DIR` if given; otherwise
`DEST/omniglot_raw/`, then the folder named by the OMNIGLOT_ZIPS environment variable;
otherwise the zips are downloaded into `DEST/omniglot_raw/` (disable with
`allow_download=False` or FSL_NO_DOWNLOAD=1).
"""

from __future__ import annotations

import http.client
import os
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.archives import PreprocessError, safe_extract
from preprocess.images import BadImages, ImageFormat, convert_classes

BACKGROUND_ZIP = "images_background.zip"
EVALUATION_ZIP = "images_evaluation.zip"
SOURCE_ZIPS = (BACKGROUND_ZIP, EVALUATION_ZIP)
DOWNLOAD_PAGE = "https://github.com/brendenlake/omniglot/tree/master/python"
DOWNLOAD_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{file_name}"
DOWNLOAD_TIMEOUT_S = 30
RAW_FOLDER = "omniglot_raw"
ZIPS_ENV_VAR = "OMNIGLOT_ZIPS"

IMAGE_SIZE = 28
IMAGE_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)  # (C, H, W)
IMAGE_FORMAT = ImageFormat(IMAGE_SIZE, IMAGE_SIZE, "L")
BACKGROUND_CHARACTERS = 964
EVALUATION_CHARACTERS = 659
TRAIN_CHARACTERS = 1150
VAL_CHARACTERS = 50
TRAIN_EVALUATION_CHARACTERS = TRAIN_CHARACTERS - BACKGROUND_CHARACTERS  # the `sorted` split's 186
SPLIT_RULES = {
    "maml++": ("MAML++: 'ALPHABET/characterNN' of both zips sorted, indices shuffled by "
               "RandomState(RandomState(0).randint(1, 999999)); first 1150 train / next 50 val / last 423 test"),
    "sorted": ("background 964 + first 186 evaluation / next 50 evaluation / last 423 evaluation; "
               "sorted by (alphabet, character)"),
}
DEFAULT_SPLIT = "maml++"


def settings(split: str = DEFAULT_SPLIT) -> dict[str, Any]:
    """The build settings recorded in the manifest (a change of any of them rebuilds)."""
    return {
        "split_rule": SPLIT_RULES[split],
        "resize": "convert('L'), LANCZOS to 28x28",
        "polarity": "black strokes on white background",
    }


Character = tuple[str, str]  # (alphabet, character) folder names


def split_characters(background: list[Character], evaluation: list[Character],
                     split: str = DEFAULT_SPLIT) -> dict[str, list[Character]]:
    """Apply split rule `split` (see the module docstring) to the character lists of the two zips."""
    if split == "maml++":
        # MAML++ names a class by its last two folders and sorts those strings ('/' joins them).
        names = sorted(f"{alphabet}/{character}" for alphabet, character in [*background, *evaluation])
        indices = np.arange(len(names), dtype=np.int32)
        np.random.RandomState(np.random.RandomState(0).randint(1, 999999)).shuffle(indices)
        shuffled = [tuple(names[index].split("/")) for index in indices]
        val_end = TRAIN_CHARACTERS + VAL_CHARACTERS
        return {"train": shuffled[:TRAIN_CHARACTERS], "val": shuffled[TRAIN_CHARACTERS:val_end],
                "test": shuffled[val_end:]}
    if split == "sorted":
        background, evaluation = sorted(background), sorted(evaluation)
        val_end = TRAIN_EVALUATION_CHARACTERS + VAL_CHARACTERS
        return {
            "train": background + evaluation[:TRAIN_EVALUATION_CHARACTERS],
            "val": evaluation[TRAIN_EVALUATION_CHARACTERS:val_end],
            "test": evaluation[val_end:],
        }
    raise PreprocessError(f"omniglot: unknown split {split!r}; choose one of {', '.join(SPLIT_RULES)}")


def class_folder_name(character: Character) -> str:
    alphabet, name = character
    return f"{alphabet}__{name}"


def _missing_zips_message(missing: list[str], searched: list[Path]) -> str:
    folders = ", ".join(str(folder) for folder in searched) or "(no folder)"
    return (f"omniglot: {' and '.join(missing)} not found in {folders}. "
            f"Download {' and '.join(SOURCE_ZIPS)} from {DOWNLOAD_PAGE}, put them in a folder DIR and run: "
            f"python preprocess/preprocess.py --datasets omniglot --source DIR")


def locate_zips(source: Path | None, dest: Path, allow_download: bool) -> dict[str, Path]:
    """Find both Omniglot zips, downloading them if allowed; returns {file name: path}.

    With an explicit `source` folder nothing else is searched, so a typo in the folder
    cannot silently fall back to some other copy.
    """
    if source is not None:
        missing = [name for name in SOURCE_ZIPS if not (source / name).is_file()]
        if missing:
            raise PreprocessError(_missing_zips_message(missing, [source]))
        return {name: source / name for name in SOURCE_ZIPS}

    raw_dir = dest / RAW_FOLDER
    candidates = [raw_dir]
    if os.environ.get(ZIPS_ENV_VAR):
        candidates.append(Path(os.environ[ZIPS_ENV_VAR]))
    found: dict[str, Path] = {}
    for name in SOURCE_ZIPS:
        for folder in candidates:
            if (folder / name).is_file():
                found[name] = folder / name
                break
    missing = [name for name in SOURCE_ZIPS if name not in found]
    if not missing:
        return found
    if not allow_download:
        raise PreprocessError(_missing_zips_message(missing, candidates) + " (downloading is disabled)")
    for name in missing:
        found[name] = _download(name, raw_dir, candidates)
    return found


def _download(file_name: str, raw_dir: Path, searched: list[Path]) -> Path:
    """Download one zip into `raw_dir`, via a temporary file so a broken download never looks complete."""
    url = DOWNLOAD_URL.format(file_name=file_name)
    target = raw_dir / file_name
    partial = raw_dir / f".{file_name}.download-{os.getpid()}"
    raw_dir.mkdir(parents=True, exist_ok=True)
    print(f"omniglot: downloading {url}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        if not zipfile.is_zipfile(partial):
            raise PreprocessError(f"omniglot: {url} did not return a zip file. "
                                  + _missing_zips_message([file_name], searched))
        os.replace(partial, target)
    except (OSError, http.client.HTTPException) as exc:  # URLError and timeouts are OSErrors
        raise PreprocessError(f"omniglot: download of {url} failed ({exc}). "
                              + _missing_zips_message([file_name], searched)) from exc
    finally:
        partial.unlink(missing_ok=True)
    return target


def _list_characters(root: Path, expected: int, zip_path: Path) -> list[Character]:
    """(alphabet, character) pairs under an extracted `images_*` folder, checked against the expected count."""
    if not root.is_dir():
        raise PreprocessError(f"omniglot: {zip_path} does not contain a top-level folder {root.name}/; "
                              f"is it the official file from {DOWNLOAD_PAGE}?")
    characters = sorted((alphabet.name, character.name)
                        for alphabet in root.iterdir() if alphabet.is_dir()
                        for character in alphabet.iterdir() if character.is_dir())
    if len(characters) != expected:
        raise PreprocessError(f"omniglot: {zip_path} holds {len(characters)} characters, expected {expected}; "
                              f"is it the official file from {DOWNLOAD_PAGE}?")
    return characters


def write_splits(zips: dict[str, Path], out_dir: Path, skip_bad_images: bool = False,
                 split: str = DEFAULT_SPLIT) -> list[dict[str, str]]:
    """Extract both zips into a temporary folder and write the 28x28 splits (rule `split`) into `out_dir`.

    Returns the files skipped as unreadable images (see preprocess.images.BadImages).
    """
    with tempfile.TemporaryDirectory(prefix="omniglot-extract-") as extract_dir:
        extract_root = Path(extract_dir)
        started = time.perf_counter()
        for name in SOURCE_ZIPS:
            safe_extract(zips[name], extract_root)
        background_root = extract_root / "images_background"
        evaluation_root = extract_root / "images_evaluation"
        background = _list_characters(background_root, BACKGROUND_CHARACTERS, zips[BACKGROUND_ZIP])
        evaluation = _list_characters(evaluation_root, EVALUATION_CHARACTERS, zips[EVALUATION_ZIP])
        print(f"omniglot: extracted {len(background)} + {len(evaluation)} characters "
              f"in {time.perf_counter() - started:.1f}s", flush=True)

        background_set = set(background)
        jobs = []
        for split_name, characters in split_characters(background, evaluation, split).items():
            for character in characters:
                root = background_root if character in background_set else evaluation_root
                jobs.append((root.joinpath(*character), out_dir / split_name / class_folder_name(character)))

        bad_images = BadImages("omniglot", extract_root, [zips[name] for name in SOURCE_ZIPS], skip_bad_images)
        convert_classes(jobs, IMAGE_FORMAT, bad_images)
        return bad_images.skipped
