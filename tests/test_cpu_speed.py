"""The CPU speed measures (docs/PERFORMANCE.md): they change how fast, never what is computed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from meta_neural_network_architectures import max_pool_2x2

REPO = Path(__file__).resolve().parents[1]


def value_and_derivatives(forward, x, upstream):
    """forward(x), the gradient of a loss on it, and the gradient of a function of that gradient.

    The gradient depends on the input (through the squared output), so the second backward runs
    through the first backward itself, as a second-order meta-gradient does.
    """
    leaf = x.clone().requires_grad_()
    out = forward(leaf)
    (grad,) = torch.autograd.grad((out.square() * upstream).sum(), leaf, create_graph=True)
    (second,) = torch.autograd.grad((grad * x).square().sum(), leaf)
    return out, grad, second


@pytest.mark.parametrize("size", [8, 21])  # 21: an odd size, whose last row and column are dropped
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_matches_aten_in_values_gradients_and_second_order(size, ties):
    generator = torch.Generator().manual_seed(size)
    if ties:  # many equal values in a window: the first maximum must get the gradient, as in ATen
        x = torch.randint(0, 3, (3, 4, size, size), generator=generator).double()
    else:
        x = torch.randn(3, 4, size, size, generator=generator, dtype=torch.float64)
    upstream = torch.randn(3, 4, size // 2, size // 2, generator=generator, dtype=torch.float64)

    ours = value_and_derivatives(max_pool_2x2, x, upstream)
    reference = value_and_derivatives(lambda t: F.max_pool2d(t, 2, 2), x, upstream)
    for mine, theirs in zip(ours, reference):
        assert torch.equal(mine, theirs)
    assert ours[0].is_contiguous()  # what the next convolution expects


MEMORY_SCRIPT = """
import os, resource, sys, torch
sys.path.insert(0, {repo!r})
from utils.backend import configure_backend
from utils.config import load_config
configure_backend(load_config(overrides={{"cpu_memory_caching": {caching}}}), torch.device("cpu"))

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

torch.ones(1)
before = rss_mb()
block = torch.empty(64 * 2**20 // 4)  # 64 MB: above glibc's largest mmap threshold
block.fill_(1.0)
del block
kept = rss_mb() - before
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = torch.empty(16 * 2**20 // 4)  # a smaller tensor next: it fits in the kept memory
block.fill_(1.0)
print(round(kept), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def kept_memory_and_faults(caching: bool, huge_pages: str) -> tuple[int, int]:
    """In a fresh process: the MB a freed 64 MB tensor leaves resident, and the page faults of the next one."""
    script = MEMORY_SCRIPT.format(repo=str(REPO), caching=caching)
    environment = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "THP_MEM_ALLOC_ENABLE": huge_pages}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=environment)
    kept, faults = done.stdout.split()
    return int(kept), int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_cpu_memory_caching_keeps_freed_memory_for_the_next_tensors():
    """Without caching glibc unmaps a freed 64 MB block at once, and the next 16 MB tensor faults in its
    4,096 pages anew; with it the block stays in the process and the next tensor reuses it."""
    kept, faults = kept_memory_and_faults(False, huge_pages="0")
    if kept > 32:
        pytest.skip(f"this C library keeps large freed blocks anyway ({kept} MB)")
    assert faults > 4000
    kept, faults = kept_memory_and_faults(True, huge_pages="0")
    assert kept >= 60 and faults < 200


def test_huge_pages_are_asked_for_before_pytorch_allocates(monkeypatch):
    """utils.backend sets THP_MEM_ALLOC_ENABLE on import (PyTorch reads it once); a user's value wins."""
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    import importlib
    import utils.backend
    importlib.reload(utils.backend)
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    importlib.reload(utils.backend)
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("this kernel has transparent huge pages off")
    # 16 MB is 4,096 pages of 4 KB, or 8 of 2 MB (the kernel may fall back to small pages for some).
    assert kept_memory_and_faults(False, huge_pages="1")[1] < 2000 < kept_memory_and_faults(False, huge_pages="0")[1]


@pytest.mark.parametrize("activation", ["leaky_relu", "relu"])
def test_activating_the_pooled_map_equals_pooling_the_activated_one(activation):
    """The official order is activation then pooling; the activations are non-decreasing, so they commute."""
    from meta_neural_network_architectures import make_activation, pooled_activation

    act = make_activation(activation, 0.01)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 11, 11, generator=generator, dtype=torch.float64)
    upstream = torch.randn(4, 6, 5, 5, generator=generator, dtype=torch.float64)

    ours = value_and_derivatives(lambda t: pooled_activation(t, act), x, upstream)
    official_order = value_and_derivatives(lambda t: F.max_pool2d(act(t), 2, 2), x, upstream)
    for mine, theirs in zip(ours, official_order):
        assert torch.equal(mine, theirs)
