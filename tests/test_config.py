"""The typed config: reference key names load, overrides apply, mistakes name the key."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml

from utils.config import ConfigError, ExperimentConfig, load_config, parse_command_line, save_config

REPO = Path(__file__).resolve().parents[1]


def differing_keys(config: ExperimentConfig, other: ExperimentConfig) -> set[str]:
    """The keys whose resolved values differ between two configs (defaults included)."""
    return {key for key, value in config.to_dict().items() if value != getattr(other, key)}

# A config as the CxGrad reference code ships it (misspelt key and ignored keys included).
REFERENCE_CXGRAD_CONFIG = {
    "experiment_name": "CxGrad_5way_1shot", "batch_size": 4, "image_height": 84, "image_width": 84,
    "image_channels": 3, "gpu_to_use": 0, "num_dataprovider_workers": 4, "max_models_to_save": 5,
    "dataset_name": "mini_imagenet", "dataset_path": "mini_imagenet", "reset_stored_paths": False,
    "train_seed": 0, "val_seed": 0, "indexes_of_folders_indicating_class": [-3, -2], "sets_are_pre_split": True,
    "train_val_test_split": [0.64, 0.16, 0.20], "evaluate_on_test_set_only": False, "total_epochs": 100,
    "total_iter_per_epoch": 500, "continue_from_epoch": -2, "num_evaluation_tasks": 600,
    "multi_step_loss_num_epochs": 15, "minimum_per_task_contribution": 0.01,
    "learnable_per_layer_per_step_inner_loop_learning_rate": False, "enable_inner_loop_optimizable_bn_params": False,
    "evalute_on_test_set_only": False, "max_pooling": True, "per_step_bn_statistics": False,
    "learnable_batch_norm_momentum": False, "load_into_memory": True, "init_inner_loop_learning_rate": 0.01,
    "init_inner_loop_weight_decay": 0.0005, "learnable_bn_gamma": True, "learnable_bn_beta": True,
    "dropout_rate_value": 0.0, "min_learning_rate": 0.001, "meta_learning_rate": 0.001,
    "total_epochs_before_pause": 100, "first_order_to_second_order_epoch": -1, "weight_decay": 0.0,
    "norm_layer": "batch_norm", "cnn_num_filters": 48, "num_stages": 4, "use_bias": False, "conv_padding": True,
    "number_of_training_steps_per_iter": 5, "number_of_evaluation_steps_per_iter": 5, "cnn_blocks_per_stage": 1,
    "num_classes_per_set": 5, "num_samples_per_class": 1, "num_target_samples": 15, "second_order": True,
    "use_multi_step_loss_optimization": False, "backbone": "4-CONV", "contextual_grad": True,
    "num_context_params": 100, "context_params_learning_rate": 1,
}


def test_reference_config_loads_with_its_meaning(tmp_path):
    path = tmp_path / "CxGrad_4conv.json"
    path.write_text(json.dumps(REFERENCE_CXGRAD_CONFIG))
    config = load_config(path)
    assert isinstance(config, ExperimentConfig)
    assert config.contextual_grad is True and config.num_context_params == 100
    assert config.context_params_learning_rate == 1.0 and isinstance(config.context_params_learning_rate, float)
    assert config.continue_from_epoch == "from_scratch"  # the reference's -2
    assert config.image_shape == (3, 84, 84)


def test_every_shipped_config_loads():
    paths = sorted((REPO / "experiment_config").glob("*/*.json")) + sorted((REPO / "experiment_config").glob("*/*.yaml"))
    assert len(paths) >= 38
    for path in paths:
        load_config(path)
    for dataset in ("omniglot_5way_1shot", "omniglot_20way_5shot", "mini_imagenet_5way_1shot",
                    "tiered_imagenet_5way_5shot", "CIFAR_FS_5way_1shot", "CUB_5way_5shot"):
        for method in ("CxGrad_4conv", "maml_4conv", "maml++_4conv"):
            # Omniglot's CxGrad config departs from the published settings, so it is YAML with a header.
            suffix = ".yaml" if (dataset.startswith("omniglot"), method) == (True, "CxGrad_4conv") else ".json"
            assert (REPO / "experiment_config" / dataset / f"{method}{suffix}").exists()
            assert not (REPO / "experiment_config" / dataset / f"{method}{'.json' if suffix == '.yaml' else '.yaml'}"
                        ).exists()  # one file per method
    published = load_config(REPO / "experiment_config/mini_imagenet_5way_1shot/CxGrad_4conv.json")
    assert (published.batch_size, published.cnn_num_filters, published.num_target_samples) == (4, 48, 15)
    assert (published.init_inner_loop_learning_rate, published.meta_learning_rate) == (0.01, 0.001)
    assert published.second_order and not published.use_multi_step_loss_optimization
    for dataset in ("mini_imagenet_5way_1shot", "mini_imagenet_5way_5shot", "tiered_imagenet_5way_1shot",
                    "tiered_imagenet_5way_5shot"):
        for method in ("CxGrad", "maml", "maml++"):
            resnet = load_config(REPO / "experiment_config" / dataset / f"{method}_resnet12.yaml")
            four_conv = load_config(REPO / "experiment_config" / dataset / f"{method}_4conv.json")
            assert (resnet.backbone, resnet.resnet_widths, resnet.leaky_relu_slope) == (
                "resnet12", [64, 160, 320, 640], 0.1)
            # The protocol is the 4-CONV one: only the backbone (and its slope) and the name differ.
            assert differing_keys(resnet, four_conv) == {"backbone", "leaky_relu_slope", "experiment_name"}, dataset  # widths: the default


# The input scaling each dataset's shipped configs use: the official CxGrad input (raw [0, 1]) for the
# ImageNet-style datasets; Omniglot and the generated glyphs keep the training split's standardisation.
SHIPPED_INPUT_NORMALISATION = {"mini_imagenet": "none", "tiered_imagenet": "none", "CIFAR_FS": "none", "CUB": "none",
                               "omniglot": "dataset_statistics", "synthetic_glyphs": "dataset_statistics"}


def test_shipped_configs_pin_the_input_scaling_per_dataset():
    paths = [*(REPO / "experiment_config").glob("*/*.json"), *(REPO / "experiment_config").glob("*/*.yaml")]
    scaling = {}
    for path in paths:
        config = load_config(path)
        scaling.setdefault(config.dataset_name, set()).add(config.input_normalisation)
    assert scaling == {name: {method} for name, method in SHIPPED_INPUT_NORMALISATION.items()}
    # A config without the key, such as the reference's own, gets the reference's input.
    assert load_config().input_normalisation == "none"


def test_generated_configs_are_up_to_date():
    """The configs are what generate_configs.py writes, to the byte: python experiment_config/generate_configs.py."""
    generate_configs = importlib.import_module("experiment_config.generate_configs")
    files = dict(generate_configs.shipped_files())
    assert len(files) == 3 * (len(generate_configs.SETTINGS) + len(generate_configs.RESNET12_SETTINGS))
    for path, text in files.items():
        assert path.is_file() and path.read_text() == text, f"{path} is stale: run experiment_config/generate_configs.py"


def test_omniglot_cxgrad_configs_say_why_they_depart():
    """Omniglot's CxGrad configs are MAML++'s Omniglot settings but first order (and at 20 ways, inner lr
    0.05), and their header says so."""
    for setting in ("5way_1shot", "5way_5shot", "20way_1shot", "20way_5shot"):
        folder = REPO / "experiment_config" / f"omniglot_{setting}"
        cxgrad, maml = load_config(folder / "CxGrad_4conv.yaml"), load_config(folder / "maml_4conv.json")
        lower_inner_lr = setting.startswith("20way")
        assert differing_keys(cxgrad, maml) == {"experiment_name", "contextual_grad", "second_order",
                             *(["init_inner_loop_learning_rate"] if lower_inner_lr else [])}, setting
        assert maml.second_order and not cxgrad.second_order
        assert (maml.init_inner_loop_learning_rate, cxgrad.init_inner_loop_learning_rate) == (
            0.1, 0.05 if lower_inner_lr else 0.1)
        header = "\n".join(line for line in (folder / "CxGrad_4conv.yaml").read_text().splitlines()
                           if line.startswith("#"))
        assert "first-order meta-gradients (second_order: false)" in header
        assert header.count("Why:") == (2 if lower_inner_lr else 1), setting
        assert ("--init_inner_loop_learning_rate 0.1 restores" in header) == lower_inner_lr, setting


MAML_PLUS_PLUS_PIECES = {"use_multi_step_loss_optimization", "multi_step_loss_num_epochs",
                         "learnable_per_layer_per_step_inner_loop_learning_rate", "per_step_bn_statistics"}


def test_omniglot_cpu_configs_are_twins():
    """The three CPU-budget configs of a setting differ only by what makes each method: CxGrad's scaling
    network (and at 5-way 1-shot its inner lr), and MAML++'s pieces set as in maml++_4conv.json."""
    for setting, cxgrad_inner_lr in (("5way_1shot", 0.05), ("20way_1shot", 0.1)):
        folder = REPO / "experiment_config" / f"omniglot_{setting}"
        cxgrad, maml = load_config(folder / "CxGrad_4conv_cpu.yaml"), load_config(folder / "maml_4conv_cpu.yaml")
        maml_plus_plus = load_config(folder / "maml++_4conv_cpu.yaml")
        published_maml_plus_plus = load_config(folder / "maml++_4conv.json")
        assert differing_keys(cxgrad, maml) == {"experiment_name", "contextual_grad",
                                           *(["init_inner_loop_learning_rate"] if cxgrad_inner_lr != 0.1 else [])}
        assert cxgrad.init_inner_loop_learning_rate == cxgrad_inner_lr and cxgrad.contextual_grad
        assert differing_keys(maml_plus_plus, maml) == {"experiment_name", *MAML_PLUS_PLUS_PIECES}, setting
        assert all(getattr(maml_plus_plus, key) == getattr(published_maml_plus_plus, key)
                   for key in MAML_PLUS_PLUS_PIECES), setting
        assert not maml_plus_plus.second_order and published_maml_plus_plus.second_order
        assert maml_plus_plus.experiment_name == f"omniglot_{setting}_maml++_4conv_cpu"


def test_omniglot_gpu_configs_are_the_cpu_config_scaled_up():
    """The one-GPU 5-way configs are the CPU-budget ones with 64 filters, 32 tasks per meta-batch and 12
    epochs (CxGrad's inner lr back to 0.1), and the two are twins: only contextual_grad tells them apart."""
    folder = REPO / "experiment_config" / "omniglot_5way_1shot"
    scaled_up = {"cnn_num_filters": 64, "batch_size": 32, "total_epochs": 12, "init_inner_loop_learning_rate": 0.1}
    for method in ("CxGrad", "maml"):
        gpu, cpu = load_config(folder / f"{method}_4conv_gpu.yaml"), load_config(folder / f"{method}_4conv_cpu.yaml")
        assert differing_keys(gpu, cpu) <= {"experiment_name", *scaled_up}, method
        assert {key: getattr(gpu, key) for key in scaled_up} == scaled_up, method
        assert gpu.experiment_name == f"omniglot_5way_1shot_{method}_4conv_gpu"
    cxgrad, maml = load_config(folder / "CxGrad_4conv_gpu.yaml"), load_config(folder / "maml_4conv_gpu.yaml")
    assert differing_keys(cxgrad, maml) == {"experiment_name", "contextual_grad"}
    assert cxgrad.contextual_grad and not maml.contextual_grad


def test_yaml_and_command_line_overrides(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"batch_size": 3, "contextual_grad": True, "dataset_name": "omniglot"}))
    config = parse_command_line(["--name_of_args_json_file", str(path), "--batch_size", "2",
                                 "--second_order=false", "--continue_from_epoch", "7", "--test_dataset", "CUB"])
    assert config.batch_size == 2 and config.second_order is False and config.contextual_grad is True
    assert config.continue_from_epoch == "7" and config.test_dataset == "CUB"
    assert config.rotate_training_classes is True  # omniglot's default augmentation


@pytest.mark.parametrize("overrides, message", [
    ({"batch_sise": 2}, "unknown key 'batch_sise'.*did you mean 'batch_size'"),
    ({"batch_size": "two"}, "key 'batch_size'.*expected an integer, got 'two'"),
    ({"batch_size": 0}, "key 'batch_size'.*must be >= 1"),
    ({"batch_size": 2.5}, "key 'batch_size'.*expected an integer, got 2.5"),
    ({"batch_size": True}, "key 'batch_size'.*expected an integer, got True"),
    ({"second_order": "maybe"}, "key 'second_order'.*expected true or false"),
    ({"meta_learning_rate": "fast"}, "key 'meta_learning_rate'.*expected a number"),
    ({"device": "tpu"}, "key 'device'.*expected one of"),
    ({"continue_from_epoch": "yesterday"}, "key 'continue_from_epoch'.*'latest', 'from_scratch' or an epoch"),
    ({"num_stages": 6}, "halve 28x28 images below one pixel"),
    ({"min_learning_rate": 0.1}, "min_learning_rate .* is above meta_learning_rate"),
    ({"image_channels": 2}, "key 'image_channels'.*expected one of \\[1, 3\\]"),
    ({"backbone": "resnet18"}, "key 'backbone'.*expected one of \\['4-CONV', 'resnet12'\\]"),
    ({"resnet_widths": [64, 160, 320]}, "key 'resnet_widths'.*expected 4 positive integers.*got \\[64, 160, 320\\]"),
    ({"resnet_widths": [64, 0, 320, 640]}, "key 'resnet_widths'.*expected 4 positive integers"),
    ({"resnet_widths": "64,wide,320,640"}, "key 'resnet_widths'.*expected a list of integers"),
    ({"resnet_widths": 64}, "key 'resnet_widths'.*expected a list of integers"),
    ({"backbone": "resnet12", "image_height": 12}, "resnet12's four residual blocks halve 12x28 images"),
    ({"backbone": "resnet12", "max_pooling": False}, "resnet12 always pads .* and max-pools"),
    ({"activation": "relu", "leaky_relu_slope": 0.1}, "leaky_relu_slope is set .* but activation is 'relu'"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "moved.yaml").write_text("batch_size: 2\n")  # a config shipped as YAML, asked for as JSON
    with pytest.raises(ConfigError, match="moved.json does not exist; did you mean .*moved.yaml"):
        load_config(tmp_path / "moved.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json is not valid JSON"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listed)
    typo = tmp_path / "typo.yaml"
    typo.write_text("contextual_gard: true\n")
    with pytest.raises(ConfigError, match=r"unknown key 'contextual_gard' in .*typo.yaml; did you mean 'contextual_grad'"):
        load_config(typo)


def test_resolved_config_round_trips(tmp_path):
    config = load_config(overrides={"batch_size": 3, "contextual_grad": True, "evaluation_batch_size": 5})
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_docs_key_table_is_the_generated_one():
    """docs/CONFIG.md ends with `python -m utils.config`'s table, so a new key cannot go undocumented."""
    from utils.config import markdown_key_table
    page = (Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md").read_text()
    assert page.rstrip("\n").endswith(markdown_key_table()), "regenerate the table: python -m utils.config"


def test_resnet12_keys_from_files_and_the_command_line(tmp_path):
    config = parse_command_line(["--backbone", "resnet12", "--resnet_widths", "8,16,32,64", "--leaky_relu_slope", "0.2"])
    assert (config.backbone, config.resnet_widths, config.leaky_relu_slope) == ("resnet12", [8, 16, 32, 64], 0.2)
    assert parse_command_line(["--resnet_widths", "[8, 16, 32, 64]"]).resnet_widths == [8, 16, 32, 64]
    assert load_config().resnet_widths == [64, 160, 320, 640] and load_config().leaky_relu_slope is None
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    # The 4-CONV stage count does not limit ResNet-12, whose four blocks need 16x16 images.
    assert load_config(overrides={"backbone": "resnet12", "num_stages": 6, "image_height": 16, "image_width": 16}).num_stages == 6
