"""The device and the process-wide torch settings, decided once at start-up from the config.

Entry points (`train_maml_system.py`, the benchmarks) call `resolve_device` and `configure_backend`
before building anything; the model and the builders take the resolved device and never change a
process-wide setting themselves.
"""
from __future__ import annotations

import os

import torch

from utils.config import ConfigError, ExperimentConfig

# cuBLAS needs this before its first use to pick deterministic reduction orders.
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"
# On the CPU, meta-batches of images up to this many pixels run faster batched (Omniglot's 28x28:
# 1.26-1.53x over the per-task loop); at 84x84 batching is no faster (0.81-1.06x) and needs twice the
# memory (docs/PERFORMANCE.md, `benchmarks/bench_iteration.py`).
CPU_BATCHED_MAX_PIXELS = 32 * 32


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for, but PyTorch sees no CUDA device; use --device cpu "
                          "(or --device auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def configure_backend(config: ExperimentConfig, device: torch.device) -> None:
    """Process-wide settings; none of them changes what is computed, only how (and how reproducibly)."""
    if device.type == "cuda":
        # Autotuned convolution algorithms differ from process to process, and so do the runs.
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
        torch.backends.cudnn.deterministic = config.deterministic
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
            # Some CUDA kernels (max-pool backward among them) have no deterministic version: warn, not fail.
            torch.use_deterministic_algorithms(True, warn_only=True)
    if config.compile_backbone and config.contextual_grad:
        functorch_config = getattr(torch._functorch, "config", None)
        if hasattr(functorch_config, "donated_buffer"):
            # CxGrad back-propagates twice through a first-order step (retain_graph), which compiled
            # backward passes allow only without donated buffers.
            functorch_config.donated_buffer = False


def resolve_task_batching(config: ExperimentConfig, device: torch.device) -> str:
    """`auto`: the whole meta-batch at once on CUDA (host-bound, 3-7.5x faster) and for small images on
    the CPU; task by task for larger images on the CPU, where batching gains nothing and doubles memory."""
    if config.task_batching != "auto":
        return config.task_batching
    if device.type == "cuda" or config.image_height * config.image_width <= CPU_BATCHED_MAX_PIXELS:
        return "batched"
    return "loop"
