"""The experiment configuration: one typed, validated object instead of a bag of strings.

Configs use the key names of the MAML++ and CxGrad reference code, so their JSON files load unchanged.
Precedence: the defaults below < the JSON/YAML file < ``--key value`` options on the command line.
Every key is checked for its type and range before anything heavy starts; an unknown key is an error
that names the closest valid key.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from utils.storage import atomic_write_text


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or value, or contradicts another key."""


_UNSET = object()


def _key(help_text: str, *, choices: tuple = (), minimum: float | None = None, maximum: float | None = None,
         architecture: bool = False, before_key_existed: Any = _UNSET):
    return {"help": help_text, "choices": choices, "minimum": minimum, "maximum": maximum,
            "architecture": architecture, "before_key_existed": before_key_existed}


def _field(default, help_text: str, **limits):
    """A config key. `architecture=True` marks a key that decides the shape or the meaning of the saved
    parameters (or of the optimizer's state): a checkpoint trained with another value cannot be loaded
    (utils/checkpoints.py checks it; tests/test_checkpoints.py checks that no such key is left unmarked).
    Checkpoints written before an architecture key existed count as trained with its default, unless
    `before_key_existed` says what they were trained with (a default that changed the network later)."""
    if isinstance(default, list):  # a mutable default: each config gets its own copy
        return field(default_factory=lambda: list(default), metadata=_key(help_text, **limits))
    return field(default=default, metadata=_key(help_text, **limits))


def default_of(spec: dataclasses.Field) -> Any:
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


@dataclass
class ExperimentConfig:
    # --- experiment and bookkeeping -------------------------------------------------------
    experiment_name: str = _field("experiment", "folder name of this experiment under experiments_dir")
    experiments_dir: str = _field("experiments", "where experiment folders are created")
    seed: int = _field(0, "seed of the model initialisation", minimum=0)
    train_seed: int = _field(0, "seed of the training task stream", minimum=0)
    val_seed: int = _field(0, "seed of the fixed validation and test tasks", minimum=0)
    device: str = _field("auto", "auto picks CUDA when available, else the CPU", choices=("auto", "cpu", "cuda"))
    show_progress: bool = _field(True, "show a tqdm progress bar during training")
    progress_interval_s: float = _field(
        600.0, "without the progress bar (show_progress false: a log file, a batch job), print the epoch's "
        "progress, seconds per meta-iteration, and train loss and accuracy so far and since the last such line, "
        "every this many seconds; 0 prints none", minimum=0.0)

    # --- distributed ----------------------------------------------------------------------
    distributed_timeout_s: int = _field(
        1800, "under torchrun: seconds a rank waits for the others in a collective before the run ends "
        "with an error (a rank died or hangs)", minimum=1)

    # --- data -----------------------------------------------------------------------------
    dataset_name: str = _field("synthetic_glyphs", "dataset to train on (a folder under datasets_dir)")
    dataset_path: Optional[str] = _field(None, "dataset folder relative to datasets_dir (default: dataset_name)")
    datasets_dir: str = _field("datasets", "root of the preprocessed datasets (env DATASET_DIR overrides)")
    image_height: int = _field(28, "image height fed to the network", minimum=4, architecture=True)
    image_width: int = _field(28, "image width fed to the network", minimum=4, architecture=True)
    image_channels: int = _field(1, "1 (grey) or 3 (RGB)", choices=(1, 3), architecture=True)
    num_classes_per_set: int = _field(5, "N: ways per task", minimum=2, architecture=True)
    num_samples_per_class: int = _field(1, "K: support images per class (shots)", minimum=1)
    num_target_samples: int = _field(15, "query images per class", minimum=1)
    batch_size: int = _field(4, "tasks per meta-batch (per rank under torchrun)", minimum=1)
    evaluation_batch_size: Optional[int] = _field(None, "tasks per batch at evaluation (default: batch_size)", minimum=1)
    augment_images: Optional[bool] = _field(
        None, "rotate training classes by multiples of 90 degrees (default: on for omniglot only)")
    input_normalisation: str = _field(
        "none", "input pixel scaling: none feeds raw [0, 1] values (the official CxGrad input); "
        "dataset_statistics standardises each channel with the training split's mean and std, which the "
        "checkpoint keeps for the test", choices=("none", "dataset_statistics"), architecture=True,
        # weights trained on raw [0, 1] pixels mean something else on standardised ones; checkpoints written
        # before the key existed were trained on standardised pixels
        before_key_existed="dataset_statistics")
    load_into_memory: bool = _field(True, "keep decoded images in memory (off: memory-mapped cache)")
    num_dataprovider_workers: int = _field(0, "background threads preparing task batches", minimum=0)
    test_dataset: Optional[str] = _field(None, "dataset whose test split the ensemble test uses (cross-domain)")

    # --- schedule -------------------------------------------------------------------------
    total_epochs: int = _field(100, "epochs of training", minimum=1)
    total_iter_per_epoch: int = _field(500, "meta-iterations per epoch", minimum=1)
    total_epochs_before_pause: int = _field(10**6, "stop this invocation after this many epochs (resume later)", minimum=1)
    continue_from_epoch: str = _field("latest", "'latest', 'from_scratch' or an epoch number")
    num_evaluation_tasks: int = _field(600, "fixed validation / test tasks", minimum=1)
    max_models_to_save: int = _field(5, "best epochs kept on disk and ensembled at test time", minimum=1)
    evaluate_on_test_set_only: bool = _field(False, "only run the ensemble test from saved checkpoints")

    # --- robustness -----------------------------------------------------------------------
    max_consecutive_nonfinite_iterations: int = _field(
        10, "skipped meta-iterations (non-finite loss or gradient) in a row before training stops", minimum=1)

    # --- backbone -------------------------------------------------------------------------
    backbone: str = _field(
        "4-CONV", "the backbone architecture: 4-CONV, or resnet12 (four residual blocks of three conv3x3 -> BN, "
        "a conv1x1 -> BN shortcut, 2x2 max-pool; global average pooling)", choices=("4-CONV", "resnet12"),
        architecture=True)
    cnn_num_filters: int = _field(48, "filters of every conv layer (4-CONV)", minimum=1, architecture=True)
    num_stages: int = _field(4, "conv blocks (conv3x3 -> BN -> activation -> max-pool) (4-CONV)", minimum=1,
                             architecture=True)
    resnet_widths: list[int] = _field(
        [64, 160, 320, 640], "filters of the four residual blocks (resnet12); on the command line 64,160,320,640",
        architecture=True)
    activation: str = _field(
        "leaky_relu", "activation after each BatchNorm: leaky_relu (see leaky_relu_slope) or relu",
        choices=("leaky_relu", "relu"), architecture=True,
        before_key_existed="relu")  # checkpoints written before `activation` existed were trained with ReLU
    leaky_relu_slope: Optional[float] = _field(
        None, "negative slope of leaky_relu (default: the backbone's published one: 4-CONV 0.01 as in the "
        "official CxGrad/MAML++ forward pass, resnet12 0.1 as in MetaOptNet and ALFA)", minimum=0.0,
        architecture=True)
    cnn_blocks_per_stage: int = _field(1, "conv layers per stage (only 1 is supported)", choices=(1,),
                                       architecture=True)
    conv_padding: bool = _field(True, "pad 3x3 convolutions by 1 (resnet12 always pads)", architecture=True)
    max_pooling: bool = _field(
        True, "2x2 max-pool after every block (off: stride-2 convolutions; resnet12 always pools)",
        architecture=True)
    use_bias: bool = _field(False, "bias on conv layers (BatchNorm makes it redundant)", architecture=True)
    norm_layer: str = _field("batch_norm", "normalisation after each conv", choices=("batch_norm",),
                             architecture=True)
    per_step_bn_statistics: bool = _field(False, "separate BatchNorm scale/shift per inner step (MAML++ BNWB)",
                                          architecture=True)
    learnable_bn_gamma: bool = _field(True, "meta-learn the BatchNorm scale", architecture=True)
    learnable_bn_beta: bool = _field(True, "meta-learn the BatchNorm shift", architecture=True)
    enable_inner_loop_optimizable_bn_params: bool = _field(False, "adapt BatchNorm scale/shift in the inner loop",
                                                           architecture=True)
    dropout_rate_value: float = _field(0.0, "dropout is not used by these methods; must be 0", minimum=0.0, maximum=0.0)

    # --- inner loop -----------------------------------------------------------------------
    number_of_training_steps_per_iter: int = _field(5, "inner steps during training", minimum=1,
                                                    architecture=True)
    number_of_evaluation_steps_per_iter: int = _field(5, "inner steps at validation and test", minimum=1)
    init_inner_loop_learning_rate: float = _field(0.01, "alpha: the inner-loop learning rate", minimum=0.0)
    learnable_per_layer_per_step_inner_loop_learning_rate: bool = _field(
        False, "MAML++ LSLR: meta-learn one inner rate per layer and step", architecture=True)

    # --- outer loop -----------------------------------------------------------------------
    meta_learning_rate: float = _field(0.001, "Adam learning rate of the outer loop", minimum=0.0)
    min_learning_rate: float = _field(0.00001, "end of the cosine annealing of the meta learning rate", minimum=0.0)
    weight_decay: float = _field(0.0, "Adam weight decay of the outer loop", minimum=0.0)
    second_order: bool = _field(True, "differentiate through the inner-loop gradients")
    first_order_to_second_order_epoch: int = _field(-1, "first order up to and including this epoch (DA)")
    use_multi_step_loss_optimization: bool = _field(False, "MAML++ multi-step loss (MSL)")
    multi_step_loss_num_epochs: int = _field(15, "epochs over which MSL anneals to the last step", minimum=1)

    # --- CxGrad ---------------------------------------------------------------------------
    contextual_grad: bool = _field(False, "CxGrad: contextual gradient scaling of the backbone",
                                   architecture=True)
    num_context_params: int = _field(100, "P: size of the per-task context vector", minimum=1,
                                     architecture=True)
    context_params_learning_rate: float = _field(1.0, "beta: inner learning rate of the context", minimum=0.0)

    # --- analysis -------------------------------------------------------------------------
    log_inner_loop_statistics: bool = _field(
        False, "log each inner-loop parameter's gradient norm per step (and CxGrad's gamma) per epoch "
               "to logs/inner_loop_statistics.csv")
    use_tensorboard: bool = _field(False, "also write the epoch statistics to logs/tensorboard (needs tensorboard)")

    # --- speed ----------------------------------------------------------------------------
    task_batching: str = _field(
        "auto", "compute all tasks of a meta-batch at once (batched), or one after another (loop, the least "
        "memory); auto: batched on CUDA and for images up to 32x32 on the CPU, else loop",
        choices=("auto", "batched", "loop"))
    mixed_precision: bool = _field(False, "bf16 autocast of the network's forward passes (CUDA, or a CPU with AVX512-BF16/AMX)")
    channels_last: Optional[bool] = _field(
        None, "channels_last memory format for the activations; default: on the CPU's batched path (images "
              "up to 32x32, e.g. Omniglot) for every pass no double backward runs through (faster there on an "
              "AVX2 CPU), off elsewhere (slower on the CPU at 84x84 and in second-order support passes, no "
              "faster on CUDA)")
    cudnn_benchmark: bool = _field(
        False, "let cuDNN autotune its convolution algorithms (CUDA; runs then differ; needs deterministic false)")
    deterministic: bool = _field(
        True, "CUDA: deterministic algorithms where PyTorch has them and no autotuning, so identical runs give "
              "identical results (the CPU always is)")
    cuda_graphs: bool = _field(
        False, "CUDA: capture each training iteration's inner loops and meta-backward in a CUDA graph and "
               "replay it (Adam and the non-finite check stay eager); ignored with a warning on the CPU, "
               "under torchrun and with compile_backbone")
    cpu_memory_caching: bool = _field(
        True, "CPU: keep freed memory in the process instead of returning it to the OS after every "
              "operation, so large tensors are not page-faulted in again (glibc; faster at 84x84, a higher "
              "peak RSS)")
    compile_backbone: bool = _field(
        False, "torch.compile the backbone where no double backward runs through it (first order, evaluation)")

    @property
    def dataset_folder(self) -> Path:
        root = Path(os.environ.get("DATASET_DIR", self.datasets_dir))
        return root / (self.dataset_path or self.dataset_name)

    @property
    def experiment_folder(self) -> Path:
        return Path(self.experiments_dir) / self.experiment_name

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_channels, self.image_height, self.image_width)

    @property
    def rotate_training_classes(self) -> bool:
        if self.augment_images is None:
            return "omniglot" in self.dataset_name.lower()
        return self.augment_images

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys of the reference configs that carry no meaning here (GPU selection is done by `device`,
# dataset splitting by preprocess.py, ...). They are accepted so that existing configs load, and
# dropped from the resolved config.
IGNORED_REFERENCE_KEYS = frozenset({
    "gpu_to_use", "use_cuda", "reset_stored_paths", "indexes_of_folders_indicating_class",
    "sets_are_pre_split", "train_val_test_split", "minimum_per_task_contribution",
    "learnable_batch_norm_momentum", "init_inner_loop_weight_decay", "labels_as_int",
    "samples_per_iter", "architecture_name", "num_of_gpus", "load_from_npz_files", "train_in_stages",
})
# Misspellings that the reference configs really contain.
KEY_ALIASES = {"evalute_on_test_set_only": "evaluate_on_test_set_only"}

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}
_HINTS = get_type_hints(ExperimentConfig)
FIELDS = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
# The keys marked `architecture=True` above, in the order of the config.
ARCHITECTURE_KEYS = tuple(name for name, spec in FIELDS.items() if spec.metadata["architecture"])


def value_before_key_existed(key: str) -> Any:
    """What a run whose saved config lacks `key` (written before the key existed) was trained with: the
    value recorded as `before_key_existed` (e.g. activation: relu), else the key's default."""
    spec = FIELDS[key]
    before = spec.metadata["before_key_existed"]
    return default_of(spec) if before is _UNSET else before


def _coerce(key: str, value: Any, source: str) -> Any:
    """Convert `value` to the declared type of `key`; strings (from the command line) are parsed."""
    hint = _HINTS[key]
    optional = get_origin(hint) is Union and type(None) in get_args(hint)
    base = next(a for a in get_args(hint) if a is not type(None)) if optional else hint
    where = f"key '{key}' in {source}"
    if value is None or (optional and isinstance(value, str) and value.lower() in {"none", "null"}):
        if optional:
            return None
        raise ConfigError(f"{where}: expected {base.__name__}, got null")
    if key == "continue_from_epoch":
        return _continue_from_epoch(value, where)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if base in (int, float):
        return _number(base, value, where)
    if get_origin(base) is list:
        return _int_list(value, where)
    if base is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise AssertionError(f"unhandled type {hint} of {key}")


def command_line_value(value: Any) -> str:
    """`value` spelled as `--key VALUE` takes it back: true/false, none, 64,160,320,640."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


def _number(kind: type, value: Any, where: str) -> int | float:
    """An int or float from a number or a numeric string; booleans, fractional ints and floats that are
    not finite (nan, inf: they would silently poison a run) are refused."""
    expected = "an integer" if kind is int else "a number"
    parsed = None
    if isinstance(value, str):
        try:
            parsed = kind(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            if kind is float or float(value).is_integer():
                parsed = kind(value)
        except OverflowError:  # an integer beyond float range
            pass
    if parsed is None:
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    if kind is float and not math.isfinite(parsed):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return parsed


def _int_list(value: Any, where: str) -> list[int]:
    """A list of integers from a list, or from a string such as '64,160,320,640' or '[64, 160, 320, 640]'."""
    expected = f"{where}: expected a list of integers such as [64, 160, 320, 640] (64,160,320,640 on the command line)"
    if isinstance(value, str):
        items = value.strip().strip("[]").replace(",", " ").split()
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(f"{expected}, got {value!r}")
    try:
        return [_number(int, item, where) for item in items]
    except ConfigError:
        raise ConfigError(f"{expected}, got {value!r}") from None


def _continue_from_epoch(value: Any, where: str) -> str:
    """'latest' | 'from_scratch' | an epoch number; the reference's -1/-2 mean 'from scratch'."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected 'latest', 'from_scratch' or an epoch number, got {value!r}")
    text = str(value).strip()
    if text in {"latest", "from_scratch"}:
        return text
    try:
        epoch = int(text)
    except ValueError:
        raise ConfigError(
            f"{where}: expected 'latest', 'from_scratch' or an epoch number, got {value!r}") from None
    return "from_scratch" if epoch < 0 else str(epoch)


def _check_limits(config: ExperimentConfig, source: str) -> None:
    for name, spec in FIELDS.items():
        value = getattr(config, name)
        meta = spec.metadata
        if value is None:
            continue
        if meta["choices"] and value not in meta["choices"]:
            raise ConfigError(f"key '{name}' in {source}: expected one of {list(meta['choices'])}, got {value!r}")
        if meta["minimum"] is not None and value < meta["minimum"]:
            raise ConfigError(f"key '{name}' in {source}: must be >= {meta['minimum']}, got {value!r}")
        if meta["maximum"] is not None and value > meta["maximum"]:
            raise ConfigError(f"key '{name}' in {source}: must be <= {meta['maximum']}, got {value!r}")
    name = config.experiment_name
    if not name.strip() or name in {".", ".."} or any(c in name for c in "/\\\0"):
        raise ConfigError(f"key 'experiment_name' in {source}: expected a folder name (not empty, no '/' or "
                          f"'..'), got {name!r}; experiments_dir chooses where it lies")
    if config.min_learning_rate > config.meta_learning_rate:
        raise ConfigError(
            f"{source}: min_learning_rate ({config.min_learning_rate}) is above meta_learning_rate "
            f"({config.meta_learning_rate}); the cosine schedule anneals from the second to the first")
    widths = config.resnet_widths
    if len(widths) != 4 or min(widths) < 1:
        raise ConfigError(f"key 'resnet_widths' in {source}: expected 4 positive integers (one per residual "
                          f"block), got {widths!r}; the published ResNet-12 is 64,160,320,640")
    if config.backbone == "resnet12":
        _check_resnet12(config, source)
    smallest = min(config.image_height, config.image_width)
    if config.backbone == "4-CONV" and smallest >> config.num_stages < 1:
        raise ConfigError(
            f"{source}: {config.num_stages} stages halve {config.image_height}x{config.image_width} images "
            f"below one pixel; lower num_stages or raise image_height/image_width")
    if config.deterministic and config.cudnn_benchmark:
        raise ConfigError(f"{source}: cudnn_benchmark true autotunes convolutions differently in every run, which "
                          f"deterministic true rules out; set --deterministic false to autotune")
    if config.leaky_relu_slope is not None and config.activation != "leaky_relu":
        raise ConfigError(f"{source}: leaky_relu_slope is set ({config.leaky_relu_slope}) but activation is "
                          f"{config.activation!r}; drop leaky_relu_slope or use --activation leaky_relu")


def _check_resnet12(config: ExperimentConfig, source: str) -> None:
    if not (config.conv_padding and config.max_pooling):
        raise ConfigError(f"{source}: resnet12 always pads its 3x3 convolutions and max-pools after each block; "
                          f"conv_padding and max_pooling false are for 4-CONV only, so set them to true")
    if min(config.image_height, config.image_width) < 16:
        raise ConfigError(f"{source}: resnet12's four residual blocks halve {config.image_height}x"
                          f"{config.image_width} images below one pixel; it needs at least 16x16 images")


def unknown_key_error(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(FIELDS) + list(KEY_ALIASES), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; see the key table in docs/CONFIG.md"
    return ConfigError(f"unknown key '{key}' in {source}{hint}")


def apply_overrides(base: dict[str, Any], overrides: dict[str, Any], source: str) -> dict[str, Any]:
    """Merge `overrides` into `base`, converting each value to its key's type."""
    merged = dict(base)
    for raw_key, value in overrides.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"key {raw_key!r} in {source} is not a name ({type(raw_key).__name__}); keys are "
                              f"names such as batch_size")
        key = KEY_ALIASES.get(raw_key, raw_key)
        if key in IGNORED_REFERENCE_KEYS:
            continue
        if key not in FIELDS:
            raise unknown_key_error(raw_key, source)
        merged[key] = _coerce(key, value, source)
    return merged


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        # A shipped config that departs from published settings is YAML, so that a header can say why
        # (experiment_config/generate_configs.py): name it when the JSON of the same name was asked for.
        siblings = [path.with_suffix(suffix) for suffix in (".json", ".yaml", ".yml") if suffix != path.suffix]
        existing = [sibling for sibling in siblings if sibling.is_file()]
        hint = f"; did you mean {existing[0]}?" if existing else " (configs live in experiment_config/)"
        raise ConfigError(f"config file {path} does not exist{hint}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def build_config(values: dict[str, Any], source: str = "the config") -> ExperimentConfig:
    """Validate a dict of already-typed values (see `apply_overrides`) into a config."""
    config = ExperimentConfig(**values)
    _check_limits(config, source)
    return config


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Defaults < file at `path` < `overrides` (e.g. parsed from the command line)."""
    values: dict[str, Any] = {}
    source = "the defaults"
    if path is not None:
        source = str(path)
        values = apply_overrides(values, read_config_file(path), source)
    if overrides:
        values = apply_overrides(values, overrides, "the command line")
        source = f"{source} with command-line overrides"
    return build_config(values, source)


def save_config(config: ExperimentConfig, path: Path) -> None:
    """Write the resolved config as YAML, atomically (a full disk is a StorageError naming the file)."""
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def parse_command_line(argv: list[str] | None = None) -> ExperimentConfig:
    """`--name_of_args_json_file PATH` plus `--KEY VALUE` for any config key."""
    parser = argparse.ArgumentParser(
        description="Train and test MAML, MAML++ and CxGrad few-shot learners.",
        epilog="Any config key can be given as --KEY VALUE and overrides the file.")
    parser.add_argument("--name_of_args_json_file", "--config", dest="config_file", default=None,
                        help="experiment config (JSON or YAML), e.g. experiment_config/omniglot_5way_1shot/CxGrad_4conv_cpu.yaml")
    known, rest = parser.parse_known_args(argv)
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(rest):
        token = rest[index]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected command-line argument {token!r}; options look like --batch_size 2")
        key, _, inline = token[2:].partition("=")
        if inline:
            value = inline
            index += 1
        elif index + 1 < len(rest) and not rest[index + 1].startswith("--"):
            value = rest[index + 1]
            index += 2
        else:
            raise ConfigError(f"option --{key} needs a value, e.g. --{key} VALUE")
        overrides[key] = value
    return load_config(known.config_file, overrides)


def markdown_key_table() -> str:
    """The table of config keys in docs/CONFIG.md: `python -m utils.config`."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, spec in FIELDS.items():
        hint = str(_HINTS[name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
        lines.append(f"| `{name}` | {hint} | `{default_of(spec)!r}` | {spec.metadata['help']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_key_table())
