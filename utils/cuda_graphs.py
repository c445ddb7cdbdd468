"""A training iteration's forward and meta-backward, captured once in a CUDA graph and replayed.

On a GPU the batched meta-iteration is bound by the host: it issues thousands of small kernels (every
inner step's forward, its gradient and, in second order, the graph through them) faster than Python and
the autograd engine can launch them (docs/PERFORMANCE.md). A CUDA graph records those launches once;
each replay issues them all in one call.

What is captured: `MAMLFewShotClassifier.meta_gradient`, which leaves the meta-gradient in each
parameter's `.grad` and returns the per-task losses and accuracies as device tensors. What is not,
and why:
- the Adam step and the finiteness check. The host reads the losses, accuracies and the gradients'
  finiteness probe once per iteration, as the eager path does, and steps Adam only when they are
  finite, so a non-finite iteration is still skipped (utils/nonfinite.py);
- `log_inner_loop_statistics` iterations, whose recorder keeps host-side state (they run eagerly);
- evaluation, which is already cheap per task and changes its task count at the end of a split.
A graph bakes in the Python values it was recorded with (the multi-step-loss weights of the epoch, the
derivative order, the shapes), so it is keyed on them and recorded anew when they change.

The replay writes into the buffers of the capture: the task is copied into static tensors, and the
gradients land in the `.grad` tensors the capture allocated (each replay first puts them back on the
parameters, in case an eager iteration replaced them). Nothing else an iteration reads changes between replays: the backbone keeps no BatchNorm
running statistics and CxGrad's context starts from the same zeros for every task.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Hashable, Iterable, Optional, Protocol

import numpy as np
import torch
from torch import Tensor, nn


class TaskBatch(Protocol):
    """What this module needs of data.TaskBatch (a layer above utils/): its four tensors, in this order."""
    support_images: Tensor
    support_labels: Tensor
    query_images: Tensor
    query_labels: Tensor

# Eager iterations on a side stream before a capture, as PyTorch asks (cuBLAS handles, autograd's
# device threads and the caching allocator settle there, not inside the graph).
WARMUP_ITERATIONS = 3


class CudaGraph:
    """torch.cuda.CUDAGraph behind the two calls this module needs (tests replace it on the CPU)."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, record: Callable[[], Any]) -> Any:
        with torch.cuda.graph(self.graph):
            return record()

    def replay(self) -> None:
        self.graph.replay()

    @staticmethod
    def warm_up(run: Callable[[], Any]) -> None:
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            for _ in range(WARMUP_ITERATIONS):
                run()
        torch.cuda.current_stream().wait_stream(side_stream)


class CapturedMetaGradient:
    """`compute(key, task) -> tensors` captured per key and replayed on new tasks of the same shapes.

    `key` holds every Python value `compute` depends on besides the task. `compute` must leave the gradients of `parameters` in their `.grad` and make no host sync.
    Calling it returns the tensors of the latest replay: read them (or copy them) before the next call.
    """

    def __init__(self, compute: Callable[[Hashable, TaskBatch], tuple[Tensor, ...]], parameters: Iterable[nn.Parameter],
                 device: torch.device, graph_factory: Callable[[], Any] = CudaGraph) -> None:
        self.compute = compute
        self.parameters = list(parameters)
        self.device = device
        self.graph_factory = graph_factory
        self.key: Optional[Hashable] = None
        self.graph: Any = None
        self.static_task: Optional[TaskBatch] = None
        self.static_outputs: tuple[Tensor, ...] = ()
        self.gradients: list[Optional[Tensor]] = []  # the .grad tensors the capture allocated
        self.captures = 0  # how many times a graph was recorded (tests and benchmarks read it)

    def __call__(self, key: Hashable, task: TaskBatch) -> tuple[Tensor, ...]:
        if key != self.key or not self._fits(task):
            self._capture(key, task)
        self._load(task)
        # An eager iteration in between (statistics logging) sets the gradients to None or replaces
        # them; the replay writes into the capture's own, so those are what the parameters must hold.
        for parameter, gradient in zip(self.parameters, self.gradients):
            parameter.grad = gradient
        self.graph.replay()
        return self.static_outputs

    def _fits(self, task: TaskBatch) -> bool:
        return self.static_task is not None and all(
            mine.shape == theirs.shape and mine.dtype == theirs.dtype
            for mine, theirs in zip(_tensors(self.static_task), _tensors(task)))

    def _load(self, task: TaskBatch) -> None:
        for static, new in zip(_tensors(self.static_task), _tensors(task)):
            static.copy_(new, non_blocking=True)

    def _capture(self, key: Hashable, task: TaskBatch) -> None:
        # Free the old graph (and its memory pool) before recording the next one.
        self.graph, self.static_outputs, self.gradients, self.key = None, (), [], None
        self.static_task = type(task)(*(tensor.to(self.device, copy=True) for tensor in _tensors(task)))
        graph = self.graph_factory()

        def iteration() -> tuple[Tensor, ...]:
            for parameter in self.parameters:
                parameter.grad = None  # the capture allocates the gradients its replays write into
            return self.compute(key, self.static_task)

        graph.warm_up(iteration)
        self.static_outputs = graph.capture(iteration)
        self.gradients = [parameter.grad for parameter in self.parameters]
        self.graph, self.key = graph, key
        self.captures += 1


def _tensors(task: TaskBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return task.support_images, task.support_labels, task.query_images, task.query_labels


def captured_meta_gradient_for(model: nn.Module, enabled: bool, device: torch.device,
                               distributed: bool) -> Optional[CapturedMetaGradient]:
    """The capture for `model` when `cuda_graphs` asks for it and it can be used; else None (eager)."""
    if not enabled:
        return None
    reason = None
    if device.type != "cuda":
        reason = f"it needs CUDA and this run is on the {device.type}"
    elif distributed:
        reason = "the meta-gradients are all-reduced between ranks (torchrun)"
    elif model.config.compile_backbone:
        reason = "compile_backbone is on (torch.compile brings its own CUDA graphs)"
    if reason is not None:
        warnings.warn(f"cuda_graphs is ignored: {reason}; the meta-iterations run eagerly")
        return None

    def compute(key: tuple[tuple[float, ...], bool], task: TaskBatch) -> tuple[Tensor, Tensor]:
        weights, second_order = key
        losses, correct, _ = model.meta_gradient(task, np.asarray(weights), second_order)
        return losses, correct

    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    return CapturedMetaGradient(compute, trained, device)
