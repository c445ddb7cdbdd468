"""Tests for preprocess/: dataset builds, manifest bookkeeping, safe extraction and the CLI.

The Omniglot tests use the real zips from the folder in OMNIGLOT_ZIPS (CI sets it to
../shared/data/omniglot); they are skipped when it is unset and fail when it points to a
folder without the zips. Full-size synthetic builds are done twice (fixture + CLI); tests
of the rebuild logic use a shrunken class count to stay fast.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocess import omniglot, synthetic_glyphs
from preprocess.archives import PreprocessError
from preprocess.preprocess import DATASET_RECIPES, prepare_dataset
from utils.dataset_format import FORMAT_VERSION, MANIFEST_NAME, SPLITS, DatasetError, read_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent
SYNTHETIC_CLASSES = {"train": 300, "val": 60, "test": 100}
OMNIGLOT_CLASSES = {"train": 1150, "val": 50, "test": 423}


def _split_classes(dataset_dir: Path, split: str) -> list[Path]:
    return sorted(path for path in (dataset_dir / split).iterdir() if path.is_dir())




def _check_counts_and_images(dataset_dir: Path, classes: dict[str, int], images_per_class: int) -> None:
    for split in SPLITS:
        class_dirs = _split_classes(dataset_dir, split)
        assert len(class_dirs) == classes[split], split
        for class_dir in class_dirs:
            images = sorted(class_dir.iterdir())
            assert len(images) == images_per_class, class_dir
            for image_path in images:
                with Image.open(image_path) as image:
                    assert (image.format, image.mode, image.size) == ("PNG", "L", (28, 28)), image_path


@pytest.fixture(scope="module")
def bulk_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A scratch folder for the full-size builds (tens of thousands of files), deleted afterwards.

    It lives in RAM (/dev/shm) when that has room: on disks mounted with 'discard', like
    the ext4 of the 2-core dev machine, deleting a file that has already been written back
    costs milliseconds, so pytest's later clean-up of 50,000 leftover files took minutes.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > (2 << 30):
        folder = Path(tempfile.mkdtemp(prefix="test_preprocess-", dir=shm))
    else:
        folder = tmp_path_factory.mktemp("bulk")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any download attempt fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("FSL_NO_DOWNLOAD", "1")


# ---------------------------------------------------------------------------------------
# synthetic_glyphs
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_dataset(bulk_dir: Path) -> Path:
    dest = bulk_dir / "synthetic"
    started = time.perf_counter()
    dataset_dir = prepare_dataset("synthetic_glyphs", dest=dest, seed=0)
    print(f"synthetic_glyphs full build: {time.perf_counter() - started:.1f}s")
    return dataset_dir


@pytest.fixture
def tiny_synthetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink synthetic_glyphs so rebuild-logic tests take milliseconds (it also changes its settings)."""
    monkeypatch.setattr(synthetic_glyphs, "CLASSES_PER_SPLIT", {"train": 3, "val": 1, "test": 2})


def test_synthetic_counts_and_image_format(synthetic_dataset: Path) -> None:
    assert synthetic_dataset.name == "synthetic_glyphs"
    _check_counts_and_images(synthetic_dataset, SYNTHETIC_CLASSES, 20)
    all_classes = [path.name for split in SPLITS for path in _split_classes(synthetic_dataset, split)]
    assert all_classes == [f"glyph_{index:05d}" for index in range(460)]


def test_synthetic_manifest(synthetic_dataset: Path) -> None:
    manifest = json.loads((synthetic_dataset / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["dataset"] == "synthetic_glyphs"
    assert manifest["image_size"] == [28, 28, 1]
    assert manifest["splits"] == {split: {"classes": count, "images": 20 * count}
                                  for split, count in SYNTHETIC_CLASSES.items()}
    assert manifest["settings"]["seed"] == 0
    assert manifest["sources"] == {}


def test_synthetic_images_follow_seed_not_global_rng(synthetic_dataset: Path) -> None:
    random.seed(123)
    np.random.seed(123)
    for split, class_index in [("train", 0), ("val", 300), ("test", 459)]:
        class_dir = synthetic_dataset / split / f"glyph_{class_index:05d}"
        stored = [np.asarray(Image.open(class_dir / f"sample_{k:02d}.png")) for k in range(20)]
        regenerated = synthetic_glyphs.render_glyph_class(0, class_index)
        assert all(np.array_equal(a, b) for a, b in zip(stored, regenerated))
        other_seed = synthetic_glyphs.render_glyph_class(1, class_index)
        assert not np.array_equal(stored[0], other_seed[0])
    # Jitter is visible: samples of one class are not copies of each other.
    assert not np.array_equal(stored[0], stored[1])


def test_synthetic_rerun_is_noop(synthetic_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    watched = [synthetic_dataset / MANIFEST_NAME, *sorted((synthetic_dataset / "test" / "glyph_00459").iterdir())]
    mtimes = [path.stat().st_mtime_ns for path in watched]
    started = time.perf_counter()
    assert prepare_dataset("synthetic_glyphs", dest=synthetic_dataset.parent, seed=0) == synthetic_dataset
    assert time.perf_counter() - started < 2.0
    assert "already built" in capsys.readouterr().out
    assert [path.stat().st_mtime_ns for path in watched] == mtimes


def test_leftover_partial_and_folder_without_manifest_are_rebuilt(
        tmp_path: Path, tiny_synthetic: None, capsys: pytest.CaptureFixture[str]) -> None:
    leftover = tmp_path / ".synthetic_glyphs.partial-99999"
    (leftover / "train" / "glyph_00000").mkdir(parents=True)
    (leftover / MANIFEST_NAME).write_text("{}")
    stale = tmp_path / "synthetic_glyphs" / "train" / "stale_class"
    stale.mkdir(parents=True)
    with pytest.raises(DatasetError, match="'synthetic_glyphs' is not built"):
        read_manifest(tmp_path / "synthetic_glyphs")

    dataset_dir = prepare_dataset("synthetic_glyphs", dest=tmp_path)

    out = capsys.readouterr().out
    assert "already built" not in out and "no manifest" in out
    assert not leftover.exists() and not stale.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == [".synthetic_glyphs.lock", "synthetic_glyphs"]
    assert read_manifest(dataset_dir)["splits"]["train"] == {"classes": 3, "images": 60}


def test_force_and_changed_seed_rebuild(tmp_path: Path, tiny_synthetic: None,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    dataset_dir = prepare_dataset("synthetic_glyphs", dest=tmp_path, seed=0)
    first_sample = dataset_dir / "train" / "glyph_00000" / "sample_00.png"
    seed0_bytes = first_sample.read_bytes()
    capsys.readouterr()

    prepare_dataset("synthetic_glyphs", dest=tmp_path, seed=0, force=True)
    assert "rebuild forced" in capsys.readouterr().out
    assert first_sample.read_bytes() == seed0_bytes

    prepare_dataset("synthetic_glyphs", dest=tmp_path, seed=1)
    assert "different format or settings" in capsys.readouterr().out
    assert read_manifest(dataset_dir)["settings"]["seed"] == 1
    assert first_sample.read_bytes() != seed0_bytes


# ---------------------------------------------------------------------------------------
# omniglot on the real zips
# ---------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def omniglot_dataset(omniglot_zips: Path, bulk_dir: Path) -> Path:
    dest = bulk_dir / "omniglot"
    started = time.perf_counter()
    dataset_dir = prepare_dataset("omniglot", source=omniglot_zips, dest=dest, allow_download=False)
    print(f"omniglot build: {time.perf_counter() - started:.1f}s")
    return dataset_dir


def _characters_in_zip(zip_path: Path) -> list[str]:
    """ALPHABET__CHARACTER names listed straight from the zip, sorted by (alphabet, character)."""
    with zipfile.ZipFile(zip_path) as zf:
        pairs = {tuple(name.split("/")[1:3]) for name in zf.namelist() if name.endswith(".png")}
    return [f"{alphabet}__{character}" for alphabet, character in sorted(pairs)]


def test_omniglot_counts_and_image_format(omniglot_dataset: Path) -> None:
    _check_counts_and_images(omniglot_dataset, OMNIGLOT_CLASSES, 20)


def test_omniglot_split_is_maml_plus_plus(omniglot_dataset: Path, omniglot_zips: Path) -> None:
    """The default split is MAML++'s: its sorted 'ALPHABET/characterNN' names, shuffled by its seed."""
    names = sorted(name.replace("__", "/") for name in _characters_in_zip(omniglot_zips / "images_background.zip")
                   + _characters_in_zip(omniglot_zips / "images_evaluation.zip"))
    assert len(names) == 1623
    order = np.arange(1623, dtype=np.int32)
    np.random.RandomState(np.random.RandomState(0).randint(1, 999999)).shuffle(order)
    shuffled = [names[index].replace("/", "__") for index in order]
    expected = {"train": shuffled[:1150], "val": shuffled[1150:1200], "test": shuffled[1200:]}
    for split in SPLITS:
        assert sorted(path.name for path in _split_classes(omniglot_dataset, split)) == sorted(expected[split])
    # Pinned, so that a change of the rule above (or of numpy's generator) cannot go unnoticed.
    assert expected["train"][:3] == ["Ojibwe_(Canadian_Aboriginal_Syllabics)__character09", "Mongolian__character20",
                                     "Gujarati__character10"]
    assert expected["val"][:3] == ["Arcadian__character20", "Ojibwe_(Canadian_Aboriginal_Syllabics)__character07",
                                   "Old_Church_Slavonic_(Cyrillic)__character08"]
    assert expected["test"][:3] == ["Sylheti__character11", "Hebrew__character07", "Aurek-Besh__character18"]
    assert "MAML++" in read_manifest(omniglot_dataset)["settings"]["split_rule"]
    with zipfile.ZipFile(omniglot_zips / "images_background.zip") as zf:
        latin_files = sorted(Path(name).name for name in zf.namelist()
                             if name.startswith("images_background/Latin/character01/"))
    latin = next(omniglot_dataset.glob("*/Latin__character01"))
    assert sorted(path.name for path in latin.iterdir()) == latin_files


def test_omniglot_sorted_split_rule(omniglot_zips: Path) -> None:
    """`--omniglot-split sorted`: background + first 186 evaluation characters train, sorted by alphabet."""
    def characters(zip_name: str) -> list[tuple[str, str]]:
        return [tuple(name.split("__")) for name in _characters_in_zip(omniglot_zips / zip_name)]
    background, evaluation = characters("images_background.zip"), characters("images_evaluation.zip")
    split = omniglot.split_characters(background, evaluation, "sorted")
    assert split == {"train": background + evaluation[:186], "val": evaluation[186:236], "test": evaluation[236:]}
    assert split["val"][0] == ("Glagolitic", "character37") and split["test"][0] == ("Gurmukhi", "character42")
    assert omniglot.settings("sorted") != omniglot.settings("maml++")  # a change of split rebuilds


def test_omniglot_manifest_and_rerun(omniglot_dataset: Path, omniglot_zips: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    manifest = read_manifest(omniglot_dataset)
    assert manifest["dataset"] == "omniglot" and manifest["image_size"] == [28, 28, 1]
    assert manifest["splits"] == {split: {"classes": count, "images": 20 * count}
                                  for split, count in OMNIGLOT_CLASSES.items()}
    for name in omniglot.SOURCE_ZIPS:
        expected = hashlib.sha256((omniglot_zips / name).read_bytes()).hexdigest()
        assert manifest["sources"][name]["sha256"] == expected

    capsys.readouterr()
    started = time.perf_counter()
    prepare_dataset("omniglot", source=omniglot_zips, dest=omniglot_dataset.parent, allow_download=False)
    assert time.perf_counter() - started < 5.0
    assert "already built" in capsys.readouterr().out


def test_omniglot_zips_found_through_env_var(omniglot_zips: Path, tmp_path: Path, no_downloads: None) -> None:
    found = omniglot.locate_zips(None, tmp_path, allow_download=False)
    assert found == {name: omniglot_zips / name for name in omniglot.SOURCE_ZIPS}


# ---------------------------------------------------------------------------------------
# omniglot source lookup errors (no real zips needed)
# ---------------------------------------------------------------------------------------

def test_missing_zip_in_source_folder(tmp_path: Path, no_downloads: None) -> None:
    source = tmp_path / "zips"
    source.mkdir()
    (source / "images_background.zip").write_bytes(b"")
    with pytest.raises(PreprocessError) as excinfo:
        prepare_dataset("omniglot", source=source, dest=tmp_path / "datasets", allow_download=False)
    message = str(excinfo.value)
    assert "images_evaluation.zip" in message and str(source) in message
    assert omniglot.DOWNLOAD_PAGE in message
    assert not (tmp_path / "datasets" / "omniglot").exists()


def test_no_local_zips_and_downloads_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              no_downloads: None) -> None:
    monkeypatch.delenv("OMNIGLOT_ZIPS", raising=False)
    with pytest.raises(PreprocessError) as excinfo:
        prepare_dataset("omniglot", dest=tmp_path)  # allow_download defaults to True; FSL_NO_DOWNLOAD=1 wins
    message = str(excinfo.value)
    assert str(tmp_path / "omniglot_raw") in message
    assert "python preprocess/preprocess.py --datasets omniglot --source DIR" in message
    assert "downloading is disabled" in message


def test_failed_download_explains_manual_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMNIGLOT_ZIPS", raising=False)
    monkeypatch.delenv("FSL_NO_DOWNLOAD", raising=False)
    def offline(url, timeout):
        raise urllib.error.URLError("network is unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(PreprocessError) as excinfo:
        omniglot.locate_zips(None, tmp_path, allow_download=True)
    message = str(excinfo.value)
    assert "download of https://raw.githubusercontent.com/" in message and "--source DIR" in message
    assert list((tmp_path / "omniglot_raw").iterdir()) == []  # no half-written download left behind


def test_download_goes_to_raw_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMNIGLOT_ZIPS", raising=False)
    payload = io.BytesIO()
    with zipfile.ZipFile(payload, "w") as zf:
        zf.writestr("images_background/readme.txt", "stand-in")
    requested = []
    def fake_urlopen(url, timeout):
        requested.append((url, timeout))
        return io.BytesIO(payload.getvalue())
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    found = omniglot.locate_zips(None, tmp_path, allow_download=True)
    raw = tmp_path / "omniglot_raw"
    assert found == {name: raw / name for name in omniglot.SOURCE_ZIPS}
    assert [url for url, _ in requested] == [omniglot.DOWNLOAD_URL.format(file_name=name)
                                             for name in omniglot.SOURCE_ZIPS]
    assert all(timeout == 30 for _, timeout in requested)
    assert sorted(path.name for path in raw.iterdir()) == sorted(omniglot.SOURCE_ZIPS)


# ---------------------------------------------------------------------------------------
# registry and CLI
# ---------------------------------------------------------------------------------------

def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FSL_NO_DOWNLOAD": "1"}
    return subprocess.run([sys.executable, "preprocess/preprocess.py", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_unknown_datasets_and_missing_archives(tmp_path: Path) -> None:
    assert issubclass(PreprocessError, ValueError)
    with pytest.raises(PreprocessError, match="valid names: .*omniglot"):
        prepare_dataset("imagenet_full", dest=tmp_path)
    for name in ("mini_imagenet", "tiered_imagenet", "CIFAR_FS", "CUB"):
        assert name in DATASET_RECIPES
        with pytest.raises(PreprocessError) as excinfo:
            prepare_dataset(name, dest=tmp_path)
        assert f"not found in {tmp_path / (name + '_raw')}" in str(excinfo.value)


def test_cli_build_is_byte_identical_to_library_build(synthetic_dataset: Path, bulk_dir: Path) -> None:
    result = _run_cli("--datasets", "synthetic_glyphs", "--dest", str(bulk_dir / "cli"))
    assert result.returncode == 0, result.stderr
    assert "built in" in result.stdout
    cli_dataset = bulk_dir / "cli" / "synthetic_glyphs"
    cli_images = sorted(path.relative_to(cli_dataset) for path in cli_dataset.rglob("*.png"))
    assert cli_images == sorted(path.relative_to(synthetic_dataset) for path in synthetic_dataset.rglob("*.png"))
    assert all((cli_dataset / rel).read_bytes() == (synthetic_dataset / rel).read_bytes() for rel in cli_images)


def test_cli_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    unknown = _run_cli("--datasets", "synthetic_glyphs", "no_such_set", "--dest", str(tmp_path))
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("error: unknown dataset 'no_such_set'")
    assert all(name in unknown.stderr for name in DATASET_RECIPES)
    assert not (tmp_path / "synthetic_glyphs").exists()  # names are checked before building anything

    missing_archive = _run_cli("--datasets", "CUB", "--dest", str(tmp_path))
    assert missing_archive.returncode == 2
    assert missing_archive.stderr.startswith(f"error: CUB: CUB_200_2011.tgz not found in {tmp_path / 'CUB_raw'}")
    assert "Traceback" not in unknown.stderr + missing_archive.stderr
