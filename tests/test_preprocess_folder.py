"""Importing a folder of images as a dataset (preprocess/folder.py, `--from-folder`), on small generated folders."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_overrides
from experiment_builder import ExperimentBuilder
from preprocess import folder
from preprocess.archives import PreprocessError
from preprocess.preprocess import prepare_dataset
from utils.config import load_config
from utils.dataset_format import MANIFEST_NAME, SPLITS, image_shape_from_manifest, read_manifest

REPO = Path(__file__).resolve().parents[1]


def write_class(class_dir: Path, count: int, seed: int, sizes=((16, 16),), mode: str = "L",
                suffix: str = ".png") -> None:
    """`count` images of one class: a random blob prototype with noise, sizes (width, height) in turn."""
    rng = np.random.default_rng(seed)
    prototype = rng.random((32, 32, 3)) > 0.6
    class_dir.mkdir(parents=True)
    for index in range(count):
        pixels = ((prototype ^ (rng.random(prototype.shape) > 0.92)) * 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        # Greyscale first for 'P': Pillow's palette for a grey image is then all greys.
        image = (image.convert("L") if mode in ("L", "P") else image).convert(mode).resize(sizes[index % len(sizes)])
        image.save(class_dir / f"{index:02d}{suffix}")


def flat_folder(root: Path, classes: int = 10, per_class: int = 4, **image_options) -> Path:
    for index in range(classes):
        write_class(root / f"class_{index:02d}", per_class, seed=index, **image_options)
    return root


def split_folder(root: Path, classes=(6, 5, 5), per_class: int = 5, **image_options) -> Path:
    for split, count in zip(SPLITS, classes):
        for index in range(count):
            write_class(root / split / f"{split}_{index}", per_class, seed=hash((split, index)) % 1000, **image_options)
    return root


def class_names(dataset_dir: Path) -> dict[str, list[str]]:
    return {split: sorted(path.name for path in (dataset_dir / split).iterdir()) for split in SPLITS}


def assert_nothing_built(dest: Path, name: str) -> None:
    """Nothing half-built: no dataset folder and no partial build left behind."""
    assert not (dest / name).exists()
    assert not list(dest.glob(f".{name}.partial-*")) if dest.exists() else True


# ---------------------------------------------------------------------------------------- layouts

def test_flat_folder_is_split_by_fractions_and_seed_and_recorded(tmp_path, capsys, monkeypatch):
    source = flat_folder(tmp_path / "source", classes=10)
    dest = tmp_path / "datasets"
    monkeypatch.chdir(tmp_path)
    dataset = prepare_dataset("mine", source=Path("source"), dest=Path("datasets"), from_folder=True, seed=3)
    assert dataset.resolve() == dest / "mine"
    names = class_names(dataset)
    assert [len(names[split]) for split in SPLITS] == [6, 2, 2]  # 0.64 / 0.16 / 0.20 of 10 classes
    assert sorted(sum(names.values(), [])) == sorted(path.name for path in source.iterdir())
    manifest = read_manifest(dataset)
    assert manifest["settings"]["split_fractions"] == [0.64, 0.16, 0.2] and manifest["settings"]["split_seed"] == 3
    assert manifest["splits"]["train"] == {"classes": 6, "images": 24}
    assert manifest["sources"][str(source.resolve())]["files"] == 40

    # The same folder and options: nothing to do. Another seed: another split, recorded.
    prepare_dataset("mine", source=source, dest=dest, from_folder=True, seed=3)
    assert "already built" in capsys.readouterr().out
    other = prepare_dataset("other", source=source, dest=dest, from_folder=True, seed=4)
    assert class_names(other) != names and read_manifest(other)["settings"]["split_seed"] == 4

    # A replaced image rebuilds.
    write_class(tmp_path / "replacement", 1, seed=99)
    os.replace(tmp_path / "replacement" / "00.png", source / "class_00" / "00.png")
    prepare_dataset("mine", source=source, dest=dest, from_folder=True, seed=3)
    assert "source files differ" in capsys.readouterr().out

    # Another folder under the same name is another dataset: refused unless forced, nothing replaced.
    other_source = flat_folder(tmp_path / "elsewhere", classes=10)
    before = read_manifest(dataset)
    with pytest.raises(PreprocessError, match="was imported from .*source, not from .*elsewhere.*--force"):
        prepare_dataset("mine", source=other_source, dest=dest, from_folder=True, seed=3)
    assert read_manifest(dataset) == before
    prepare_dataset("mine", source=other_source, dest=dest, from_folder=True, seed=3, force=True)
    assert list(read_manifest(dataset)["sources"]) == [str(other_source.resolve())]


def test_pre_split_folder_keeps_its_split_and_converts_any_size_and_mode(tmp_path):
    source = split_folder(tmp_path / "digits", sizes=((16, 16), (20, 18), (14, 15)), mode="L")
    write_class(source / "train" / "palette_grey", 4, seed=7, mode="P")  # a palette of greys is grey
    dataset = prepare_dataset("digits", source=source, dest=tmp_path / "datasets", from_folder=True)
    assert class_names(dataset) == {split: sorted(path.name for path in (source / split).iterdir()) for split in SPLITS}
    manifest = read_manifest(dataset)
    assert image_shape_from_manifest(manifest) == (1, 16, 16)  # median height and width; all grey
    assert manifest["image_size"] == [16, 16, 1] and "split_fractions" not in manifest["settings"]
    assert "BICUBIC" in manifest["settings"]["resize"]
    for path in dataset.glob("*/*/*"):
        with Image.open(path) as image:
            assert (image.size, image.mode) == ((16, 16), "L")
    # A PNG already at the size and mode is copied byte for byte.
    copied = Path("train", "train_0", "00.png")
    assert (dataset / copied).read_bytes() == (source / copied).read_bytes()


def test_colour_anywhere_makes_rgb_and_image_size_sets_size_and_channels(tmp_path):
    source = flat_folder(tmp_path / "source", classes=5, mode="L")
    write_class(source / "colour", 4, seed=50, mode="RGB", suffix=".jpg")
    dataset = prepare_dataset("colour", source=source, dest=tmp_path / "datasets", from_folder=True)
    assert read_manifest(dataset)["image_size"] == [16, 16, 3]

    resized = prepare_dataset("small", source=source, dest=tmp_path / "datasets", from_folder=True,
                              image_size="8x12x1")
    assert read_manifest(resized)["image_size"] == [8, 12, 1]
    for path in resized.glob("*/*/*"):
        with Image.open(path) as image:
            assert (image.size, image.mode) == ((12, 8), "L")  # Pillow's (width, height)


@pytest.mark.parametrize("text", ["28x28", "28x28x2", "0x28x1", "axbxc"])
def test_malformed_image_size_is_refused(tmp_path, text):
    with pytest.raises(PreprocessError, match="--image-size"):
        prepare_dataset("mine", source=flat_folder(tmp_path / "source", classes=3), dest=tmp_path / "datasets",
                        from_folder=True, image_size=text)
    assert_nothing_built(tmp_path / "datasets", "mine")


# ---------------------------------------------------------------------------------------- bad input

def _bad_folder(tmp_path: Path, case: str) -> tuple[Path, dict]:
    """A source folder with one kind of bad input, and the prepare_dataset options that meet it."""
    source = tmp_path / "source"
    if case == "non-image file":
        flat_folder(source, classes=5)
        (source / "class_02" / "notes.txt").write_text("not an image")
    elif case == "unreadable image":
        flat_folder(source, classes=5)
        (source / "class_03" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif case == "truncated image":
        flat_folder(source, classes=5, per_class=2, suffix=".jpg", mode="RGB")
        data = (source / "class_01" / "00.jpg").read_bytes()
        (source / "class_01" / "00.jpg").write_bytes(data[:len(data) // 2])  # the header reads, the pixels do not
    elif case == "class too small":
        flat_folder(source, classes=5)
        write_class(source / "lonely", 1, seed=9)
    elif case == "missing split":
        split_folder(source)
        for path in sorted((source / "val").rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        (source / "val").rmdir()
    elif case == "empty split":
        split_folder(source)
        for path in sorted((source / "test").rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
    elif case == "empty folder":
        source.mkdir()
    elif case == "no class folders":
        source.mkdir()
        Image.new("L", (8, 8)).save(source / "image.png")
    elif case == "mixed layouts":
        split_folder(source)
        write_class(source / "cat", 4, seed=1)
    elif case == "class in two splits":
        split_folder(source)
        write_class(source / "test" / "train_0", 5, seed=2)
    elif case == "fractions leave a split empty":
        flat_folder(source, classes=3)
        return source, {"split_fractions": (0.9, 0.05, 0.05)}
    elif case == "fractions not adding up":
        flat_folder(source, classes=5)
        return source, {"split_fractions": (0.5, 0.2, 0.2)}
    elif case == "fractions on a split folder":
        split_folder(source)
        return source, {"split_fractions": (0.6, 0.2, 0.2)}
    return source, {}


BAD_INPUTS = {
    "non-image file": r"class_02/notes.txt \(in .*source\) is not a readable image .*--skip-bad-images",
    "unreadable image": r"class_03/broken.png \(in .*source\) is not a readable image",
    "truncated image": r"class_01/00.jpg \(in .*source\) is not a readable image",
    "class too small": r"1 class\(es\) hold fewer than --min-images-per-class 2 images: .*lonely \(1\).*allows no task",
    "missing split": r"no val split: .*source/val/ is missing",
    "empty split": r"source/test/ holds no class folders.*--split-fractions 0 0 1",
    "empty folder": r"source is empty; expected .*CLASS/IMAGE",
    "no class folders": r"holds no class folders \(1 file\(s\) directly in it\)",
    "mixed layouts": r"mixes split folders \(test, train, val\) with other folders \(cat\)",
    "class in two splits": r"class\(es\) train_0 are in both .*train and .*test",
    "fractions leave a split empty": r"3 class folder\(s\); --split-fractions 0.9 0.05 0.05 leave\(s\) val and test "
                                     r"without a class",
    "fractions not adding up": r"--split-fractions 0.5 0.2 0.2: expected three fractions .* add up to 1",
    "fractions on a split folder": r"already split into test, train, val.*--split-fractions only applies",
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_named_and_nothing_is_built(tmp_path, case):
    source, options = _bad_folder(tmp_path, case)
    dest = tmp_path / "datasets"
    with pytest.raises(PreprocessError, match=BAD_INPUTS[case]):
        prepare_dataset("mine", source=source, dest=dest, from_folder=True, **options)
    assert_nothing_built(dest, "mine")


def test_hidden_folders_belong_to_no_class_or_split(tmp_path, capsys):
    """Notebook checkpoints, .git and the like are left out with a note, in either layout."""
    flat = flat_folder(tmp_path / "flat", classes=5)
    write_class(flat / ".ipynb_checkpoints", 4, seed=1)
    dataset = prepare_dataset("flat", source=flat, dest=tmp_path / "datasets", from_folder=True,
                              split_fractions=(0.6, 0.2, 0.2))
    assert ".ipynb_checkpoints" not in sum(class_names(dataset).values(), [])
    assert "ignoring" in capsys.readouterr().out
    pre_split = split_folder(tmp_path / "pre_split")
    write_class(pre_split / ".git", 4, seed=1)
    write_class(pre_split / "train" / ".ipynb_checkpoints", 4, seed=2)
    dataset = prepare_dataset("pre_split", source=pre_split, dest=tmp_path / "datasets", from_folder=True)
    assert class_names(dataset) == {split: sorted(path.name for path in (pre_split / split).iterdir()
                                                  if not path.name.startswith(".")) for split in SPLITS}


def test_skip_bad_images_leaves_them_out_and_lists_them(tmp_path):
    source = flat_folder(tmp_path / "source", classes=5)
    (source / "class_02" / "notes.txt").write_text("not an image")
    (source / "class_03" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (source / "class_04" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # OS metadata: ignored, not an error
    dataset = prepare_dataset("mine", source=source, dest=tmp_path / "datasets", from_folder=True,
                              skip_bad_images=True, split_fractions=(0.6, 0.2, 0.2))
    skipped = read_manifest(dataset)["skipped_images"]
    assert [entry["path"] for entry in skipped] == ["class_02/notes.txt", "class_03/broken.png"]
    assert sum(count["images"] for count in read_manifest(dataset)["splits"].values()) == 20


def test_a_skipped_truncated_image_that_leaves_a_class_too_small_builds_nothing(tmp_path):
    source, _ = _bad_folder(tmp_path, "truncated image")
    with pytest.raises(PreprocessError, match=r"train/class_01 \(1\)|val/class_01 \(1\)|test/class_01 \(1\)"):
        prepare_dataset("mine", source=source, dest=tmp_path / "datasets", from_folder=True, skip_bad_images=True)
    assert_nothing_built(tmp_path / "datasets", "mine")


def test_min_images_per_class_error_names_the_settings_the_class_allows(tmp_path):
    source = flat_folder(tmp_path / "source", classes=5, per_class=3)
    with pytest.raises(PreprocessError) as error:
        prepare_dataset("mine", source=source, dest=tmp_path / "datasets", from_folder=True, min_images_per_class=4)
    assert "5 class(es) hold fewer than --min-images-per-class 4" in str(error.value)
    assert "allows only tasks with num_samples_per_class + num_target_samples <= 3" in str(error.value)
    assert "lower --min-images-per-class to 3" in str(error.value)
    assert_nothing_built(tmp_path / "datasets", "mine")


@pytest.mark.parametrize("name, problem", [
    ("../escaped", "holds a path separator"), ("/tmp/absolute", "is an absolute path"), ("a/b", "path separator"),
    (".hidden", "is hidden"), ("..", "names a folder itself or its parent"), ("omniglot", "built-in"),
    ("Omniglot", "built-in"), ("CUB", "built-in"), ("", "is empty"),
])
def test_dataset_names_that_escape_the_destination_or_collide_are_refused(tmp_path, name, problem):
    source = flat_folder(tmp_path / "source", classes=5)
    dest = tmp_path / "datasets" / "inner"
    with pytest.raises(PreprocessError, match=problem):
        prepare_dataset(name, source=source, dest=dest, from_folder=True)
    assert not dest.exists() and sorted(path.name for path in tmp_path.iterdir()) == ["source"]


@pytest.mark.parametrize("name", ["a/b", "..", "/abs", "back\\slash", ".git", "tab\there"])
def test_class_names_that_would_leave_or_hide_in_the_destination_are_refused(name):
    # A folder listing never yields most of these on POSIX; the rule also holds where one could.
    with pytest.raises(PreprocessError, match="would not be one ordinary folder"):
        folder.check_name(name, "class folder")
    folder.check_name("n01532829 (goldfinch)", "class folder")  # an ordinary name passes


def test_source_and_destination_must_not_overlap_and_options_need_from_folder(tmp_path):
    source = flat_folder(tmp_path / "datasets" / "raw_images", classes=5)
    with pytest.raises(PreprocessError, match="overlap"):
        prepare_dataset("raw_images", source=source, dest=tmp_path / "datasets", from_folder=True)
    with pytest.raises(PreprocessError, match="overlap"):
        prepare_dataset("mine", source=tmp_path / "datasets", dest=tmp_path / "datasets", from_folder=True)
    with pytest.raises(PreprocessError, match="needs --source"):
        prepare_dataset("mine", dest=tmp_path / "datasets", from_folder=True)
    with pytest.raises(PreprocessError, match=r"--split-fractions, --image-size only apply to importing a folder"):
        prepare_dataset("omniglot", dest=tmp_path, split_fractions=(0.5, 0.25, 0.25), image_size="28x28x1")
    assert_nothing_built(tmp_path / "datasets", "mine")


def test_command_line_imports_and_names_the_command_that_imports_again(tmp_path):
    source = flat_folder(tmp_path / "source", classes=5)
    dest = tmp_path / "datasets"
    env = {**os.environ, "FSL_NO_DOWNLOAD": "1"}

    def cli(*args):
        return subprocess.run([sys.executable, "preprocess/preprocess.py", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)

    done = cli("--datasets", "mine", "--source", str(source), "--dest", str(dest), "--from-folder",
               "--split-fractions", "0.6", "0.2", "0.2", "--seed", "1", "--image-size", "12x12x1")
    assert done.returncode == 0, done.stderr
    assert "--dataset_name mine --image_height 12 --image_width 12 --image_channels 1" in done.stdout
    assert json.loads((dest / "mine" / MANIFEST_NAME).read_text())["image_size"] == [12, 12, 1]

    # Rebuilding an imported dataset like a built-in one says how to import it again.
    again = cli("--datasets", "mine", "--dest", str(dest), "--force")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert (f"import it again with: python preprocess/preprocess.py --datasets mine --dest {dest} --source "
            f"{source.resolve()} --from-folder --split-fractions 0.6 0.2 0.2 --seed 1 --image-size 12x12x1"
            in again.stderr)


# ---------------------------------------------------------------------------------------- end to end

def test_imported_folders_train_test_and_serve_as_a_cross_domain_test_set(tmp_path):
    """A pre-split folder trains and tests like a built-in dataset; a flat folder imported as test
    classes only (0 0 1), at another size, is the cross-domain test set of the trained model."""
    dest = tmp_path / "datasets"
    prepare_dataset("digits", source=split_folder(tmp_path / "digits", per_class=5, sizes=((16, 16), (18, 17))),
                    dest=dest, from_folder=True)
    prepare_dataset("letters", source=flat_folder(tmp_path / "letters", classes=6, per_class=5, sizes=((20, 20),)),
                    dest=dest, from_folder=True, split_fractions=(0, 0, 1))
    assert [read_manifest(dest / "letters")["splits"][split]["classes"] for split in SPLITS] == [0, 0, 6]

    def config(**extra):
        return load_config(overrides=tiny_overrides(dest, tmp_path / "experiments", dataset_name="digits",
                                                    total_epochs=1, num_evaluation_tasks=4, **extra))

    trained = ExperimentBuilder(config()).run_experiment()
    assert 0.0 <= trained["ensemble_test_accuracy"] <= 1.0
    cross = ExperimentBuilder(config(evaluate_on_test_set_only=True, test_dataset="letters")).run_experiment()
    assert cross["dataset"] == "letters" and cross["trained_on"] == "digits"
