"""The device and the process-wide torch settings, decided once at start-up from the config.

Entry points (`train_maml_system.py`, the benchmarks) call `resolve_device` and `configure_backend`
before building anything; the model and the builders take the resolved device and never change a
process-wide setting themselves.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import NamedTuple

# PyTorch backs CPU tensors of 2 MB and more with transparent huge pages when this is set, so a new
# large tensor takes one page fault per 2 MB instead of one per 4 KB (a fresh 102 MB tensor: hundreds
# of faults instead of 26,000; `benchmarks/bench_cpu_ops.py`). PyTorch reads it at its
# first allocation, so it is set here, on import, before any entry point allocates; a user's setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402  (after the environment PyTorch reads)

from utils.config import ConfigError, ExperimentConfig

# cuBLAS needs this before its first use to pick deterministic reduction orders.
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"
# On the CPU, meta-batches of images up to this many pixels run faster batched (Omniglot's 28x28:
# 1.26-1.53x over the per-task loop); at 84x84 batching is no faster (0.81-1.06x) and needs twice the
# memory (docs/PERFORMANCE.md, `benchmarks/bench_iteration.py`).
CPU_BATCHED_MAX_PIXELS = 32 * 32
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


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
        else:
            torch.use_deterministic_algorithms(False)
    if device.type == "cpu" and config.cpu_memory_caching:
        keep_cpu_memory()
    if config.compile_backbone and config.contextual_grad:
        functorch_config = getattr(torch._functorch, "config", None)
        if hasattr(functorch_config, "donated_buffer"):
            # CxGrad back-propagates twice through a first-order step (retain_graph), which compiled
            # backward passes allow only without donated buffers.
            functorch_config.donated_buffer = False


def keep_cpu_memory() -> bool:
    """Stop returning large freed blocks to the OS, so the next operation does not page-fault them back in.

    glibc serves every allocation above 32 MB (an 84x84 activation of a query set) with a fresh mmap and
    unmaps it on free, so each such operation first faults its pages in and the kernel zeroes them: a
    second-order mini-ImageNet iteration spent about a fifth of its time there. With mmap off and no heap
    trimming, freed blocks stay in the heap and are reused, at the price of a higher peak RSS (the heap
    fragments). Nothing computed changes. Returns whether glibc took the settings (other C libraries
    keep their own behaviour).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Blocks that no longer fit a heap still get an mmap: glibc falls back to it whatever M_MMAP_MAX says.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


class MemoryFormats(NamedTuple):
    """The activations' memory format for the forward passes without and with a double backward through
    them (second-order support passes)."""
    single_backward: torch.memory_format
    double_backward: torch.memory_format


def resolve_memory_formats(config: ExperimentConfig, device: torch.device) -> MemoryFormats:
    """`channels_last` true or false: that format for every pass. Unset (the default): channels-last only
    on the CPU's batched small-image path, and there only where no double backward runs through the pass.

    There the tasks lie side by side along the channels (hundreds of channels, few images), where the
    CPU's BatchNorm and max-pool are faster on channels-last activations than on NCHW ones; but a double
    backward through the convolutions is much slower channels-last. On an AMD EPYC (AVX2), one thread,
    `bench_iteration.py --configs omniglot_cpu omniglot --variants batched batched_channels_last --orders
    first second`: first order 1.32x (the CPU config) and 1.12x (64 filters) faster, second order 0.60x
    (docs/PERFORMANCE.md). At 84x84 the CPU is slower channels-last, looped or batched, and on the H200 it
    changed nothing measurable: NCHW there.
    """
    if config.channels_last is not None:
        chosen = torch.channels_last if config.channels_last else torch.contiguous_format
        return MemoryFormats(chosen, chosen)
    small_batched_cpu = device.type == "cpu" and resolve_task_batching(config, device) == "batched" \
        and config.image_height * config.image_width <= CPU_BATCHED_MAX_PIXELS
    return MemoryFormats(torch.channels_last if small_batched_cpu else torch.contiguous_format,
                         torch.contiguous_format)


def resolve_task_batching(config: ExperimentConfig, device: torch.device) -> str:
    """`auto`: the whole meta-batch at once on CUDA (host-bound, 3-7.5x faster) and for small images on
    the CPU; task by task for larger images on the CPU, where batching gains nothing and doubles memory."""
    if config.task_batching != "auto":
        return config.task_batching
    if device.type == "cuda" or config.image_height * config.image_width <= CPU_BATCHED_MAX_PIXELS:
        return "batched"
    return "loop"
