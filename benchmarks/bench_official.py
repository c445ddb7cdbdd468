"""Seconds per meta-training iteration of the official CxGrad code, on the shapes bench_iteration.py times.

    git clone https://github.com/shlee625/CxGrad /tmp/official_cxgrad      # any checkout of the official code
    python benchmarks/bench_official.py --official-repo /tmp/official_cxgrad --configs omniglot mini_imagenet

It builds the official `MAMLFewShotClassifier` from the same experiment config this repo's
`bench_iteration.py` uses (the keys are the official ones; the official argument parser supplies its own
defaults for the rest), feeds it random tasks of the config's shapes, drawn once, in the official
layout (tasks x classes x samples x C x H x W), and times `run_train_iter` (median after warm-up), each
config in its own process. It prints one JSON line per config in bench_iteration.py's format (variant
"official"), so the two can be compared as ratios within one run:

    python benchmarks/bench_iteration.py --devices cpu --official-repo /tmp/official_cxgrad \
        --variants default loop --rounds 3

times both, round-robin, and prints `speedup_V_vs_official` for each variant.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.configs import CONFIGS  # noqa: E402  (a light module: no torch, none of ours)


def official_args(official_repo: Path, config_path: Path, order: str):
    """The official parser's arguments for `config_path`, as its train_maml_system.py would read them."""
    saved_argv = sys.argv
    os.environ.setdefault("DATASET_DIR", str(official_repo))
    json_copy = None
    if config_path.suffix != ".json":  # the official parser reads JSON only: hand it the YAML's keys as JSON
        import yaml
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as json_copy:
            json.dump(yaml.safe_load(config_path.read_text()), json_copy)
        config_path = Path(json_copy.name)
    sys.argv = ["train_maml_system.py", "--name_of_args_json_file", str(config_path)]
    try:
        from utils.parser_utils import get_args  # the official utils/, first on sys.path
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every argument
            args, device = get_args()
    finally:
        sys.argv = saved_argv
        if json_copy is not None:
            os.unlink(json_copy.name)
    args.second_order = order == "second"
    return args, device


def measure(official_repo: Path, config_name: str, iterations: int, warmup: int, order: str) -> dict:
    import torch

    # The official modules are top-level names (data, utils, few_shot_learning_system) that this repo
    # also uses: put the official checkout first and drop this repo from the path.
    sys.path[:] = [str(official_repo)] + [p for p in sys.path if Path(p or ".").resolve() != REPO]
    args, device = official_args(official_repo, CONFIGS[config_name], order)
    from few_shot_learning_system import MAMLFewShotClassifier
    shape = (args.image_channels, args.image_height, args.image_width)
    with contextlib.redirect_stdout(io.StringIO()):
        model = MAMLFewShotClassifier(im_shape=(2, *shape), device=device, args=args)
    generator = torch.Generator().manual_seed(0)
    tasks, ways = args.batch_size, args.num_classes_per_set

    def part(per_class):
        images = torch.randn(tasks, ways, per_class, *shape, generator=generator)
        labels = torch.arange(ways).view(1, ways, 1).expand(tasks, ways, per_class).contiguous()
        return images, labels

    support_images, support_labels = part(args.num_samples_per_class)
    query_images, query_labels = part(args.num_target_samples)
    batch = (support_images, query_images, support_labels, query_labels)
    cuda = bool(args.use_cuda)
    rss_before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def one_iteration():
        start, cpu_start = time.perf_counter(), time.process_time()
        losses, _ = model.run_train_iter(batch, epoch=0, current_iter=0)
        float(losses["loss"])  # the official iteration has read its predictions to the host already
        return time.perf_counter() - start, time.process_time() - cpu_start

    for _ in range(warmup):
        one_iteration()
    timings = [one_iteration() for _ in range(iterations)]
    result = {"config": config_name, "device": "cuda" if cuda else "cpu", "variant": "official",
              "shapes": "config", "threads": torch.get_num_threads(), "iterations": iterations,
              "median_s_per_iter": statistics.median(t for t, _ in timings),
              "min_s_per_iter": min(t for t, _ in timings),
              "median_cpu_s_per_iter": statistics.median(c for _, c in timings),
              "second_order": order == "second", "meta_batch": tasks}
    if cuda:
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["rss_before_mb"] = rss_before
    return result


def run_in_subprocess(official_repo: Path, config_name: str, device_name: str, iterations: int, warmup: int,
                      order: str, threads: int | None = None) -> dict:
    """One config in a fresh process: its memory is its own and the official modules don't meet ours.

    The official code takes the GPU whenever PyTorch sees one, so the CPU is asked for by hiding the GPUs.
    """
    command = [sys.executable, str(Path(__file__).resolve()), "--official-repo", str(official_repo),
               "--configs", config_name, "--iterations", str(iterations), "--warmup", str(warmup),
               "--orders", order, "--in-process"]
    environment = dict(os.environ)
    if device_name == "cpu":
        environment["CUDA_VISIBLE_DEVICES"] = ""
    if threads:
        environment["OMP_NUM_THREADS"] = str(threads)
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if result.returncode != 0:
        raise RuntimeError(f"the official code failed on {config_name}:\n{result.stderr[-3000:]}")
    line = json.loads(result.stdout.strip().splitlines()[-1])
    if line["device"] != device_name:
        raise RuntimeError(f"the official code ran on {line['device']}, not {device_name}")
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-repo", type=Path, required=True,
                        help="a checkout of https://github.com/shlee625/CxGrad")
    parser.add_argument("--configs", nargs="+", default=["omniglot", "mini_imagenet"],
                        choices=["omniglot", "mini_imagenet"])
    parser.add_argument("--orders", nargs="+", default=["second"], choices=["first", "second"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    official_repo = args.official_repo.resolve()
    if not (official_repo / "few_shot_learning_system.py").is_file():
        parser.error(f"--official-repo {official_repo}: no few_shot_learning_system.py there; "
                     "clone it with: git clone https://github.com/shlee625/CxGrad DIR")
    for config_name in args.configs:
        for order in args.orders:
            if args.in_process:
                line = measure(official_repo, config_name, args.iterations, args.warmup, order)
            else:
                line = run_in_subprocess(official_repo, config_name, args.device, args.iterations, args.warmup, order)
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
