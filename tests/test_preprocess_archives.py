"""Tests for the archive recipes (mini_imagenet, tiered_imagenet, CIFAR_FS, CUB) and the bad-image rule.

Every test builds a tiny archive with the real internal layout (a few classes of three
10x12 images, so resizing is exercised) instead of using the real multi-GB downloads.
Extraction is pointed at a per-test temporary folder that must be empty afterwards, which
checks that nothing is extracted next to the source and nothing is left behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocess import omniglot
from conftest import write_archive
from preprocess.archives import PreprocessError, safe_extract, sha256_file
from preprocess.preprocess import prepare_dataset
from utils.dataset_format import MANIFEST_NAME, SPLITS, read_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_SIZE = (10, 12)  # (width, height) of the images put into the test archives


def _image_bytes(image_format: str = "JPEG", size: tuple[int, int] = SOURCE_SIZE, mode: str = "RGB",
                 shade: int = 0) -> bytes:
    """A small image with a gradient, so resizing has something to resample."""
    gradient = Image.linear_gradient("L").resize(size).point(lambda value: (value + 40 * shade) % 256)
    buffer = io.BytesIO()
    gradient.convert(mode).save(buffer, format=image_format)
    return buffer.getvalue()



@dataclass(frozen=True)
class ArchiveCase:
    """A test archive for one dataset: its members and which classes must land in which split."""

    dataset: str
    archive: str
    image_size: int
    classes: dict[str, list[str]]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)


def _class_images(prefix: str, class_name: str, suffix: str = ".jpg", image_format: str = "JPEG") -> dict[str, bytes]:
    """Three images of one class, `PREFIX/CLASS/CLASS_{0,1,2}SUFFIX`."""
    return {f"{prefix}/{class_name}/{class_name}_{k}{suffix}": _image_bytes(image_format, shade=k)
            for k in range(3)}


def _split_folder_members(top: str, classes: dict[str, list[str]]) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    for split, names in classes.items():
        for name in names:
            members.update(_class_images(f"{top}/{split}", name))
    return members


FOLDER_SPLIT_CLASSES = {"train": ["n01", "n02", "n03", "n04"], "val": ["n05", "n06"], "test": ["n07", "n08"]}
CIFAR_CLASSES = {"train": ["apple", "bear", "bus", "camel"], "val": ["dolphin", "lamp"], "test": ["tiger", "wolf"]}
CUB_NAMES = ["001.Albatross", "002.Auklet", "003.Blackbird", "004.Bunting",
             "005.Cardinal", "006.Catbird", "007.Cowbird", "008.Crow"]
# The CUB rule on the sorted names: even index -> train, i % 4 == 1 -> val, i % 4 == 3 -> test.
CUB_CLASSES = {"train": ["001.Albatross", "003.Blackbird", "005.Cardinal", "007.Cowbird"],
               "val": ["002.Auklet", "006.Catbird"], "test": ["004.Bunting", "008.Crow"]}

CASES = {
    "mini_imagenet": ArchiveCase("mini_imagenet", "mini_imagenet_full_size.tar.bz2", 84, FOLDER_SPLIT_CLASSES),
    "tiered_imagenet": ArchiveCase("tiered_imagenet", "tiered_imagenet.tar", 84, FOLDER_SPLIT_CLASSES),
    "CIFAR_FS": ArchiveCase("CIFAR_FS", "cifar100.zip", 32, CIFAR_CLASSES),
    "CUB": ArchiveCase("CUB", "CUB_200_2011.tgz", 84, CUB_CLASSES),
}


def _members(case: ArchiveCase) -> dict[str, bytes]:
    """The archive content of `case` in the layout of the real download."""
    if case.dataset in ("mini_imagenet", "tiered_imagenet"):
        return _split_folder_members(case.archive.split(".")[0], case.classes)
    if case.dataset == "CIFAR_FS":
        members: dict[str, bytes] = {}
        for name in [*sorted(n for names in case.classes.values() for n in names), "unused_class"]:
            members.update(_class_images("cifar100/data", name, ".png", "PNG"))
        for split, names in case.classes.items():
            # Unsorted, with a blank line and Windows line ends, as hand-edited files come.
            members[f"cifar100/splits/bertinetto/{split}.txt"] = ("\r\n".join(reversed(names)) + "\r\n\r\n").encode()
        return members
    members = {"attributes.txt": b"not part of the images", "CUB_200_2011/README": b"readme"}
    for name in CUB_NAMES:
        members.update(_class_images("CUB_200_2011/images", name))
    # CUB has a few greyscale JPEGs; they must come out RGB.
    members["CUB_200_2011/images/008.Crow/008.Crow_2.jpg"] = _image_bytes(mode="L")
    return members


@pytest.fixture(autouse=True)
def extraction_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point tempfile at a folder of this test and check that every build cleaned it up."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    assert list(folder.iterdir()) == [], "an extraction folder was left behind"


def _source(tmp_path: Path, case: ArchiveCase, members: dict[str, bytes] | None = None) -> Path:
    """A source folder holding only the archive of `case`."""
    write_archive(tmp_path / "source" / case.archive, _members(case) if members is None else members)
    return tmp_path / "source"


def _classes_on_disk(dataset_dir: Path) -> dict[str, list[str]]:
    return {split: sorted(path.name for path in (dataset_dir / split).iterdir()) for split in SPLITS}


@pytest.mark.parametrize("name", sorted(CASES))
def test_build_layout_images_manifest_and_rerun(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES[name]
    source = _source(tmp_path, case)
    dataset_dir = prepare_dataset(name, source=source, dest=tmp_path / "datasets")

    assert dataset_dir == tmp_path / "datasets" / name
    assert _classes_on_disk(dataset_dir) == case.classes
    for image_path in (path for split in SPLITS for path in (dataset_dir / split).glob("*/*")):
        with Image.open(image_path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", case.shape), image_path
    assert sorted(path.name for path in (dataset_dir / "train" / case.classes["train"][0]).iterdir()) == [
        f"{case.classes['train'][0]}_{k}.png" for k in range(3)]
    assert sorted(path.name for path in source.iterdir()) == [case.archive]  # nothing extracted next to it

    manifest = read_manifest(dataset_dir)
    archive_bytes = (source / case.archive).read_bytes()
    assert manifest["dataset"] == name
    assert manifest["image_size"] == [case.image_size, case.image_size, 3]
    assert manifest["sources"] == {case.archive: {"sha256": hashlib.sha256(archive_bytes).hexdigest(),
                                                  "size_bytes": len(archive_bytes)}}
    assert manifest["splits"] == {split: {"classes": len(names), "images": 3 * len(names)}
                                  for split, names in case.classes.items()}
    assert manifest["skipped_images"] == []
    assert "split_rule" in manifest["settings"]
    out = capsys.readouterr().out
    assert "warning:" in out and "the official archive has" in out  # a tiny archive is not the official one

    watched = [dataset_dir / MANIFEST_NAME, *sorted((dataset_dir / "test").rglob("*.png"))]
    mtimes = [path.stat().st_mtime_ns for path in watched]
    prepare_dataset(name, source=source, dest=tmp_path / "datasets")
    assert "already built" in capsys.readouterr().out
    assert [path.stat().st_mtime_ns for path in watched] == mtimes


def test_cifar_fs_leaves_out_classes_in_no_split_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES["CIFAR_FS"]
    dataset_dir = prepare_dataset("CIFAR_FS", source=_source(tmp_path, case), dest=tmp_path / "datasets")
    assert "unused_class" not in {name for names in _classes_on_disk(dataset_dir).values() for name in names}
    assert "1 class(es) in cifar100/data/ are in no split file and left out: unused_class" in capsys.readouterr().out


def test_images_already_in_target_format_are_copied_unchanged(tmp_path: Path) -> None:
    case = CASES["tiered_imagenet"]
    members = _members(case)
    ready_jpeg = _image_bytes(size=(84, 84))
    members["tiered_imagenet/test/n07/ready.jpg"] = ready_jpeg
    dataset_dir = prepare_dataset("tiered_imagenet", source=_source(tmp_path, case, members), dest=tmp_path / "out")
    assert (dataset_dir / "test" / "n07" / "ready.jpg").read_bytes() == ready_jpeg
    assert read_manifest(dataset_dir)["splits"]["test"] == {"classes": 2, "images": 7}


def _official_loader_pixels(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """What the official CxGrad loader reads, `Image.open(f).resize(size).convert('RGB')`, with Pillow's
    default filter spelled out (BICUBIC) so that the test does not hang on Pillow's default."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.resize(size, Image.Resampling.BICUBIC).convert("RGB"))


def _old_recipe_pixels(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """What this project wrote before following the official loader: convert('RGB'), then LANCZOS."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB").resize(size, Image.Resampling.LANCZOS))


# A training class folder of each archive, where the resize test adds its images.
CLASS_MEMBER_FOLDERS = {"CIFAR_FS": ("cifar100/data/apple", "train/apple"),
                        "CUB": ("CUB_200_2011/images/001.Albatross", "train/001.Albatross")}


@pytest.mark.parametrize("name", sorted(CLASS_MEMBER_FOLDERS))
def test_images_are_resized_as_the_official_loader_does(tmp_path: Path, name: str) -> None:
    """BICUBIC, then convert('RGB'). The filter shows on an RGB JPEG, the order on a palette PNG: Pillow
    resizes 'P' images with NEAREST, so converting first (as before) gives other pixels."""
    case = CASES[name]
    member_folder, output_folder = CLASS_MEMBER_FOLDERS[name]
    sources = {"rgb.jpg": _image_bytes("JPEG", mode="RGB", shade=1), "palette.png": _image_bytes("PNG", mode="P")}
    members = {**_members(case), **{f"{member_folder}/{file}": data for file, data in sources.items()}}
    dataset_dir = prepare_dataset(name, source=_source(tmp_path, case, members), dest=tmp_path / "datasets")
    for file, data in sources.items():
        with Image.open(dataset_dir / output_folder / f"{Path(file).stem}.png") as image:
            built = np.asarray(image)
        np.testing.assert_array_equal(built, _official_loader_pixels(data, case.shape), err_msg=file)
        assert not np.array_equal(built, _old_recipe_pixels(data, case.shape)), file


def test_a_build_from_another_resize_recipe_is_rebuilt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A manifest from before the official resize (another recipe, or none recorded) is not reused."""
    case = CASES["mini_imagenet"]
    source, dest = _source(tmp_path, case), tmp_path / "datasets"
    dataset_dir = prepare_dataset("mini_imagenet", source=source, dest=dest)
    manifest = read_manifest(dataset_dir)
    assert manifest["settings"]["resize"].startswith("Pillow BICUBIC resize to 84x84, then convert('RGB')")
    image = dataset_dir / "test" / "n07" / "n07_0.png"
    official = image.read_bytes()
    old_settings = [{**manifest["settings"], "resize": "convert('RGB'), LANCZOS to 84x84 without cropping; "
                     "JPEG/PNG files already 84x84 RGB are copied unchanged"},
                    {"split_rule": manifest["settings"]["split_rule"]}]
    for settings in old_settings:
        (dataset_dir / MANIFEST_NAME).write_text(json.dumps({**manifest, "settings": settings}))
        Image.new("RGB", case.shape).save(image)  # stands for the pixels of the old build
        capsys.readouterr()
        prepare_dataset("mini_imagenet", source=source, dest=dest)
        assert "existing build has a different format or settings: resize" in capsys.readouterr().out
        assert image.read_bytes() == official
        assert read_manifest(dataset_dir)["settings"] == manifest["settings"]


def test_dest_raw_folder_is_searched_without_source(tmp_path: Path) -> None:
    case = CASES["CUB"]
    dest = tmp_path / "datasets"
    write_archive(dest / "CUB_raw" / case.archive, _members(case))
    assert _classes_on_disk(prepare_dataset("CUB", dest=dest)) == case.classes


@pytest.mark.parametrize("name", sorted(CASES))
def test_missing_archive_says_what_and_where(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    source = tmp_path / "empty"
    source.mkdir()
    with pytest.raises(PreprocessError) as excinfo:
        prepare_dataset(name, source=source, dest=tmp_path / "datasets")
    message = str(excinfo.value)
    assert f"{case.archive} not found in {source}" in message
    assert f"--datasets {name} --source DIR" in message
    assert "https://" in message  # where to get it

    with pytest.raises(PreprocessError) as excinfo:
        prepare_dataset(name, dest=tmp_path / "datasets")
    assert f"{case.archive} not found in {tmp_path / 'datasets' / (name + '_raw')}" in str(excinfo.value)
    assert not (tmp_path / "datasets" / name).exists()


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------

def _assert_nothing_built(dest: Path, name: str) -> None:
    assert not (dest / name).exists()
    assert [path.name for path in dest.iterdir()] == [f".{name}.lock"]  # no partial folder left


@pytest.mark.parametrize("name, bad_member, content", [
    ("mini_imagenet", "mini_imagenet_full_size/train/n01/n01_1.jpg", "truncated"),
    ("CIFAR_FS", "cifar100/data/bus/bus_1.png", "truncated"),
    ("CUB", "CUB_200_2011/images/004.Bunting/notes.txt", "text"),
    ("tiered_imagenet", "tiered_imagenet/val/n05/n05_1.jpg", "text"),  # text under an image name
])
def test_bad_file_stops_build_or_is_skipped_and_listed(tmp_path: Path, name: str, bad_member: str, content: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES[name]
    members = _members(case)
    members[bad_member] = members[bad_member][:len(members[bad_member]) // 2] if content == "truncated" else b"notes"
    source = _source(tmp_path, case, members)
    dest = tmp_path / "datasets"

    with pytest.raises(PreprocessError) as excinfo:
        prepare_dataset(name, source=source, dest=dest)
    message = str(excinfo.value)
    assert f"{bad_member} (in {source / case.archive}) is not a readable image" in message
    assert "--skip-bad-images" in message
    _assert_nothing_built(dest, name)

    capsys.readouterr()
    dataset_dir = prepare_dataset(name, source=source, dest=dest, skip_bad_images=True)
    skipped = read_manifest(dataset_dir)["skipped_images"]
    assert [entry["path"] for entry in skipped] == [bad_member]
    assert skipped[0]["reason"] and str(tmp_path / "tmp") not in skipped[0]["reason"]  # no temporary paths
    out = capsys.readouterr().out
    assert f"skipping {bad_member}" in out and "1 unreadable file(s) left out" in out
    split, class_name = next((split, class_name) for split, names in case.classes.items() for class_name in names
                             if f"/{class_name}/" in bad_member)
    expected_images = 3 if bad_member not in _members(case) else 2  # an added file, or a broken image
    assert len(list((dataset_dir / split / class_name).iterdir())) == expected_images


@pytest.mark.parametrize("name", sorted(CASES))
def test_malicious_member_is_refused(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    members = {**_members(case), "../evil.txt": b"evil"}
    source = _source(tmp_path, case, members)
    dest = tmp_path / "datasets"
    with pytest.raises(PreprocessError, match=r"refusing to extract member '\.\./evil\.txt'"):
        prepare_dataset(name, source=source, dest=dest)
    _assert_nothing_built(dest, name)
    assert not (tmp_path / "tmp" / "evil.txt").exists()  # where '../' from the extraction folder leads


@pytest.mark.parametrize("name, edit, expected", [
    ("mini_imagenet", "drop_val", "does not contain the folder mini_imagenet_full_size/val/"),
    ("tiered_imagenet", "class_in_two_splits", "class(es) n01 in both train and test"),
    ("CIFAR_FS", "split_names_missing_class", "names 1 class(es) without a folder in cifar100/data/: zebra"),
    ("CIFAR_FS", "class_in_two_split_files", "class(es) apple in both train and val"),
    ("CIFAR_FS", "drop_split_file", "does not contain the split file cifar100/splits/bertinetto/test.txt"),
    ("CUB", "wrong_top_folder", "does not contain the folder CUB_200_2011/images/"),
])
def test_wrong_split_structure_is_refused(tmp_path: Path, name: str, edit: str, expected: str) -> None:
    case = CASES[name]
    members = _members(case)
    if edit == "drop_val":
        members = {member: data for member, data in members.items() if "/val/" not in member}
    elif edit == "class_in_two_splits":
        members.update(_class_images("tiered_imagenet/test", "n01"))
    elif edit == "split_names_missing_class":
        members["cifar100/splits/bertinetto/train.txt"] += b"zebra\n"
    elif edit == "class_in_two_split_files":
        members["cifar100/splits/bertinetto/val.txt"] += b"apple\n"
    elif edit == "drop_split_file":
        del members["cifar100/splits/bertinetto/test.txt"]
    elif edit == "wrong_top_folder":
        members = {member.replace("CUB_200_2011/images/", "CUB_200_2011/photos/"): data
                   for member, data in members.items()}
    with pytest.raises(PreprocessError) as excinfo:
        prepare_dataset(name, source=_source(tmp_path, case, members), dest=tmp_path / "datasets")
    assert expected in str(excinfo.value)
    _assert_nothing_built(tmp_path / "datasets", name)


def test_two_files_converted_to_the_same_name_are_refused(tmp_path: Path) -> None:
    case = CASES["CIFAR_FS"]
    members = {**_members(case), "cifar100/data/bus/bus_1.jpg": _image_bytes()}  # next to bus_1.png
    with pytest.raises(PreprocessError, match="two files of cifar100/data/bus would both be written as bus_1.png"):
        prepare_dataset("CIFAR_FS", source=_source(tmp_path, case, members), dest=tmp_path / "datasets")
    _assert_nothing_built(tmp_path / "datasets", "CIFAR_FS")


def test_omniglot_follows_the_bad_file_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny Omniglot zips (2 background + 3 evaluation characters), one with a stray text file."""
    monkeypatch.setattr(omniglot, "BACKGROUND_CHARACTERS", 2)
    monkeypatch.setattr(omniglot, "EVALUATION_CHARACTERS", 3)
    monkeypatch.setattr(omniglot, "TRAIN_EVALUATION_CHARACTERS", 1)
    monkeypatch.setattr(omniglot, "VAL_CHARACTERS", 1)
    glyph = _image_bytes("PNG", size=(105, 105), mode="1")
    source = tmp_path / "zips"
    for zip_name, characters in [("images_background", ["Latin/character01", "Latin/character02"]),
                                 ("images_evaluation", ["Atlantean/character01", "Atlantean/character02",
                                                        "Atlantean/character03"])]:
        members = {f"{zip_name}/{character}/{k}.png": glyph for character in characters for k in range(2)}
        write_archive(source / f"{zip_name}.zip", members)
    with zipfile.ZipFile(source / "images_background.zip", "a") as zf:
        zf.writestr("images_background/Latin/character02/notes.txt", "not an image")

    with pytest.raises(PreprocessError, match="images_background/Latin/character02/notes.txt .*not a readable image"):
        prepare_dataset("omniglot", source=source, dest=tmp_path / "datasets", allow_download=False,
                        omniglot_split="sorted")
    dataset_dir = prepare_dataset("omniglot", source=source, dest=tmp_path / "datasets", allow_download=False,
                                  skip_bad_images=True, omniglot_split="sorted")
    assert [entry["path"] for entry in read_manifest(dataset_dir)["skipped_images"]] == [
        "images_background/Latin/character02/notes.txt"]
    assert sorted(path.name for path in (dataset_dir / "train" / "Latin__character02").iterdir()) == ["0.png", "1.png"]
    with Image.open(dataset_dir / "test" / "Atlantean__character03" / "0.png") as image:
        assert (image.mode, image.size) == ("L", (28, 28))


def test_cli_skip_bad_images_flag(tmp_path: Path) -> None:
    case = CASES["CUB"]
    members = {**_members(case), "CUB_200_2011/images/002.Auklet/.DS_Store": b"\x00\x01"}
    source = _source(tmp_path, case, members)
    command = [sys.executable, "preprocess/preprocess.py", "--datasets", "CUB", "--source", str(source),
               "--dest", str(tmp_path / "datasets")]
    env = {**os.environ, "FSL_NO_DOWNLOAD": "1", "TMPDIR": str(tmp_path / "tmp")}

    failed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 2
    assert failed.stderr.startswith("error: CUB: CUB_200_2011/images/002.Auklet/.DS_Store (in ")
    assert "Traceback" not in failed.stderr

    built = subprocess.run([*command, "--skip-bad-images"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=60)
    assert built.returncode == 0, built.stderr
    manifest = json.loads((tmp_path / "datasets" / "CUB" / MANIFEST_NAME).read_text())
    assert [entry["path"] for entry in manifest["skipped_images"]] == ["CUB_200_2011/images/002.Auklet/.DS_Store"]


# ---------------------------------------------------------------------------------------
# archives
# ---------------------------------------------------------------------------------------

def _all_files(root: Path) -> set[Path]:
    return set(root.rglob("*"))


MALICIOUS_MEMBERS = {
    "dotdot": [("ok.txt", "file", "fine"), ("../evil.txt", "file", "evil")],
    "absolute": [("ABSOLUTE", "file", "evil")],
    "symlink_absolute": [("passwd", "symlink", "/etc/passwd")],
    "symlink_dotdot": [("sub/link", "symlink", "../../x")],
    "link_chain": [("a/up", "symlink", ".."), ("a/up/../escaped.txt", "file", "evil")],
    "chardev": [("null", "chardev", "")],
    "hardlink_absolute": [("hard", "hardlink", "/etc/passwd")],
}


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
@pytest.mark.parametrize("case", sorted(MALICIOUS_MEMBERS))
def test_safe_extract_refuses_malicious_members(tmp_path: Path, suffix: str, case: str) -> None:
    if case == "hardlink_absolute" and suffix == ".zip":
        pytest.skip("zip has no hard links")
    absolute_target = tmp_path / "absolute_evil.txt"
    members = [(str(absolute_target) if name == "ABSOLUTE" else name, kind, payload)
               for name, kind, payload in MALICIOUS_MEMBERS[case]]
    archive = tmp_path / f"evil{suffix}"
    write_archive(archive, members)
    dest = tmp_path / "work" / "dest"  # '../' and '../../' from here still land inside tmp_path
    dest.mkdir(parents=True)
    outside_before = _all_files(tmp_path) - _all_files(dest)

    with pytest.raises(PreprocessError) as excinfo:
        safe_extract(archive, dest)

    offending = members[-1][0]
    assert str(archive) in str(excinfo.value) and repr(offending) in str(excinfo.value)
    assert _all_files(tmp_path) - _all_files(dest) == outside_before
    assert not absolute_target.exists()


@pytest.mark.parametrize("suffix", [".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2"])
def test_safe_extract_unpacks_ordinary_archives(tmp_path: Path, suffix: str) -> None:
    members = [("data/a/one.txt", "file", "1"), ("data/b/two.txt", "file", "2"),
               ("data/link_to_one", "symlink", "a/one.txt")]
    archive = tmp_path / f"ok{suffix}"
    write_archive(archive, members)
    dest = tmp_path / "dest"
    safe_extract(archive, dest)
    assert (dest / "data" / "a" / "one.txt").read_text() == "1"
    assert (dest / "data" / "b" / "two.txt").read_text() == "2"
    assert os.readlink(dest / "data" / "link_to_one") == "a/one.txt"
    assert (dest / "data" / "link_to_one").read_text() == "1"


def test_sha256_file_and_unsupported_archive(tmp_path: Path) -> None:
    path = tmp_path / "blob.rar"
    path.write_bytes(b"x" * 3_000_000)
    assert sha256_file(path, chunk_size=1 << 16) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    with pytest.raises(PreprocessError, match="unsupported archive type"):
        safe_extract(path, tmp_path / "dest")
