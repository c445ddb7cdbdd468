"""The checkpoint store's architecture check: which config keys it compares, and checkpoints from before a key.

The keys are those marked `architecture=True` in utils/config.py. A key that changes the saved tensors
but is left unmarked would let a checkpoint load into a model it does not fit (a shape error deep in
load_state_dict, or a silently different network); the first test finds such a key by building models
that differ in one unmarked key at a time.
"""
from __future__ import annotations

import warnings
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest
import torch

from few_shot_learning_system import MAMLFewShotClassifier
from utils.checkpoints import CheckpointError, CheckpointStore
from utils.config import (ARCHITECTURE_KEYS, FIELDS, ConfigError, ExperimentConfig, apply_overrides, build_config,
                          default_of)
from utils.experiment_paths import ExperimentPaths

# Keys that change what the saved tensors mean without changing their shapes: the shape comparison
# below cannot see them, so they are named here.
MEANING_ONLY_KEYS = ("activation", "leaky_relu_slope", "input_normalisation")
# Configs whose optional parts are on, so that keys that only matter with them (num_context_params with
# CxGrad, the inner steps with per-step BatchNorm or LSLR) change something there.
BASES = {
    "MAML": dict(),
    "MAML++": dict(per_step_bn_statistics=True, learnable_per_layer_per_step_inner_loop_learning_rate=True,
                   use_multi_step_loss_optimization=True),
    "CxGrad": dict(contextual_grad=True, use_bias=True, enable_inner_loop_optimizable_bn_params=True,
                   learnable_per_layer_per_step_inner_loop_learning_rate=True),
    "CxGrad ResNet-12": dict(backbone="resnet12", resnet_widths=[2, 3, 4, 5], image_height=16, image_width=16,
                             contextual_grad=True, per_step_bn_statistics=True),
}
SMALL = dict(cnn_num_filters=4, num_stages=2, image_height=8, image_width=8)


# Keys whose other value is valid only together with another key's.
COMPANION_VALUES = {"cudnn_benchmark": {"deterministic": False}}


def other_values(key: str) -> list[Any]:
    """Valid values of `key` other than its default, to build a second model with."""
    spec = FIELDS[key]
    hint = get_type_hints(ExperimentConfig)[key]
    if get_origin(hint) is Union:
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    meta, default = spec.metadata, default_of(spec)
    if meta["choices"]:
        return [choice for choice in meta["choices"] if choice != default]
    if hint is bool:
        return [not default]
    if get_origin(hint) is list:
        return [[value + 1 for value in default]]
    if key == "continue_from_epoch":
        return ["from_scratch"]
    if hint is str:
        return ["other"]
    if meta["minimum"] is not None and meta["minimum"] == meta["maximum"]:
        return []  # one value only
    if hint is int:
        return [(default or meta["minimum"] or 1) + 1]
    if hint is float:
        return [default / 2 if default else 0.5]
    raise AssertionError(f"no other value of {key} ({hint}) to try: add a case to other_values")


def shapes(config: ExperimentConfig) -> tuple[dict[str, tuple], list[int]]:
    """The state dict's tensor shapes, and the number of tensors in each of the optimizer's groups (a
    resume loads the optimizer's state too)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mixed_precision on a CPU without bf16 warns
        model = MAMLFewShotClassifier(config, torch.device("cpu"))
    return ({name: tuple(tensor.shape) for name, tensor in model.state_dict().items()},
            [len(group["params"]) for group in model.optimizer.param_groups])


@pytest.mark.parametrize("base", BASES)
def test_every_key_that_changes_the_saved_tensors_is_an_architecture_key(base):
    reference_values = {**SMALL, **BASES[base], "device": "cpu"}
    reference = shapes(build_config(reference_values))
    unmarked = [key for key in FIELDS if key not in ARCHITECTURE_KEYS]
    for key in unmarked:
        for value in other_values(key):
            try:
                config = build_config({**reference_values, key: value, **COMPANION_VALUES.get(key, {})})
            except ConfigError as error:
                raise AssertionError(f"other_values({key!r}) gave {value!r}, which the config refuses: {error}")
            assert shapes(config) == reference, (
                f"{key}={value!r} changes the saved tensors of a {base} model: mark it architecture=True in "
                f"utils/config.py")
    for key in MEANING_ONLY_KEYS:
        assert key in ARCHITECTURE_KEYS


def checkpoint_with(**saved: Any) -> dict[str, Any]:
    return {"config": {**ExperimentConfig().to_dict(), **saved}}


def test_the_architecture_check_names_every_differing_key(tmp_path):
    store = CheckpointStore(ExperimentPaths(tmp_path), build_config({"cnn_num_filters": 8}))
    store.check_architecture(checkpoint_with(cnn_num_filters=8), tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"differing keys: cnn_num_filters \(checkpoint: 48, now: 8\); "
                                              r"contextual_grad \(checkpoint: True, now: False\)\. Use the config "
                                              rf"it was trained with \(saved in {tmp_path / 'config.yaml'}; these "
                                              r"options restore it: --cnn_num_filters 48 --contextual_grad true\)"):
        store.check_architecture(checkpoint_with(contextual_grad=True), tmp_path / "a")
    # Other keys (the schedule, the inner learning rate, ...) may change on a resume.
    store.check_architecture(checkpoint_with(cnn_num_filters=8, total_epochs=7, meta_learning_rate=0.1),
                             tmp_path / "a")


def test_the_options_the_architecture_check_prints_restore_the_saved_architecture(tmp_path):
    saved = dict(resnet_widths=[32, 64, 128, 256], contextual_grad=True, leaky_relu_slope=0.1, cnn_num_filters=16)
    now = build_config({"leaky_relu_slope": None})
    with pytest.raises(CheckpointError) as refusal:
        CheckpointStore(ExperimentPaths(tmp_path), now).check_architecture(checkpoint_with(**saved), tmp_path / "a")
    options = str(refusal.value).split("these options restore it: ")[1].split(")")[0].split()
    assert "--resnet_widths" in options and "32,64,128,256" in options  # as the command line spells a list
    overrides = dict(zip(options[0::2], options[1::2]))
    restored = build_config(apply_overrides(now.to_dict(), {key[2:]: value for key, value in overrides.items()},
                                            "the command line"))
    CheckpointStore(ExperimentPaths(tmp_path), restored).check_architecture(checkpoint_with(**saved), tmp_path / "a")


def test_a_checkpoint_from_before_a_key_counts_as_trained_with_its_value_then(tmp_path):
    old = checkpoint_with()
    del old["config"]["activation"], old["config"]["input_normalisation"], old["config"]["backbone"]
    # ReLU and standardised pixels before the keys existed; the backbone key came with its default.
    then = CheckpointStore(ExperimentPaths(tmp_path), build_config({"activation": "relu",
                                                                    "input_normalisation": "dataset_statistics"}))
    then.check_architecture(old, tmp_path / "old")
    now = CheckpointStore(ExperimentPaths(tmp_path), build_config({}))
    with pytest.raises(CheckpointError, match=r"input_normalisation \(checkpoint: 'dataset_statistics', now: 'none'\); "
                                              r"activation \(checkpoint: 'relu', now: 'leaky_relu'\)"):
        now.check_architecture(old, tmp_path / "old")
