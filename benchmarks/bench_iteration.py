"""Seconds per meta-training iteration: the per-task loop against the batched meta-batch.

    python benchmarks/bench_iteration.py                      # the 4-CONV configs, CPU (and CUDA when present)
    python benchmarks/bench_iteration.py --configs mini_imagenet --devices cuda --iterations 20
    python benchmarks/bench_iteration.py --configs resnet12 --devices cpu --variants batched --no-dispatch \
        --iterations 3 --warmup 1                             # ResNet-12, first and second order

Settings (the published CxGrad configs of this repo; second order, and first order too for resnet12):
    omniglot       experiment_config/omniglot_5way_1shot/CxGrad_4conv.yaml       28x28x1, 64 filters, meta-batch 8
    omniglot_cpu   experiment_config/omniglot_5way_1shot/CxGrad_4conv_cpu.yaml   the CPU-budget config: 32 filters,
                                                                                  5 queries per class, first order
    mini_imagenet  experiment_config/mini_imagenet_5way_1shot/CxGrad_4conv.json  84x84x3, 48 filters, meta-batch 4,
                                                                                  15 queries per class
    resnet12       experiment_config/mini_imagenet_5way_1shot/CxGrad_resnet12.yaml  the same with ResNet-12
                                                                                  (widths 64-160-320-640)
`--orders` chooses the meta-gradient orders to time (default: each setting's own, above); each order
gets its own lines and summary. ResNet-12 at 84x84 costs tens of seconds per iteration on a small CPU.
`--set KEY=VALUE ...` changes any config key of every setting (not the keys a variant sets), e.g.
`--set batch_size=32 cnn_num_filters=64` times a candidate of benchmarks/h200_targets.sh.

The base variant and the first one against it are also timed at "dispatch" shapes: the same config, so the same sequence of operations, on
16x16 images with 4 filters and 1 query per class, where the arithmetic is negligible and the time is what
PyTorch spends issuing operations (its dispatcher, autograd, kernel launches). The summary subtracts it to
bound what batching can reach on the CPU: `speedup_bound_ideal_vs_loop` is the loop's time over the loop's
arithmetic (its time minus its dispatch time), what any batching of the same arithmetic could reach, and
`speedup_bound_V_vs_loop` the loop's time over V's arithmetic, what V would reach if issuing its operations
cost nothing (compare both with the measured `speedup_V_vs_loop`).

Every (config, device, variant) runs in a fresh subprocess, so its peak memory is its own: peak RSS on the
CPU (ru_maxrss; `rss_before_mb` is the RSS after building the model, before the first iteration), the
maximum allocated by PyTorch on CUDA. Each prints one JSON line; then one JSON line per (config, device)
gives the ratios loop / batched. Task batches are random tensors of the config's shapes (the data pipeline
is timed by bench_data.py), drawn once, so the timings are of the meta-learning computation alone.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.configs import CONFIGS  # noqa: E402
# The meta-gradient orders each setting times by default (`--orders` overrides them).
DEFAULT_ORDERS = {"omniglot": ("second",), "omniglot_cpu": ("first",), "mini_imagenet": ("second",),
                  "resnet12": ("second", "first")}
# name -> config overrides. The CUDA-only variants add this repo's GPU options to the batched path.
VARIANTS = {
    # What a config that does not set them runs: task_batching auto, channels_last unset (on for the CPU's
    # batched path), cpu_memory_caching on. The other variants name their memory format.
    "default": {},
    "loop": {"task_batching": "loop", "channels_last": False},
    "batched": {"task_batching": "batched", "channels_last": False},
    "batched_channels_last": {"task_batching": "batched", "channels_last": True},
    # The whole network in channels-last on the CPU (slower at 84x84: BatchNorm's reductions, docs/PERFORMANCE.md).
    "loop_channels_last": {"task_batching": "loop", "channels_last": True},
    # What cpu_memory_caching (on by default) gains on the CPU.
    "loop_uncached": {"task_batching": "loop", "channels_last": False, "cpu_memory_caching": False},
    "batched_uncached": {"task_batching": "batched", "channels_last": False, "cpu_memory_caching": False},
    "batched_bf16": {"task_batching": "batched", "channels_last": False, "mixed_precision": True},
    "batched_bf16_channels_last": {"task_batching": "batched", "mixed_precision": True, "channels_last": True},
    # The batched path with each training iteration captured in a CUDA graph and replayed (CUDA only).
    "batched_cuda_graphs": {"task_batching": "batched", "cuda_graphs": True},
    # What `deterministic` (the default) costs on CUDA: the batched path with cuDNN autotuning instead.
    "batched_autotuned": {"task_batching": "batched", "deterministic": False, "cudnn_benchmark": True},
    # What log_inner_loop_statistics costs (run it with --variants batched batched_statistics).
    "batched_statistics": {"task_batching": "batched", "channels_last": False, "log_inner_loop_statistics": True},
}
# Overrides that keep every operation of an iteration but make its arithmetic negligible (4 stages still fit).
DISPATCH_SHAPES = {"image_height": 16, "image_width": 16, "cnn_num_filters": 4, "resnet_widths": [4, 4, 4, 4],
                   "num_target_samples": 1}
CPU_VARIANTS = ("loop", "batched")
# The official CxGrad code's own iteration (benchmarks/bench_official.py), timed with --official-repo.
OFFICIAL = "official"
CUDA_VARIANTS = ("loop", "batched", "batched_cuda_graphs", "batched_autotuned", "batched_channels_last", "batched_bf16",
                 "batched_bf16_channels_last")


def random_task_batch(config, device):
    import torch
    from data import TaskBatch

    generator = torch.Generator().manual_seed(0)
    tasks, ways = config.batch_size, config.num_classes_per_set
    shape = config.image_shape

    def part(per_class):
        images = torch.randn(tasks, ways * per_class, *shape, generator=generator)
        labels = torch.arange(ways).repeat_interleave(per_class).expand(tasks, -1).contiguous()
        return images, labels

    support_images, support_labels = part(config.num_samples_per_class)
    query_images, query_labels = part(config.num_target_samples)
    return TaskBatch(support_images, support_labels, query_images, query_labels).to(device)


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def parse_overrides(assignments: list[str]) -> dict[str, str]:
    """`["batch_size=32", ...]` -> {"batch_size": "32"}; the config loader converts and checks the values."""
    overrides = {}
    for assignment in assignments:
        key, equals, value = assignment.partition("=")
        if not equals or not key or not value:
            raise ValueError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set batch_size=32")
        overrides[key] = value
    return overrides


def measure(config_name: str, device_name: str, variant: str, iterations: int, warmup: int,
            profile: bool = False, dispatch_shapes: bool = False, count_operations: bool = False,
            order: str = "second", config_overrides: dict | None = None) -> dict:
    """Build the model, run warm-up iterations, then time `iterations` meta-training iterations.

    `order` is the meta-gradient's ("first" or "second"); `config_overrides` are `--set`'s, which
    the variant's and the dispatch shapes' own override in turn. `count_operations` (always at the
    dispatch shapes) adds the aten calls of one more iteration.
    """
    import torch
    from few_shot_learning_system import MAMLFewShotClassifier
    from utils.backend import configure_backend
    from utils.config import load_config

    overrides = {**(config_overrides or {}), "device": device_name, "show_progress": False,
                 "second_order": order == "second", **VARIANTS[variant],
                 **(DISPATCH_SHAPES if dispatch_shapes else {})}
    config = load_config(CONFIGS[config_name], overrides)
    device = torch.device(device_name)
    configure_backend(config, device)  # each setting runs in its own process, as training does
    torch.manual_seed(config.seed)
    model = MAMLFewShotClassifier(config, device)
    batch = random_task_batch(config, device)
    rss_before = rss_mb()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def one_iteration() -> tuple[float, float]:
        """Wall seconds and CPU seconds of this process (all its threads) for one meta-iteration."""
        if cuda:
            torch.cuda.synchronize()
        started, cpu_started = time.perf_counter(), time.process_time()
        model.run_train_iter(batch, epoch=0)  # returns host floats: the iteration has finished
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started, time.process_time() - cpu_started

    for _ in range(warmup):
        one_iteration()
    if profile:
        from torch.profiler import ProfilerActivity
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as profiler:
            one_iteration()
        sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort_by, row_limit=20), file=sys.stderr)
    times, cpu_times = zip(*(one_iteration() for _ in range(iterations)))
    aten_calls = None
    if count_operations or dispatch_shapes:
        # What the host issues: every aten operator call of one iteration, nested ones too.
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            one_iteration()
        aten_calls = sum(1 for event in profiler.events() if event.name.startswith("aten::"))
    result = {"config": config_name, "device": device_name, "variant": variant,
              "shapes": "dispatch" if dispatch_shapes else "config",
              "threads": torch.get_num_threads(), "iterations": iterations,
              "median_s_per_iter": statistics.median(times), "min_s_per_iter": min(times),
              "median_cpu_s_per_iter": statistics.median(cpu_times),
              "second_order": model.use_second_order(0), "meta_batch": config.batch_size,
              "filters": config.cnn_num_filters}
    if config_overrides:
        result["set"] = config_overrides
    if aten_calls is not None:
        result["aten_calls_per_iter"] = aten_calls
    if cuda:
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    else:
        result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["rss_before_mb"] = rss_before
    return result


def run_setting(config_name: str, device_name: str, variant: str, args, dispatch_shapes: bool = False,
                order: str = "second") -> dict:
    if variant == OFFICIAL:
        from benchmarks.bench_official import run_in_subprocess
        try:
            return run_in_subprocess(args.official_repo, config_name, device_name, args.iterations, args.warmup,
                                     order, threads=args.threads)
        except RuntimeError as error:
            return {"config": config_name, "device": device_name, "variant": variant, "order": order,
                    "error": str(error).splitlines()[-1:]}
    command = [sys.executable, __file__, "--worker", config_name, device_name, variant,
               "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--order", order]
    if args.set:
        command += ["--set", *args.set]
    if dispatch_shapes:
        command.append("--dispatch-shapes")
    environment = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment)
    if completed.returncode != 0:
        return {"config": config_name, "device": device_name, "variant": variant, "order": order,
                "error": completed.stderr.strip().splitlines()[-1:]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def combine_rounds(runs: list[dict]) -> dict:
    """One setting's rounds as one line: the medians over rounds, the worst peak memory; an error if any."""
    failed = [run for run in runs if "error" in run]
    if failed or len(runs) == 1:
        return failed[0] if failed else runs[0]
    combined = dict(runs[0], rounds=len(runs))
    for key in ("median_s_per_iter", "median_cpu_s_per_iter"):
        combined[key] = statistics.median(run[key] for run in runs)
    combined["min_s_per_iter"] = min(run.get("min_s_per_iter", run["median_s_per_iter"]) for run in runs)
    combined["peak_memory_mb"] = max(run["peak_memory_mb"] for run in runs)
    return combined


def dispatch_bounds(results: dict, dispatch: dict, base_name: str, device_name: str) -> dict:
    """Each variant's dispatch time (s/iter at the dispatch shapes) and its share of the real time; on the
    CPU also two bounds on the speed-up over `base_name`: `speedup_bound_ideal` for a batching that issued
    nothing at all and computed the base's arithmetic as fast as the base does, and `speedup_bound_V` for
    variant V if its own dispatching cost nothing.

    On the CPU an operation's arithmetic follows its dispatch, so a variant's real time minus its dispatch
    time is (about) its arithmetic; when that is at least the base's whole time, no cut in overhead can make
    the variant faster than the base. On CUDA the GPU computes while the host dispatches, so a share near 1
    means the iteration is bound by the host (what CUDA graphs remove), and no bound is derived.
    """
    base_time = results[base_name]["median_s_per_iter"]
    bounds = {}
    if device_name == "cpu" and base_name in dispatch:
        # Any batching that keeps the base's arithmetic (and its speed per element) and issues nothing.
        arithmetic = max(base_time - dispatch[base_name]["median_s_per_iter"], 1e-12)
        bounds[f"speedup_bound_ideal_vs_{base_name}"] = base_time / arithmetic
    for variant, result in results.items():
        if variant not in dispatch:
            continue
        dispatch_time = dispatch[variant]["median_s_per_iter"]
        bounds[f"dispatch_s_per_iter_{variant}"] = dispatch_time
        bounds[f"dispatch_share_{variant}"] = dispatch_time / result["median_s_per_iter"]
        if variant != base_name and "aten_calls_per_iter" in dispatch[variant]:
            bounds[f"aten_call_ratio_{variant}_vs_{base_name}"] = (
                dispatch[base_name]["aten_calls_per_iter"] / dispatch[variant]["aten_calls_per_iter"])
        if variant != base_name and device_name == "cpu":
            arithmetic = max(result["median_s_per_iter"] - dispatch_time, 1e-12)
            bounds[f"speedup_bound_{variant}_vs_{base_name}"] = base_time / arithmetic
    return bounds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["omniglot", "mini_imagenet"],
                        help="default: the two 4-CONV configs (resnet12 takes minutes per iteration on a CPU)")
    parser.add_argument("--devices", nargs="+", choices=("cpu", "cuda"), default=None,
                        help="default: cpu, and cuda when PyTorch sees a GPU")
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations per setting (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of each setting (OMP_NUM_THREADS); default: PyTorch's choice")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help="what to time; the ratios are against the first (default: loop, batched on the CPU, "
                             "and the bf16 / channels_last variants too on CUDA)")
    parser.add_argument("--profile", nargs=3, metavar=("CONFIG", "DEVICE", "VARIANT"),
                        help="only this setting, with a torch.profiler table of one iteration (on stderr)")
    parser.add_argument("--dispatch-shapes", action="store_true",
                        help="with --profile: time the setting at the dispatch shapes (see above)")
    parser.add_argument("--no-dispatch", action="store_true",
                        help="skip the dispatch-shape timings (and the bounds computed from them)")
    parser.add_argument("--orders", nargs="+", choices=("second", "first"), default=None,
                        help="meta-gradient orders to time (default: second, and also first for resnet12)")
    parser.add_argument("--order", choices=("second", "first"), default="second",
                        help="with --profile: the meta-gradient order")
    parser.add_argument("--official-repo", type=Path, default=None,
                        help="a checkout of https://github.com/shlee625/CxGrad: its iteration is timed first "
                             "(benchmarks/bench_official.py) and every variant's speed-up is against it")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every variant this many times, round-robin; report medians over rounds")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every setting, e.g. --set batch_size=32 cnn_num_filters=64 "
                             "(a variant's own keys win)")
    parser.add_argument("--worker", nargs=3, metavar=("CONFIG", "DEVICE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from utils.config import load_config
    single = args.worker or args.profile
    try:
        config_overrides = parse_overrides(args.set)
        for config_name in [single[0]] if single else args.configs:
            # A misspelt key or a bad value stops here, before any setting is timed.
            load_config(CONFIGS[config_name], config_overrides)
    except ValueError as error:  # ConfigError is one
        parser.error(str(error))
    if single:
        print(json.dumps(measure(*single, args.iterations, args.warmup,
                                 profile=bool(args.profile), dispatch_shapes=args.dispatch_shapes,
                                 order=args.order, config_overrides=config_overrides)), flush=True)
        return 0

    if args.official_repo:
        args.official_repo = args.official_repo.resolve()
        if not (args.official_repo / "few_shot_learning_system.py").is_file():
            parser.error(f"--official-repo {args.official_repo}: no few_shot_learning_system.py there; clone "
                         "the official code with: git clone https://github.com/shlee625/CxGrad DIR")
        if set(args.configs) - {"omniglot", "mini_imagenet"}:
            parser.error("--official-repo times the published 4-CONV configs only: --configs omniglot mini_imagenet")
        if args.set:
            parser.error("--official-repo times the official code at the published settings: drop --set")
    import torch
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    failed = False
    settings = [(config_name, device_name, order) for config_name in args.configs for device_name in devices
                for order in (args.orders or DEFAULT_ORDERS[config_name])]
    for config_name, device_name, order in settings:
        variants = list(args.variants or (CPU_VARIANTS if device_name == "cpu" else CUDA_VARIANTS))
        if args.official_repo:
            variants.insert(0, OFFICIAL)
        # Round-robin over the variants, so that a slow spell of a shared machine hits them all alike.
        rounds = {variant: [] for variant in variants}
        for _ in range(args.rounds):
            for variant in variants:
                rounds[variant].append(run_setting(config_name, device_name, variant, args, order=order))
                print(json.dumps(rounds[variant][-1]), flush=True)
        results, dispatch = {variant: combine_rounds(runs) for variant, runs in rounds.items()}, {}
        measured = [variant for variant in variants if variant != OFFICIAL]
        if not args.no_dispatch:
            for variant in measured[:2]:  # the base and the first variant against it
                dispatch[variant] = run_setting(config_name, device_name, variant, args, dispatch_shapes=True,
                                                order=order)
                print(json.dumps(dispatch[variant]), flush=True)
        if any("error" in result for result in [*results.values(), *dispatch.values()]):
            failed = True
            continue
        base_name = variants[0]
        base = results[base_name]
        summary = {"config": config_name, "device": device_name, "second_order": order == "second",
                   "summary": True, "rounds": args.rounds}
        if config_overrides:
            summary["set"] = config_overrides
        for variant in variants[1:]:
            result = results[variant]
            # The median of the per-round ratios: each ratio compares runs made minutes apart.
            summary[f"speedup_{variant}_vs_{base_name}"] = statistics.median(
                b["median_s_per_iter"] / r["median_s_per_iter"] for b, r in zip(rounds[base_name], rounds[variant]))
            summary[f"peak_memory_ratio_{variant}_vs_{base_name}"] = result["peak_memory_mb"] / base["peak_memory_mb"]
            if device_name == "cpu":
                summary[f"cpu_time_ratio_{variant}_vs_{base_name}"] = (
                    base["median_cpu_s_per_iter"] / result["median_cpu_s_per_iter"])
        if dispatch:
            summary.update(dispatch_bounds(results, dispatch, measured[0], device_name))
        print(json.dumps(summary), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
