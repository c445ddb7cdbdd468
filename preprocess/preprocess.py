"""Build few-shot datasets into the folder layout the training code reads.

Layout and manifest: utils/dataset_format.py, the one definition of the format that the
training code reads as well.

A dataset folder counts as built only if its manifest exists. Builds go into a hidden
sibling `DEST/.NAME.partial-<pid>` that is moved into place with `os.replace` once the
manifest is written, so an interrupted run never leaves a folder that looks complete;
leftover partial folders are deleted on the next run. A file lock (`DEST/.NAME.lock`)
keeps two processes (e.g. several training workers) from building the same dataset at
once: the second one waits and then finds it built.

Re-running is a no-op ("already built") when the manifest matches the current format,
image size and settings, and, if source files were named explicitly, their sha256 too;
`force=True` / `--force` always rebuilds. Without an explicit source folder an existing
build is trusted without locating the archives again, so training code can call
`prepare_dataset("omniglot")` on a machine where only the built folder exists.
`--skip-bad-images` is not a setting: it only decides whether a build meeting unreadable
files fails or leaves them out, so an existing build is kept either way (its manifest
lists what it left out).

Adding a dataset means writing one recipe function and adding it to DATASET_RECIPES.

Command line (from the repository root):

    python preprocess/preprocess.py --datasets NAME [NAME ...] [--source DIR] [--dest datasets] [--force] [--seed N]
                                    [--skip-bad-images]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    # Run as a script, sys.path[0] is preprocess/ itself, where `import preprocess` would
    # find this file instead of the package. Put the repository root first.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from preprocess import imagenet_style, omniglot, synthetic_glyphs  # noqa: E402
from preprocess.archives import PreprocessError, sha256_file  # noqa: E402
from utils.dataset_format import (FORMAT_VERSION, MANIFEST_NAME, DatasetError, manifest_image_size,  # noqa: E402
                                  read_manifest, write_manifest)
from utils.storage import exclusive_lock  # noqa: E402

__all__ = ["DATASET_RECIPES", "PreprocessError", "check_dataset_names", "main", "prepare_dataset"]

NO_DOWNLOAD_ENV_VAR = "FSL_NO_DOWNLOAD"


@dataclass(frozen=True)
class DatasetRecipe:
    """Everything prepare_dataset needs to know to build one dataset.

    `settings` (JSON-serialisable) and the source files together determine the output;
    both are recorded in the manifest and compared on re-runs. `locate_sources` returns
    {file name: path} of the archives to hash and build from (empty for generated data)
    and may download; it is only called when a build or a source check is needed.
    `write_splits(sources, out_dir)` writes the splits and returns the files it left out
    as unreadable images ({"path", "reason"} each; see preprocess/images.py).
    """

    image_shape: tuple[int, int, int]  # (C, H, W)
    settings: dict[str, Any]
    locate_sources: Callable[[], dict[str, Path]]
    write_splits: Callable[[dict[str, Path], Path], list[dict[str, str]]]


@dataclass(frozen=True)
class BuildRequest:
    """What the user asked for; recipes take what they need from it."""

    source: Path | None
    dest: Path
    seed: int
    allow_download: bool
    skip_bad_images: bool
    omniglot_split: str = omniglot.DEFAULT_SPLIT


def _synthetic_glyphs_recipe(request: BuildRequest) -> DatasetRecipe:
    if request.source is not None:
        print("synthetic_glyphs: generated data has no source files; --source is ignored", flush=True)

    def write_splits(_sources: dict[str, Path], out_dir: Path) -> list[dict[str, str]]:
        synthetic_glyphs.write_splits(out_dir, request.seed)
        return []  # generated images are never unreadable

    return DatasetRecipe(
        image_shape=synthetic_glyphs.IMAGE_SHAPE,
        settings=synthetic_glyphs.settings(request.seed),
        locate_sources=dict,
        write_splits=write_splits,
    )


def _omniglot_recipe(request: BuildRequest) -> DatasetRecipe:
    return DatasetRecipe(
        image_shape=omniglot.IMAGE_SHAPE,
        settings=omniglot.settings(request.omniglot_split),
        locate_sources=lambda: omniglot.locate_zips(request.source, request.dest, request.allow_download),
        write_splits=lambda zips, out_dir: omniglot.write_splits(zips, out_dir, request.skip_bad_images,
                                                                 request.omniglot_split),
    )


def _archive_dataset_recipe(dataset: imagenet_style.ArchiveDataset) -> Callable[[BuildRequest], DatasetRecipe]:
    """Recipe for one of the datasets built from a single archive of class folders."""
    def recipe(request: BuildRequest) -> DatasetRecipe:
        return DatasetRecipe(
            image_shape=dataset.image_shape,
            settings=dataset.settings,
            locate_sources=lambda: imagenet_style.locate_archive(dataset, request.source, request.dest),
            write_splits=lambda archives, out_dir: imagenet_style.write_splits(
                dataset, archives, out_dir, request.skip_bad_images),
        )
    return recipe


DATASET_RECIPES: dict[str, Callable[[BuildRequest], DatasetRecipe]] = {
    "synthetic_glyphs": _synthetic_glyphs_recipe,
    "omniglot": _omniglot_recipe,
    **{name: _archive_dataset_recipe(dataset) for name, dataset in imagenet_style.DATASETS.items()},
}


def check_dataset_names(names: list[str]) -> None:
    """Raise PreprocessError listing the valid names if any name is unknown."""
    unknown = [name for name in names if name not in DATASET_RECIPES]
    if unknown:
        raise PreprocessError(f"unknown dataset {', '.join(map(repr, unknown))}; "
                              f"valid names: {', '.join(DATASET_RECIPES)}")


def downloads_disabled_by_env() -> bool:
    return os.environ.get(NO_DOWNLOAD_ENV_VAR, "").strip() not in ("", "0")


def _source_fingerprints(sources: dict[str, Path]) -> dict[str, dict[str, Any]]:
    return {name: {"sha256": sha256_file(path), "size_bytes": path.stat().st_size}
            for name, path in sorted(sources.items())}


def _differences_from_recipe(manifest: dict[str, Any], name: str, recipe: DatasetRecipe) -> list[str]:
    """What an existing build was made with differently from the current code and settings (empty: nothing).

    Settings are compared entry by entry, so that e.g. a build from an older resize recipe says so.
    """
    settings_as_json = json.loads(json.dumps(recipe.settings))  # tuples -> lists, like the stored copy
    stored = manifest.get("settings")
    stored = stored if isinstance(stored, dict) else {}
    expected = {"format_version": FORMAT_VERSION, "dataset": name,
                "image_size": manifest_image_size(recipe.image_shape)}
    return ([key for key, value in expected.items() if manifest.get(key) != value]
            + [key for key in sorted(settings_as_json.keys() | stored.keys())
               if stored.get(key) != settings_as_json.get(key)])


def _skipped_note(manifest: dict[str, Any]) -> str:
    """A reminder that a build left files out, for the messages that report a build."""
    skipped = len(manifest.get("skipped_images", []))
    return f" ({skipped} unreadable file(s) left out, listed in {MANIFEST_NAME})" if skipped else ""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def prepare_dataset(name: str, source: str | os.PathLike[str] | None = None,
                    dest: str | os.PathLike[str] = "datasets", force: bool = False, seed: int = 0,
                    allow_download: bool = True, skip_bad_images: bool = False,
                    omniglot_split: str = omniglot.DEFAULT_SPLIT) -> Path:
    """Build dataset `name` into `dest/name` unless an up-to-date build exists; returns that folder.

    `source` is the folder holding the dataset's archives (ignored for generated data).
    `seed` only matters for generated datasets. Downloads happen only when no local copy
    is found, `allow_download` is true and FSL_NO_DOWNLOAD is unset or 0.
    A file in a class folder that is not a readable image stops the build, or with
    `skip_bad_images` is left out and listed in the manifest under "skipped_images".
    `omniglot_split` picks Omniglot's class split ('maml++' or 'sorted', preprocess/omniglot.py).
    Raises PreprocessError with a user-facing message on any problem.
    """
    check_dataset_names([name])
    if omniglot_split not in omniglot.SPLIT_RULES:
        raise PreprocessError(f"unknown omniglot split {omniglot_split!r}; choose one of "
                              f"{', '.join(omniglot.SPLIT_RULES)}")
    dest_dir = Path(dest)
    request = BuildRequest(source=None if source is None else Path(source), dest=dest_dir, seed=seed,
                           allow_download=allow_download and not downloads_disabled_by_env(),
                           skip_bad_images=skip_bad_images, omniglot_split=omniglot_split)
    recipe = DATASET_RECIPES[name](request)
    dataset_dir = dest_dir / name
    dest_dir.mkdir(parents=True, exist_ok=True)

    with exclusive_lock(dest_dir / f".{name}.lock"):
        # Holding the lock, any partial or old folder belongs to a run that died.
        for leftover in sorted([*dest_dir.glob(f".{name}.partial-*"), *dest_dir.glob(f".{name}.old-*")]):
            print(f"{name}: removing leftover {leftover}", flush=True)
            _remove(leftover)

        try:
            manifest = read_manifest(dataset_dir, name)
        except DatasetError:  # not built, or a damaged manifest: build
            manifest = None
        sources: dict[str, Path] | None = None
        if force:
            reason = "rebuild forced"
        elif manifest is None:
            reason = "no manifest" if dataset_dir.exists() else "not built yet"
        elif differences := _differences_from_recipe(manifest, name, recipe):
            reason = f"existing build has a different format or settings: {', '.join(differences)}"
        elif request.source is None:
            print(f"{name}: already built at {dataset_dir}{_skipped_note(manifest)}", flush=True)
            return dataset_dir
        else:
            sources = recipe.locate_sources()
            if _source_fingerprints(sources) == manifest.get("sources"):
                print(f"{name}: already built at {dataset_dir} from the same sources{_skipped_note(manifest)}",
                      flush=True)
                return dataset_dir
            reason = "source files differ from the existing build"

        if sources is None:
            sources = recipe.locate_sources()
        print(f"{name}: building into {dataset_dir} ({reason})", flush=True)
        started = time.perf_counter()
        fingerprints = _source_fingerprints(sources)
        partial_dir = dest_dir / f".{name}.partial-{os.getpid()}"
        partial_dir.mkdir()
        try:
            skipped_images = recipe.write_splits(sources, partial_dir)
            new_manifest = write_manifest(partial_dir, name, recipe.image_shape, fingerprints, recipe.settings,
                                          skipped_images)
            if dataset_dir.exists() or dataset_dir.is_symlink():
                # Move the old build aside first: os.replace cannot overwrite a non-empty folder.
                old_dir = dest_dir / f".{name}.old-{os.getpid()}"
                os.replace(dataset_dir, old_dir)
                os.replace(partial_dir, dataset_dir)
                _remove(old_dir)
            else:
                os.replace(partial_dir, dataset_dir)
        except BaseException:
            _remove(partial_dir)
            raise

    summary = ", ".join(f"{split} {c['classes']} classes / {c['images']} images"
                        for split, c in new_manifest["splits"].items())
    print(f"{name}: built in {time.perf_counter() - started:.1f}s: {summary}{_skipped_note(new_manifest)}",
          flush=True)
    return dataset_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=f"Build few-shot datasets into DEST/NAME/{{train,val,test}}/CLASS/IMAGE + {MANIFEST_NAME}.",
        epilog=f"Without --source, archives are looked for in DEST/NAME_raw/. "
               f"Environment: {omniglot.ZIPS_ENV_VAR}=DIR is searched for the Omniglot zips; "
               f"{NO_DOWNLOAD_ENV_VAR}=1 disables downloads; archives are extracted under TMPDIR (default /tmp), "
               f"which needs room for the extracted archive.")
    parser.add_argument("--datasets", nargs="+", required=True, metavar="NAME",
                        help=f"datasets to build: {', '.join(DATASET_RECIPES)}")
    parser.add_argument("--source", type=Path, metavar="DIR", help="folder holding the dataset's archives")
    parser.add_argument("--dest", type=Path, default=Path("datasets"), help="output folder (default: datasets)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    parser.add_argument("--seed", type=int, default=0, help="seed for generated datasets (default: 0)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help=f"leave out files in class folders that are not readable images (listed in "
                             f"{MANIFEST_NAME}) instead of stopping with an error")
    parser.add_argument("--omniglot-split", choices=tuple(omniglot.SPLIT_RULES), default=omniglot.DEFAULT_SPLIT,
                        help="Omniglot's class split: maml++ (MAML++'s seeded shuffle, the default) or sorted "
                             "(background + first evaluation characters train, sorted by alphabet)")
    args = parser.parse_args(argv)
    try:
        check_dataset_names(args.datasets)
        for name in args.datasets:
            prepare_dataset(name, source=args.source, dest=args.dest, force=args.force, seed=args.seed,
                            skip_bad_images=args.skip_bad_images, omniglot_split=args.omniglot_split)
    except PreprocessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; partial output was removed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
