"""The task pipeline (data.py): the decode cache, task structure, seeded streams, normalisation, cross-domain."""
from __future__ import annotations

import ast
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import make_toy_dataset
from data import FewShotDataProvider, ImageSplit, InputScaling, TaskSampler, load_split
from utils.dataset_format import MANIFEST_NAME, DatasetError


def batches_equal(first: list[data.TaskBatch], second: list[data.TaskBatch]) -> bool:
    def joined(batches, part):
        return torch.cat([getattr(batch, part) for batch in batches])
    parts = ("support_images", "support_labels", "query_images", "query_labels")
    return all(torch.equal(joined(first, part), joined(second, part)) for part in parts)


def pixels_of(folder: Path, size: int, mode: str) -> np.ndarray:
    """Every image of a class folder read straight with PIL as the official CxGrad loader reads a test
    dataset of another size: resized with BICUBIC, then converted."""
    arrays = []
    for path in sorted(folder.iterdir()):
        with Image.open(path) as image:
            image = image.resize((size, size), Image.Resampling.BICUBIC).convert(mode)
            arrays.append(np.asarray(image).reshape(size, size, -1))
    return np.stack(arrays)


# ------------------------------------------------------------------ the decode cache
def test_split_is_decoded_once_into_a_cache_and_then_reused(tmp_path, monkeypatch):
    folder = make_toy_dataset(tmp_path, classes=(3, 2, 2), per_class=4)
    cache = folder / ".cache"
    cache.mkdir()
    (cache / "train_16x16x1.4242.tmp.npy").write_bytes(b"left by a killed decode")

    split = load_split(folder, "train", (1, 16, 16))
    assert sorted(path.name for path in cache.iterdir()) == ["train_16x16x1.json", "train_16x16x1.lock",
                                                             "train_16x16x1.npy"]
    assert split.images.dtype == np.uint8 and split.class_counts.tolist() == [4, 4, 4]
    for index, name in enumerate(split.class_names):
        np.testing.assert_array_equal(split.class_images(index), pixels_of(folder / "train" / name, 16, "L"))
    raw = split.images / 255.0  # the statistics are computed once with the cache and kept in it
    np.testing.assert_allclose(np.concatenate(split.statistics), [raw.mean(), raw.std()], rtol=1e-6)

    decoded = []
    real_decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda path, shape: decoded.append(path) or real_decode(path, shape))
    mapped = load_split(folder, "train", (1, 16, 16), in_memory=False)
    assert decoded == [] and isinstance(mapped.images, np.memmap)  # load_into_memory false: memory-mapped
    np.testing.assert_array_equal(mapped.images, split.images)

    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    (folder / MANIFEST_NAME).write_text(json.dumps({**manifest, "built_at": "later"}))  # a rebuilt dataset
    with pytest.warns(UserWarning, match=r"split 'train': the dataset was rebuilt \(its manifest.json changed\)"):
        load_split(folder, "train", (1, 16, 16))
    assert len(decoded) == 12
    array = cache / "train_16x16x1.npy"
    array.write_bytes(array.read_bytes()[:200])  # a damaged cache is decoded again, not trusted
    np.testing.assert_array_equal(load_split(folder, "train", (1, 16, 16)).images, split.images)
    assert len(decoded) == 24


def test_cache_is_decoded_again_when_its_images_change_and_only_then(tmp_path, monkeypatch):
    folder = make_toy_dataset(tmp_path, classes=(3, 2, 2), per_class=4)
    load_split(folder, "train", (1, 16, 16))
    array = folder / ".cache" / "train_16x16x1.npy"
    built = array.stat().st_mtime_ns
    decoded = []
    real_decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda path, shape: decoded.append(path) or real_decode(path, shape))
    images = folder / "train"

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing changed: not a word, and the cache is used as it is
        assert isinstance(load_split(folder, "train", (1, 16, 16), in_memory=False).images, np.memmap)
    assert decoded == [] and array.stat().st_mtime_ns == built

    shutil.copy(images / "train_class002" / "00.png", images / "train_class001" / "04.png")
    with pytest.warns(UserWarning, match=r"dataset 'toy', split 'train': images changed since its cache was decoded: "
                                         r"1 added, 0 removed, 0 modified \(e.g. train_class001/04.png\); decoding"):
        split = load_split(folder, "train", (1, 16, 16))
    assert len(decoded) == 13 and split.class_counts.tolist() == [4, 5, 4]
    np.testing.assert_array_equal(split.class_images(1), pixels_of(images / "train_class001", 16, "L"))

    (images / "train_class000" / "03.png").unlink()
    touched = images / "train_class002" / "01.png"  # same bytes, new modification time: replaced, maybe
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 1))
    with pytest.warns(UserWarning, match="0 added, 1 removed, 1 modified"):
        assert load_split(folder, "train", (1, 16, 16)).class_counts.tolist() == [3, 5, 4]
    assert len(decoded) == 25

    touched.write_text("an image overwritten with text")  # stops as it would without a cache
    for _ in range(2):  # and again: the stale cache is never fallen back on
        with pytest.warns(UserWarning, match="1 modified"), pytest.raises(DatasetError, match="cannot read image"):
            load_split(folder, "train", (1, 16, 16))


def test_unreadable_image_is_named_and_leaves_no_cache(tmp_path):
    folder = make_toy_dataset(tmp_path, classes=(3, 2, 2), per_class=4)
    broken = folder / "val" / "val_class001" / "02.png"
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.raises(DatasetError, match="02.png") as error:
        load_split(folder, "val", (1, 16, 16))
    assert str(broken) in str(error.value)
    assert f"preprocess/preprocess.py --datasets toy --dest {tmp_path} --force" in str(error.value)
    assert [path.name for path in (folder / ".cache").iterdir()] == ["val_16x16x1.lock"]


def test_cross_domain_split_is_converted_to_the_model_image_shape(tmp_path):
    """A model trained on 16x16 grey images tests on a 20x20 RGB dataset: converted and resized once."""
    folder = make_toy_dataset(tmp_path, name="other", classes=(2, 2, 3), per_class=3, size=20, channels=3)
    as_trained = load_split(folder, "test", (1, 16, 16))
    assert as_trained.images.shape == (9, 16, 16, 1)
    for index, name in enumerate(as_trained.class_names):
        np.testing.assert_array_equal(as_trained.class_images(index), pixels_of(folder / "test" / name, 16, "L"))
    assert load_split(folder, "test", (3, 20, 20)).images.shape == (9, 20, 20, 3)  # its own size: its own cache
    assert {"test_16x16x1.npy", "test_20x20x3.npy"} <= {path.name for path in (folder / ".cache").iterdir()}


# ------------------------------------------------------------------ tasks
def numbered_split(class_counts: list[int]) -> ImageSplit:
    """A split of 1x1 grey images whose single pixel is the image's own number, so tasks can be traced back."""
    counts = np.array(class_counts)
    images = np.arange(counts.sum(), dtype=np.uint8).reshape(-1, 1, 1, 1)
    return ImageSplit(images, [f"class{i}" for i in range(len(counts))],
                      np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)


def test_tasks_are_n_way_k_shot_with_labels_shuffled_per_task():
    split = numbered_split([6] * 8)
    sampler = TaskSampler(split, ways=5, shots=2, queries=3, scaling=InputScaling())
    batch = sampler.batch([np.random.default_rng(seed) for seed in range(40)])
    assert batch.support_images.shape == (40, 10, 1, 1, 1) and batch.query_images.shape == (40, 15, 1, 1, 1)
    label_orders = set()
    for task in range(40):
        support = np.rint(batch.support_images[task].flatten().numpy() * 255).astype(int)
        query = np.rint(batch.query_images[task].flatten().numpy() * 255).astype(int)
        assert len(set(support) | set(query)) == 25  # no image twice in a task, support and query disjoint
        classes = []
        for label in range(5):
            members = np.concatenate([support[batch.support_labels[task].numpy() == label],
                                      query[batch.query_labels[task].numpy() == label]])
            assert len(members) == 5 and len(set(members // 6)) == 1  # K + Q images of one class per label
            classes.append(members[0] // 6)
        assert len(set(classes)) == 5
        label_orders.add(tuple(np.argsort(classes)))
    assert len(label_orders) > 20  # labels are a fresh permutation of the classes in every task


def test_too_small_classes_are_reported_and_never_sampled_or_refused():
    split = numbered_split([7, 2, 7, 7, 3, 6, 6, 6])
    with pytest.warns(UserWarning, match=r"train: 2 classes have fewer than 4 images .* class1, class4"):
        sampler = TaskSampler(split, ways=5, shots=1, queries=3, scaling=InputScaling(),
                              split_name="train")
    batch = sampler.batch([np.random.default_rng(seed) for seed in range(50)])
    seen = np.rint(torch.cat([batch.support_images, batch.query_images], 1).flatten().numpy() * 255).astype(int)
    assert not set(seen) & {7, 8, 23, 24, 25}  # the images of class1 and class4
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="only 3 classes .* fewer than the 5 ways"):
        TaskSampler(split, ways=5, shots=1, queries=6, scaling=InputScaling(), split_name="train")


# ------------------------------------------------------------------ seeded streams
def test_training_stream_resumes_exactly_whatever_the_workers(tiny_config):
    straight = FewShotDataProvider(tiny_config(num_dataprovider_workers=0), splits=("train",))
    resumed = FewShotDataProvider(tiny_config(num_dataprovider_workers=2, load_into_memory=False),
                                  splits=("train",))
    stream = list(straight.train_batches(0, 6))
    assert batches_equal(list(resumed.train_batches(3, 3)), stream[3:])
    assert batches_equal([resumed.train_batch(5)], [stream[5]])
    assert not batches_equal(stream[:1], stream[1:2])  # every iteration draws new tasks
    other_seed = FewShotDataProvider(tiny_config(train_seed=1), splits=("train",))
    assert not batches_equal(list(other_seed.train_batches(0, 2)), stream[:2])


def test_evaluation_tasks_are_fixed_across_calls_providers_and_batch_sizes(tiny_config):
    provider = FewShotDataProvider(tiny_config(), splits=("val", "test"))
    tasks = list(provider.evaluation_batches("val", 6, 4))
    assert batches_equal(list(provider.evaluation_batches("val", 6, 4)), tasks)  # the next epoch
    another = FewShotDataProvider(tiny_config(num_dataprovider_workers=2, load_into_memory=False))
    list(another.train_batches(0, 3))  # training does not move the evaluation tasks
    for batch_size in (1, 5, 6):
        assert batches_equal(list(another.evaluation_batches("val", 6, batch_size)), tasks)
    assert batches_equal(list(provider.evaluation_batches("val", 4, 3)), [tasks[0]])  # the first 4 of the same
    assert not batches_equal(list(provider.evaluation_batches("test", 6, 4)), tasks)
    other_seed = FewShotDataProvider(tiny_config(val_seed=1), splits=("val",))
    assert not batches_equal(list(other_seed.evaluation_batches("val", 6, 4)), tasks)


def pixel_values(batch: data.TaskBatch, mean=0.0, std=1.0) -> set[float]:
    """The 0..255 values a batch's inputs come from, undoing a standardisation with (mean, std)."""
    images = torch.cat([batch.support_images, batch.query_images], 1).numpy()
    return set(np.unique(np.round((images * std + mean) * 255, 3)))


def test_input_normalisation_none_feeds_raw_pixels_in_zero_one(tiny_config):
    """The official CxGrad input: the toy images are black and white, so the inputs are exactly 0 and 1."""
    provider = FewShotDataProvider(tiny_config(input_normalisation="none"))
    assert provider.scaling.statistics is None
    for batch in (provider.train_batch(0), next(provider.evaluation_batches("val", 4, 4)),
                  next(provider.evaluation_batches("test", 4, 4))):
        assert pixel_values(batch) == {0.0, 255.0}


def test_dataset_statistics_of_the_training_split_are_used_for_training_and_evaluation(tiny_config, toy_datasets):
    """Undoing the standardisation with the right statistics gives the toy images' 0 and 255 again."""
    provider = FewShotDataProvider(tiny_config(input_normalisation="dataset_statistics"))
    train = load_split(toy_datasets / "toy", "train", (1, 16, 16))
    raw = np.asarray(train.images, dtype=np.float64) / 255.0
    mean, std = provider.scaling.statistics
    np.testing.assert_allclose(mean, [raw.mean()], rtol=1e-6)
    np.testing.assert_allclose(std, [raw.std()], rtol=1e-6)
    for batch in (provider.train_batch(0), next(provider.evaluation_batches("val", 4, 4)),
                  next(provider.evaluation_batches("test", 4, 4))):
        assert pixel_values(batch) != {0.0, 255.0}  # standardised, not raw
        assert pixel_values(batch, mean, std) == {0.0, 255.0}
    # The ensemble test passes the statistics the model was trained with, also to another dataset.
    other = FewShotDataProvider(tiny_config(dataset_name="toy_other", input_normalisation="dataset_statistics"),
                                input_statistics=lambda: (mean, std), splits=("test",))
    batch = next(other.evaluation_batches("test", 2, 2))
    assert pixel_values(batch, mean, std) == {0.0, 255.0}
    other_mean, other_std = data.channel_statistics(load_split(toy_datasets / "toy_other", "train", (1, 16, 16)))
    assert pixel_values(batch, other_mean, other_std) != {0.0, 255.0}


def test_loader_and_builder_share_only_the_dataset_format_module():
    """data.py reads what preprocess/ writes through utils/dataset_format.py alone: no import runs from
    data.py into the builder, and utils/ (which data.py and preprocess/ both use) imports no top-level module."""
    root = Path(__file__).resolve().parent.parent
    top_level = {path.stem for path in root.glob("*.py")} | {"preprocess", "benchmarks", "tests"}

    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module)
        return {name.split(".")[0] for name in names}

    assert "preprocess" not in imported(root / "data.py")
    assert "utils" in imported(root / "data.py") and "utils" in imported(root / "preprocess" / "preprocess.py")
    upward = {path.name: imported(path) & top_level for path in sorted((root / "utils").glob("*.py"))}
    assert {name: modules for name, modules in upward.items() if modules} == {}
