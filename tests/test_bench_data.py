"""benchmarks/bench_data.py on a toy dataset and a tiny model: its functions, not its timing thresholds."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks.bench_data import main, make_imagenet_shaped, measure, table, too_slow
from conftest import tiny_overrides
from utils.config import load_config
from utils.dataset_format import MANIFEST_NAME


def test_measures_a_setting_and_reports_it(tmp_path):
    folder = make_imagenet_shaped(tmp_path, images_per_class=4, classes=(6, 5, 5), size=16)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["image_size"] == [16, 16, 3] and manifest["splits"]["train"] == {"classes": 6, "images": 24}
    with Image.open(next((folder / "val").glob("*/*.jpg"))) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (16, 16))

    config = load_config(overrides=tiny_overrides(tmp_path, tmp_path / "experiments", dataset_name=folder.name,
                                                  image_channels=3, num_dataprovider_workers=1))
    record = measure("toy", config, "tiny", workers=[0, 2], iterations=2, warmup=1, min_batches=3, min_seconds=0.01)
    assert (folder / ".cache" / "train_16x16x3.npy").is_file()  # the cold start decoded into the cache
    assert record["dataset_images"] == {"train": 24, "val": 20, "test": 20}
    assert set(record["loader_batches_per_s"]) == {"0", "1", "2"} and min(record["loader_batches_per_s"].values()) > 0
    assert record["cold_start_s"] > 0 and record["warm_start_s"] > 0 and len(record["train_iteration_s"]) == 2
    # The ratio uses the configured worker count (1): batches per second x seconds per training iteration.
    assert record["loader_to_training_ratio"] == pytest.approx(
        record["loader_batches_per_s"]["1"] * record["train_iteration_s_median"], rel=1e-2, abs=0.02)
    assert json.loads(json.dumps(record)) == record

    lines = table([record]).splitlines()
    assert lines[0].split()[:3] == ["setting", "cold", "start"] and lines[2].startswith("toy ")
    assert lines[2].rstrip().endswith(f"{record['loader_to_training_ratio']:.1f}x")
    ratio = record["loader_to_training_ratio"]
    assert too_slow([record], ratio / 2) == []
    assert too_slow([record], ratio * 2) == [f"toy: the loader is only {ratio}x faster than a training iteration, "
                                             f"below {ratio * 2}x"]


def test_missing_omniglot_build_is_an_error_naming_the_fix(tmp_path, capsys):
    assert main(["--settings", "omniglot", "--datasets-dir", str(tmp_path), "--work-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'omniglot' / 'manifest.json'} is missing" in error
    assert f"python preprocess/preprocess.py --datasets omniglot --dest {tmp_path}" in error
    assert [path.name for path in tmp_path.iterdir()] == []  # the temporary work folder is gone
