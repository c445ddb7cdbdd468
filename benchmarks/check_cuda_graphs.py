"""Captured (cuda_graphs) against eager meta-iterations on one GPU: the same losses, accuracies and weights.

    python benchmarks/check_cuda_graphs.py                       # Omniglot and mini-ImageNet CxGrad shapes
    python benchmarks/check_cuda_graphs.py --configs omniglot --iterations 20

Two models with the same initial weights train on the same random tasks (bench_iteration.py's shapes),
one eagerly and one with `cuda_graphs: true`, through epochs whose multi-step-loss weights differ (so
the graph is recorded anew) and across a change from first to second order. It prints one JSON line
per config: the largest relative difference of the losses, the largest absolute difference of any
weight after the last iteration, the captures made, and both paths' median seconds per iteration
(captures left out). The last line is CUDA GRAPHS MATCH, or CUDA GRAPHS DIFFER when a loss differs by
more than `--loss-rtol` or a weight by more than `--weight-atol` (float32 rounding, amplified by Adam,
allows more than none: the two paths may sum in other orders), and the exit status is 1.
`--device cpu` runs the same code with the key ignored (a dry run of the script, not a check).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_iteration import CONFIGS, random_task_batch  # noqa: E402


def synchronize(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(config_name: str, device_name: str, iterations: int, graphs: bool) -> tuple[list[float], dict, list[float], int]:
    import torch
    from few_shot_learning_system import MAMLFewShotClassifier
    from utils.backend import configure_backend
    from utils.config import load_config

    overrides = {"device": device_name, "show_progress": False, "cuda_graphs": graphs, "task_batching": "batched",
                 "use_multi_step_loss_optimization": True, "multi_step_loss_num_epochs": 2,
                 "first_order_to_second_order_epoch": 0}
    config = load_config(CONFIGS[config_name], overrides)
    device = torch.device(device_name)
    configure_backend(config, device)
    torch.manual_seed(config.seed)
    model = MAMLFewShotClassifier(config, device)
    losses, times = [], []
    # Epoch 0: first order, multi-step weights of epoch 0; epoch 1: second order, other weights;
    # epoch 2 on: second order, the last step only.
    epochs = [min(index * 3 // iterations, 2) for index in range(iterations)]
    for index, epoch in enumerate(epochs):
        batch = random_task_batch(config, device) if index == 0 else _other_tasks(config, device, index)
        synchronize(device)
        started = time.perf_counter()
        metrics = model.run_train_iter(batch, epoch)
        synchronize(device)
        times.append(time.perf_counter() - started)
        losses.append(metrics["loss"])
    weights = {name: tensor.detach().float().cpu() for name, tensor in model.state_dict().items()}
    captures = model.captured_meta_gradient.captures if model.captured_meta_gradient is not None else 0
    # Leave out the iterations that recorded a graph (and the first, which warms everything up).
    steady = [t for t, previous, epoch in zip(times[1:], epochs, epochs[1:]) if epoch == previous]
    return losses, weights, steady, captures


def _other_tasks(config, device, seed):
    import torch
    from data import TaskBatch
    generator = torch.Generator().manual_seed(seed)
    batch = random_task_batch(config, torch.device("cpu"))
    return TaskBatch(torch.randn(batch.support_images.shape, generator=generator), batch.support_labels,
                     torch.randn(batch.query_images.shape, generator=generator), batch.query_labels).to(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=["omniglot", "mini_imagenet"],
                        default=["omniglot", "mini_imagenet"])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--loss-rtol", type=float, default=1e-3)
    parser.add_argument("--weight-atol", type=float, default=1e-3)
    args = parser.parse_args(argv)
    matched = True
    for config_name in args.configs:
        eager_losses, eager_weights, eager_times, _ = run(config_name, args.device, args.iterations, graphs=False)
        graph_losses, graph_weights, graph_times, captures = run(config_name, args.device, args.iterations, graphs=True)
        loss_difference = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager_losses, graph_losses))
        weight_difference = max((eager_weights[name] - graph_weights[name]).abs().max().item()
                                for name in eager_weights)
        ok = loss_difference <= args.loss_rtol and weight_difference <= args.weight_atol
        matched &= ok
        print(json.dumps({"config": config_name, "device": args.device, "iterations": args.iterations,
                          "max_loss_rel_difference": loss_difference, "max_weight_abs_difference": weight_difference,
                          "captures": captures, "eager_median_s_per_iter": statistics.median(eager_times),
                          "graph_median_s_per_iter": statistics.median(graph_times),
                          "speedup_graph_vs_eager": statistics.median(eager_times) / statistics.median(graph_times),
                          "match": ok}), flush=True)
    print("CUDA GRAPHS MATCH" if matched else "CUDA GRAPHS DIFFER")
    return 0 if matched else 1


if __name__ == "__main__":
    sys.exit(main())
