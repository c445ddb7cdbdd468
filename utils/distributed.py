"""One run over several processes with torch.distributed, launched by torchrun.

torchrun starts one process per GPU (or CPU slot) and tells each its place through the environment:
RANK (0..WORLD_SIZE-1 over all machines), WORLD_SIZE and LOCAL_RANK (its GPU on its machine).
Without these variables the run is one process and every collective below does nothing.

How a run is split (experiment_builder.py calls these helpers):
- training: with B = batch_size tasks per rank, rank r takes the global tasks r*B..r*B+B-1 of every
  meta-iteration. Each rank's meta-gradient is the mean over its B tasks; `average_gradients`
  averages them over the N ranks, which is the mean over all N*B tasks, so every rank steps its own
  optimizer with the gradient of one process with meta-batch N*B and the optimizer states stay equal;
- evaluation: the fixed tasks are dealt out in whole evaluation batches (`evaluation_shard`), so
  each batch is the one a single process would compute, and `gather` returns them in task order;
- files: only rank 0 writes; the others wait at a barrier, then read them (a filesystem that every
  machine sees, as on clusters, holds the experiments).

The backbone is a functional network called many times per meta-iteration with adapted weights, so
DistributedDataParallel (which hooks one forward/backward of a module) does not fit; the meta-
gradients are averaged explicitly with one all-reduce per meta-iteration instead.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Iterator

import numpy as np
import torch
# Imported before any process group exists, on purpose: importing it (torch.optim does, on the first
# optimizer) while one exists keeps hidden references to the group, which then outlives
# destroy_process_group; its gloo threads run on into the interpreter's exit, where releasing a tensor
# makes one abort the rank ("terminate called without an active exception", SIGABRT) after a run that
# worked. tests/test_distributed.py checks that the threads end with the session.
import torch._dynamo  # noqa: F401
import torch.distributed as dist

from utils.config import ConfigError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(RuntimeError):
    """A collective failed: another rank died or hangs (past `distributed_timeout_s`), or the network broke."""


class DistributedStartError(DistributedError):
    """The ranks never formed a process group: a rank is missing, or MASTER_ADDR/PORT cannot be reached."""


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the run. The default is a single process (rank 0 of 1)."""

    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    initialized: bool = False  # whether this context started the process group (and must end it)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints the run's progress."""
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    @contextmanager
    def _collective(self, name: str) -> Iterator[None]:
        """gloo reports a lost peer or a timeout as a bare RuntimeError: say what it means."""
        try:
            yield
        except RuntimeError as error:
            raise DistributedError(f"rank {self.rank} of {self.world_size}: {name} failed "
                                   f"({type(error).__name__}: {error})") from error

    def barrier(self) -> None:
        if self.initialized:
            with self._collective("barrier"):
                if self.device.type == "cuda":
                    dist.barrier(device_ids=[self.device.index])
                else:
                    dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. decoding a dataset into its cache), then the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Every rank starts from rank 0's parameters (seeded alike, but initialisation on a GPU need not be)."""
        if not self.initialized:
            return
        with torch.no_grad(), self._collective("broadcast of the initial parameters"):
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace every .grad by its mean over the ranks, in one all-reduce.

        Each rank's gradient is the mean over its own B tasks; divided by N and summed over the ranks,
        it is the mean over all N*B tasks (exactly so when N is a power of two).
        """
        if not self.initialized:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([grad.reshape(-1) for grad in grads]).div_(self.world_size)
        with self._collective("all-reduce of the meta-gradients"):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def average_over_ranks(self, values: np.ndarray) -> np.ndarray:
        """The element-wise mean of `values` (same shape on every rank) over the ranks, in float64."""
        if not self.initialized:
            return np.asarray(values, dtype=np.float64)
        tensor = torch.as_tensor(np.asarray(values, dtype=np.float64), device=self.device)
        with self._collective("all-reduce of the training metrics"):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return (tensor / self.world_size).cpu().numpy()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (a stop request reaches the ranks at different times)."""
        if not self.initialized:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.device)
        with self._collective("all-reduce of the stop flag"):
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def evaluation_shard(self, num_tasks: int, batch_size: int) -> range:
        """This rank's contiguous share of the tasks 0..num_tasks-1, cut at evaluation-batch boundaries."""
        num_batches = -(-num_tasks // batch_size)
        first = self.rank * num_batches // self.world_size
        last = (self.rank + 1) * num_batches // self.world_size
        return range(min(first * batch_size, num_tasks), min(last * batch_size, num_tasks))

    def gather(self, local: Any, what: str = "all-gather of the evaluation results") -> list[Any]:
        """Every rank's `local` (any picklable object), in rank order, on every rank; `what` names the
        collective in a time-out's message."""
        if not self.initialized:
            return [local]
        gathered: list[Any] = [None] * self.world_size
        with self._collective(what):
            dist.all_gather_object(gathered, local)
        return gathered

    def stop(self) -> None:
        """Leave the process group; rank 0 goes last.

        Ranks started by hand (MASTER_ADDR/PORT, no torchrun agent) use a store that rank 0's process
        hosts; so that no rank still leaving loses it, each other rank says through the store when it has
        left, and rank 0 waits for that (up to a few seconds: a rank that died says nothing). Under
        torchrun the agent hosts the store; the wait is then only a last meeting. (The exit aborts once
        blamed on this came from a group kept alive past this call: see the torch._dynamo import above.)
        """
        if not (self.initialized and dist.is_initialized()):
            return
        store = dist.distributed_c10d._get_default_store()
        dist.destroy_process_group()
        try:
            if self.is_main:
                store.wait([f"left/{rank}" for rank in range(1, self.world_size)], timedelta(seconds=10))
            else:
                store.set(f"left/{self.rank}", "1")
        except RuntimeError:  # a rank that died, or rank 0 gone already: nothing left to wait for
            pass


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def _environment_integer(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; it is set by torchrun "
                          f"(torchrun --nproc_per_node=N train_maml_system.py ...)") from None


def start(device: torch.device, timeout_s: float) -> DistributedContext:
    """A single-process context, or, under torchrun, join the process group (NCCL on CUDA, gloo on CPU).

    Under torchrun a CUDA run uses the GPU numbered LOCAL_RANK; `timeout_s` bounds how long a rank
    waits in a collective for the others, so a rank that died or hung ends the run with an error.
    """
    if not launched_by_torchrun():
        return DistributedContext(device=device)
    rank, world_size, local_rank = (_environment_integer(name) for name in TORCHRUN_VARIABLES)
    if device.type == "cuda":
        available = torch.cuda.device_count()
        if local_rank >= available:
            raise ConfigError(f"local rank {local_rank} needs GPU {local_rank}, but this machine shows "
                              f"{available} GPUs; start at most {available} processes per machine "
                              f"(torchrun --nproc_per_node={available})")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as error:  # DistStoreError, DistNetworkError; ValueError: a bad address
        address = f"{os.environ.get('MASTER_ADDR', '(MASTER_ADDR unset)')}:{os.environ.get('MASTER_PORT', '(MASTER_PORT unset)')}"
        raise DistributedStartError(
            f"rank {rank} of {world_size} could not join the process group at {address} "
            f"({type(error).__name__}: {error}). Nothing was trained or written. Start all ranks with one "
            f"torchrun command (torchrun --nproc_per_node=N train_maml_system.py ...); across machines give "
            f"every one the same --master_addr/--master_port, reachable from all of them, and the same "
            f"--nnodes") from None
    return DistributedContext(device=device, rank=rank, world_size=world_size, initialized=True)


@contextmanager
def session(device: torch.device, timeout_s: float) -> Iterator[DistributedContext]:
    """`start`, and end the process group however the block ends (also on an error).

    After a normal end the ranks first meet at a barrier: a rank that closed its connections while
    another still flushed the last collective could make gloo abort that one.
    """
    context = start(device, timeout_s)
    try:
        yield context
        context.barrier()
    finally:
        context.stop()
