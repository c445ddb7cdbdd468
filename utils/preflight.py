"""The config checked against the datasets it names, before anything heavy starts.

Every key is validated on its own when the config is loaded (utils/config.py). What only a dataset
on disk can contradict is checked here, from its manifest and its folder listing (no image is
decoded), so a run that could never finish fails in a second rather than after its first epoch or at
its final ensemble test:

- the training dataset's image size and channels (the manifest's "image_size") must be the
  config's: training images are never resized. A cross-domain `test_dataset` may have another size
  (its images are resized to the model's), but not other channels;
- every split read must hold `num_classes_per_set` classes with at least
  `num_samples_per_class + num_target_samples` images each.
"""
from __future__ import annotations

import os
from pathlib import Path

from utils.config import ConfigError, ExperimentConfig
from utils.dataset_format import (MANIFEST_NAME, image_shape_from_manifest, is_readable_image, read_manifest,
                                  split_folder)


def check_datasets(config: ExperimentConfig) -> None:
    """Raise ConfigError for a contradiction with a dataset, DatasetError for a missing or damaged one."""
    train_folder = config.dataset_folder
    if config.test_dataset:
        test_name, test_folder = config.test_dataset, train_folder.parent / config.test_dataset
    else:
        test_name, test_folder = config.dataset_name, train_folder
    reads = [] if config.evaluate_on_test_set_only else [(config.dataset_name, train_folder, ("train", "val"))]
    reads.append((test_name, test_folder, ("test",)))
    for name, folder, splits in reads:
        manifest = read_manifest(folder, name)
        _check_image_size(config, name, folder, manifest, is_training_dataset=(folder == train_folder))
        for split in splits:
            _check_split(config, split_folder(folder, split, name))


def _check_image_size(config: ExperimentConfig, name: str, folder: Path, manifest: dict,
                      is_training_dataset: bool) -> None:
    shape = image_shape_from_manifest(manifest)
    if shape is None:
        return  # a dataset made by hand: nothing recorded to compare with
    channels, height, width = shape
    where = f"dataset '{name}' ({folder / MANIFEST_NAME})"
    if channels != config.image_channels:
        role = "the training dataset" if is_training_dataset else "the test_dataset"
        raise ConfigError(
            f"image_channels is {config.image_channels} but {where}, {role}, holds {channels}-channel images; "
            f"set --image_channels {channels}" + ("" if is_training_dataset else " or test on a dataset with "
                                                   f"{config.image_channels}-channel images"))
    if is_training_dataset and (height, width) != (config.image_height, config.image_width):
        raise ConfigError(
            f"image_height x image_width is {config.image_height}x{config.image_width} but {where} holds "
            f"{height}x{width} images; training images are not resized (only a cross-domain test_dataset is), "
            f"so set --image_height {height} --image_width {width}")


def _check_split(config: ExperimentConfig, folder: Path) -> None:
    counts = [_count_images(entry.path) for entry in os.scandir(folder) if entry.is_dir()]
    ways, needed = config.num_classes_per_set, config.num_samples_per_class + config.num_target_samples
    if not counts:
        raise ConfigError(
            f"{folder} holds no classes (a folder imported with a split fraction of 0, say); train on a "
            f"dataset whose train and val splits have classes, and use this one only as --test_dataset "
            f"(or re-import it with --split-fractions that give this split classes)")
    if len(counts) < ways:
        raise ConfigError(
            f"num_classes_per_set is {ways} but {folder} holds only {len(counts)} classes; "
            f"lower --num_classes_per_set to at most {len(counts)}")
    large_enough = sum(count >= needed for count in counts)
    if large_enough < ways:
        raise ConfigError(
            f"num_samples_per_class + num_target_samples is {config.num_samples_per_class} + "
            f"{config.num_target_samples} = {needed} images per class, but only {large_enough} of the "
            f"{len(counts)} classes in {folder} have that many (the largest has {max(counts)}), "
            f"fewer than the {ways} ways; lower --num_target_samples or --num_samples_per_class")


def _count_images(class_folder: str) -> int:
    return sum(1 for entry in os.scandir(class_folder) if is_readable_image(entry.name))
