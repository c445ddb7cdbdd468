"""The two CPU costs behind docs/PERFORMANCE.md's "The CPU against the official code", one operation each.

    python benchmarks/bench_cpu_ops.py            # about 20 s on a 2-core CPU

Each line is a median of 10 in milliseconds, with the page faults per call, in this process:
- a multiply of a 75x48x84x84 float32 tensor (a mini-ImageNet query activation, 102 MB) into a new
  tensor, with glibc's default allocator, and again after `utils.backend.keep_cpu_memory()` (freed
  blocks kept in the process); huge pages are what utils.backend sets on import (THP_MEM_ALLOC_ENABLE);
- 2x2 max-pooling of that tensor: ATen's NCHW kernel (`F.max_pool2d`) against `max_pool_2x2`
  (a channels-last copy through ATen's channels-last kernel), forward only.
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from meta_neural_network_architectures import max_pool_2x2  # noqa: E402
from utils.backend import keep_cpu_memory  # noqa: E402


def timed(operation, repeats: int = 10) -> dict:
    operation()
    times, faults = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        operation()
        times.append((time.perf_counter() - started) * 1e3)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"median_ms": round(statistics.median(times), 2), "page_faults": statistics.median(faults)}


def main() -> int:
    activation = torch.randn(75, 48, 84, 84)
    print(json.dumps({"operation": "multiply into a new tensor", "allocator": "glibc default",
                      **timed(lambda: activation * 1.0)}), flush=True)
    print(json.dumps({"operation": "2x2 max-pool", "kernel": "F.max_pool2d (NCHW)",
                      **timed(lambda: F.max_pool2d(activation, 2, 2))}), flush=True)
    print(json.dumps({"operation": "2x2 max-pool", "kernel": "max_pool_2x2 (channels-last copy)",
                      **timed(lambda: max_pool_2x2(activation))}), flush=True)
    keep_cpu_memory()
    print(json.dumps({"operation": "multiply into a new tensor", "allocator": "keep_cpu_memory",
                      **timed(lambda: activation * 1.0)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
