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

Adding a dataset means writing one recipe function and adding it to DATASET_RECIPES; a folder
of images needs no code (--from-folder).

Command line (from the repository root):

    python preprocess/preprocess.py --datasets NAME [NAME ...] [--source DIR] [--dest datasets] [--force] [--seed N]
                                    [--skip-bad-images]
    python preprocess/preprocess.py --datasets NAME --source DIR --from-folder [--split-fractions TRAIN VAL TEST]
                                    [--seed N] [--image-size HxWxC] [--min-images-per-class N] [--skip-bad-images]

The second form imports any folder of images as a new dataset (preprocess/folder.py).
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

from preprocess import folder, imagenet_style, omniglot, synthetic_glyphs  # noqa: E402
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
    `fingerprint_sources(sources)` is what the manifest records under "sources" and a re-run
    compares; by default the sha256 and size of each source file.
    """

    image_shape: tuple[int, int, int]  # (C, H, W)
    settings: dict[str, Any]
    locate_sources: Callable[[], dict[str, Path]]
    write_splits: Callable[[dict[str, Path], Path], list[dict[str, str]]]
    fingerprint_sources: Callable[[dict[str, Path]], dict[str, dict[str, Any]]] | None = None

    def fingerprints(self, sources: dict[str, Path]) -> dict[str, dict[str, Any]]:
        if self.fingerprint_sources is not None:
            return self.fingerprint_sources(sources)
        return {name: {"sha256": sha256_file(path), "size_bytes": path.stat().st_size}
                for name, path in sorted(sources.items())}


@dataclass(frozen=True)
class BuildRequest:
    """What the user asked for; recipes take what they need from it."""

    source: Path | None
    dest: Path
    seed: int
    allow_download: bool
    skip_bad_images: bool
    omniglot_split: str = omniglot.DEFAULT_SPLIT
    # --from-folder only (preprocess/folder.py)
    split_fractions: tuple[float, ...] | None = None
    image_size: str | None = None
    min_images_per_class: int = folder.DEFAULT_MIN_IMAGES_PER_CLASS


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


def _folder_recipe(name: str) -> Callable[[BuildRequest], DatasetRecipe]:
    """Recipe for dataset `name` imported from the folder of images `--source` (--from-folder).

    The folder is read and checked when the recipe is made: its default image size depends on the
    images, and bad input must stop the run before anything is written.
    """
    def recipe(request: BuildRequest) -> DatasetRecipe:
        if request.source is None:
            raise PreprocessError(f"{name}: --from-folder needs --source DIR, the folder of images to import")
        source, dataset_dir = request.source.resolve(), (request.dest / name).resolve()
        if source == dataset_dir or dataset_dir in source.parents or source in dataset_dir.parents:
            raise PreprocessError(f"{name}: --source {request.source} and the destination {request.dest / name} "
                                  f"overlap: importing would read its own output or replace its source. Import "
                                  f"into another --dest or under another name")
        plan = folder.plan_import(name, request.source, request.split_fractions, request.seed, request.image_size,
                                  request.min_images_per_class, request.skip_bad_images)
        return DatasetRecipe(
            image_shape=plan.image_shape,
            settings=plan.settings,
            locate_sources=lambda: {str(plan.source): plan.source},
            write_splits=lambda _sources, out_dir: folder.write_splits(plan, out_dir, request.skip_bad_images),
            fingerprint_sources=lambda _sources: folder.fingerprint(plan),
        )
    return recipe


def check_dataset_names(names: list[str], from_folder: bool = False, dest: Path | None = None) -> None:
    """Raise PreprocessError if a name is unknown, or, importing a folder, is not one new plain name.

    An unknown name that `dest` holds as an imported folder gets the command that imports it again.
    """
    if from_folder:
        if len(names) != 1:
            raise PreprocessError(f"--from-folder imports one folder as one dataset; give one name, not "
                                  f"{len(names)} ({', '.join(names)})")
        folder.check_name(names[0], "dataset name")
        if names[0].lower() in {name.lower() for name in DATASET_RECIPES}:
            raise PreprocessError(f"dataset name {names[0]!r} is a built-in dataset's; import the folder under "
                                  f"another name (built-in: {', '.join(DATASET_RECIPES)})")
        return
    unknown = [name for name in names if name not in DATASET_RECIPES]
    for name in unknown:
        try:
            hint = folder.rebuild_hint(name, dest, read_manifest(dest / name, name)) if dest is not None else None
        except DatasetError:
            hint = None
        if hint:
            raise PreprocessError(hint)
    if unknown:
        raise PreprocessError(f"unknown dataset {', '.join(map(repr, unknown))}; "
                              f"valid names: {', '.join(DATASET_RECIPES)} (or import a folder of images as a new "
                              f"dataset with --source DIR --from-folder)")


def downloads_disabled_by_env() -> bool:
    return os.environ.get(NO_DOWNLOAD_ENV_VAR, "").strip() not in ("", "0")


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
                    omniglot_split: str = omniglot.DEFAULT_SPLIT, from_folder: bool = False,
                    split_fractions: tuple[float, ...] | None = None, image_size: str | None = None,
                    min_images_per_class: int | None = None) -> Path:
    """Build dataset `name` into `dest/name` unless an up-to-date build exists; returns that folder.

    `source` is the folder holding the dataset's archives (ignored for generated data).
    `seed` only matters for generated datasets. Downloads happen only when no local copy
    is found, `allow_download` is true and FSL_NO_DOWNLOAD is unset or 0.
    A file in a class folder that is not a readable image stops the build, or with
    `skip_bad_images` is left out and listed in the manifest under "skipped_images".
    `omniglot_split` picks Omniglot's class split ('maml++' or 'sorted', preprocess/omniglot.py).
    `from_folder` imports the folder of images `source` as the new dataset `name`, split by
    `split_fractions` and `seed` unless already split, at `image_size` ('HxWxC'; default: the
    images' median size), refusing classes with fewer than `min_images_per_class` images
    (default: preprocess/folder.py's DEFAULT_MIN_IMAGES_PER_CLASS, 2).
    Raises PreprocessError with a user-facing message on any problem.
    """
    check_dataset_names([name], from_folder, Path(dest))
    folder_only = {"split_fractions": split_fractions, "image_size": image_size,
                   "min_images_per_class": min_images_per_class}
    given = [key.replace("_", "-") for key, value in folder_only.items() if value is not None]
    if given and not from_folder:
        raise PreprocessError(f"--{', --'.join(given)} only apply to importing a folder (--from-folder)")
    if omniglot_split not in omniglot.SPLIT_RULES:
        raise PreprocessError(f"unknown omniglot split {omniglot_split!r}; choose one of "
                              f"{', '.join(omniglot.SPLIT_RULES)}")
    dest_dir = Path(dest)
    if min_images_per_class is None:
        min_images_per_class = folder.DEFAULT_MIN_IMAGES_PER_CLASS
    request = BuildRequest(source=None if source is None else Path(source), dest=dest_dir, seed=seed,
                           allow_download=allow_download and not downloads_disabled_by_env(),
                           skip_bad_images=skip_bad_images, omniglot_split=omniglot_split,
                           split_fractions=split_fractions, image_size=image_size,
                           min_images_per_class=min_images_per_class)
    recipe = (_folder_recipe(name) if from_folder else DATASET_RECIPES[name])(request)
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
        fingerprints: dict[str, Any] | None = None
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
            fingerprints = recipe.fingerprints(sources)
            if fingerprints == manifest.get("sources"):
                print(f"{name}: already built at {dataset_dir} from the same sources{_skipped_note(manifest)}",
                      flush=True)
                return dataset_dir
            built_from = sorted(manifest.get("sources") or {})
            if from_folder and built_from != sorted(fingerprints):
                # Another folder is another dataset: replacing it would change what its experiments meant.
                raise PreprocessError(
                    f"{name}: {dataset_dir} was imported from {', '.join(built_from) or 'another source'}, not from "
                    f"{', '.join(sorted(fingerprints))}; importing it under the same name would replace that "
                    f"dataset. Choose another --datasets NAME, or add --force to replace it")
            reason = "source files differ from the existing build"

        if sources is None:
            sources = recipe.locate_sources()
        print(f"{name}: building into {dataset_dir} ({reason})", flush=True)
        started = time.perf_counter()
        if fingerprints is None:
            fingerprints = recipe.fingerprints(sources)
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
                        help=f"datasets to build: {', '.join(DATASET_RECIPES)}; with --from-folder, the new "
                             f"dataset's name")
    parser.add_argument("--source", type=Path, metavar="DIR",
                        help="folder holding the dataset's archives; with --from-folder, the folder of images")
    parser.add_argument("--dest", type=Path, default=Path("datasets"), help="output folder (default: datasets)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for generated datasets, and for splitting a flat folder's classes (default: 0)")
    parser.add_argument("--from-folder", action="store_true",
                        help="import --source DIR as the new dataset NAME: DIR/{train,val,test}/CLASS/IMAGE, or "
                             "DIR/CLASS/IMAGE split by --split-fractions and --seed. Images are resized as the "
                             "official CxGrad loader does (Pillow BICUBIC, no cropping, then converted to L or RGB)")
    parser.add_argument("--split-fractions", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                        help="for a flat DIR/CLASS/IMAGE folder: the fractions of its classes in each split "
                             f"(default: {' '.join(map(str, folder.DEFAULT_SPLIT_FRACTIONS))}; 0 0 1 for a "
                             f"test-only, cross-domain set)")
    parser.add_argument("--image-size", metavar="HxWxC",
                        help="size and channels (1 grey, 3 RGB) of the imported images, e.g. 28x28x1 (default: the "
                             "median height and width of the images; 1 channel if all are grey, else 3)")
    parser.add_argument("--min-images-per-class", type=int, metavar="N",
                        help=f"refuse an imported class with fewer images (default: "
                             f"{folder.DEFAULT_MIN_IMAGES_PER_CLASS}, one support + one query image)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help=f"leave out files in class folders that are not readable images (listed in "
                             f"{MANIFEST_NAME}) instead of stopping with an error")
    parser.add_argument("--omniglot-split", choices=tuple(omniglot.SPLIT_RULES), default=omniglot.DEFAULT_SPLIT,
                        help="Omniglot's class split: maml++ (MAML++'s seeded shuffle, the default) or sorted "
                             "(background + first evaluation characters train, sorted by alphabet)")
    args = parser.parse_args(argv)
    try:
        check_dataset_names(args.datasets, args.from_folder, args.dest)
        for name in args.datasets:
            prepare_dataset(name, source=args.source, dest=args.dest, force=args.force, seed=args.seed,
                            skip_bad_images=args.skip_bad_images, omniglot_split=args.omniglot_split,
                            from_folder=args.from_folder,
                            split_fractions=None if args.split_fractions is None else tuple(args.split_fractions),
                            image_size=args.image_size, min_images_per_class=args.min_images_per_class)
    except PreprocessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; partial output was removed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
