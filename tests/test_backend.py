"""The device, the process-wide torch settings and the task batching, decided once from the config."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from data import TaskBatch
from few_shot_learning_system import MAMLFewShotClassifier
from utils.backend import configure_backend, resolve_device, resolve_memory_formats, resolve_task_batching
from utils.config import ConfigError, load_config


def tiny_config(**overrides):
    return load_config(overrides=dict(image_height=8, image_width=8, num_stages=2, cnn_num_filters=4,
                                      num_classes_per_set=2, num_target_samples=1, batch_size=2,
                                      number_of_training_steps_per_iter=1, device="cpu", **overrides))


def test_device_is_resolved_once_and_refuses_a_missing_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device; use --device cpu"):
        resolve_device("cuda")


def test_deterministic_by_default_and_exclusive_with_autotuning():
    config = load_config()
    assert config.deterministic and not config.cudnn_benchmark
    with pytest.raises(ConfigError, match="set --deterministic false to autotune"):
        load_config(overrides={"cudnn_benchmark": True})
    assert load_config(overrides={"cudnn_benchmark": True, "deterministic": False}).cudnn_benchmark


def test_configure_backend_sets_cuda_determinism(monkeypatch):
    """The settings are process-wide flags, so they can be checked without a GPU (and are restored)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        configure_backend(load_config(), torch.device("cuda"))
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        configure_backend(load_config(overrides={"deterministic": False, "cudnn_benchmark": True}),
                          torch.device("cuda"))
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert not torch.are_deterministic_algorithms_enabled()  # a deterministic run before does not linger
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def test_cpu_runs_leave_the_process_settings_alone():
    before = torch.are_deterministic_algorithms_enabled()
    configure_backend(load_config(), torch.device("cpu"))
    assert torch.are_deterministic_algorithms_enabled() == before


@pytest.mark.parametrize("size, device, expected", [
    (28, "cpu", "batched"),    # Omniglot: batching measured 1.26-1.53x faster on the CPU
    (84, "cpu", "loop"),       # mini-ImageNet: no faster batched, and twice the memory
    (84, "cuda", "batched"),   # CUDA is host-bound: batching measured 3-7.5x faster
])
def test_auto_task_batching_follows_the_measurements(size, device, expected):
    config = load_config(overrides={"image_height": size, "image_width": size})
    assert config.task_batching == "auto"
    assert resolve_task_batching(config, torch.device(device)) == expected
    assert resolve_task_batching(load_config(overrides={"task_batching": "loop"}), torch.device(device)) == "loop"


CL, NCHW = torch.channels_last, torch.contiguous_format


@pytest.mark.parametrize("size, device, task_batching, expected", [
    # Omniglot's batched path: 1.12-1.32x faster channels-last first order, 0.60x second order (AVX2)
    (28, "cpu", "auto", (CL, NCHW)),
    (28, "cpu", "loop", (NCHW, NCHW)),      # per task (few channels): 0.93x channels-last
    (84, "cpu", "auto", (NCHW, NCHW)),      # looped mini-ImageNet: 0.97x channels-last
    (84, "cpu", "batched", (NCHW, NCHW)),   # batched mini-ImageNet: 0.67x
    (28, "cuda", "auto", (NCHW, NCHW)),     # no faster on the H200
])
def test_unset_channels_last_follows_the_measurements(size, device, task_batching, expected):
    config = load_config(overrides={"image_height": size, "image_width": size, "task_batching": task_batching})
    assert config.channels_last is None
    assert resolve_memory_formats(config, torch.device(device)) == expected
    for chosen, memory_format in ((True, CL), (False, NCHW)):  # a config that sets it gets it everywhere
        assert resolve_memory_formats(replace(config, channels_last=chosen), torch.device(device)) \
            == (memory_format, memory_format)


def test_model_uses_the_resolved_batching_and_the_given_gradient_reducer():
    reduced = []
    config = tiny_config()
    model = MAMLFewShotClassifier(config, torch.device("cpu"), gradient_reducer=lambda params: reduced.append(params))
    assert model.task_batching == "batched"
    assert model.memory_formats == (torch.channels_last, torch.contiguous_format)  # resolved, not the unset key
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(2).repeat(2, 1)
    task = TaskBatch(torch.randn(2, 2, 1, 8, 8, generator=generator), labels,
                     torch.randn(2, 2, 1, 8, 8, generator=generator), labels)
    model.run_train_iter(task, epoch=0)
    assert len(reduced) == 1 and all(p.grad is not None for p in reduced[0])
