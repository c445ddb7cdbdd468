"""Every shipped Omniglot config at one meta-iteration budget, and whether each CxGrad config keeps up
with its MAML twin (issue 13's bar: at 2,000 iterations, CxGrad's validation accuracy >= MAML's).

    python benchmarks/omniglot_twins.py                                   # 4 settings x 3 methods, 2,000 its
    python benchmarks/omniglot_twins.py --settings 5way_1shot --methods CxGrad maml --iterations 500
    python benchmarks/omniglot_twins.py --parallel 12 --threads 1        # one big GPU: all twelve at once

A run is `experiment_config/omniglot_{setting}/{method}_4conv.{json,yaml}` (CxGrad's is YAML: it departs
from the published settings, see its header) trained under its own schedule (the 100-epoch cosine, not
one shrunk to the budget) and paused after `--iterations` meta-iterations (--total_epochs_before_pause),
then its ensemble test over the epochs so far (--evaluate_on_test_set_only). `--parallel` runs go at once,
each with `--threads` CPU threads; on a machine with CUDA they share the one GPU. Rerunning resumes what
is unfinished and reuses what is done (the folders are OUT/omniglot_{setting}_{method}). `--key value`
options after `--` go to every run (e.g. `-- --cnn_num_filters 32`).

Prints one JSON line per run (validation accuracy per epoch, seconds per epoch, the ensemble test) and a
markdown table with, per setting, CxGrad's validation accuracy at the budget minus MAML's. Exits 1 when
a CxGrad config is behind its MAML twin, 2 when a run failed (its log is OUT/NAME.log). SIGTERM or
Ctrl-C stops every run at a resumable checkpoint (exit 75): under `timeout`, rerun to continue.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as `python benchmarks/omniglot_twins.py`: make the project importable
    sys.path.insert(0, str(REPO))

from utils.config import parse_command_line  # noqa: E402
from utils.experiment_paths import ExperimentPaths  # noqa: E402
from utils.summarize_results import read_epoch_rows, read_summary  # noqa: E402

INTERRUPTED = 75  # train_maml_system.py's exit code after a signal: resumable
SETTINGS = ("5way_1shot", "5way_5shot", "20way_1shot", "20way_5shot")
METHODS = ("CxGrad", "maml", "maml++")


def config_path(setting: str, method: str) -> Path:
    folder = REPO / "experiment_config" / f"omniglot_{setting}"
    for suffix in (".yaml", ".json"):
        if (folder / f"{method}_4conv{suffix}").is_file():
            return folder / f"{method}_4conv{suffix}"
    raise SystemExit(f"no {method}_4conv config in {folder}: run python experiment_config/generate_configs.py")


CHILDREN: set[subprocess.Popen] = set()  # the trainings running now, stopped with this process
STOPPING = threading.Event()


def run_child(command: list[str], log, env: dict) -> int:
    """Run one training or test; none starts once this process has been told to stop."""
    if STOPPING.is_set():
        return INTERRUPTED
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    CHILDREN.add(child)
    if STOPPING.is_set():  # the signal came while it started
        child.send_signal(signal.SIGTERM)
    try:
        return child.wait()
    finally:
        CHILDREN.discard(child)


def stop_children(signal_number, frame) -> None:
    """SIGTERM or SIGINT (`timeout`, a batch system, Ctrl-C): pass it on. Each training then saves a
    resumable checkpoint after its current meta-iteration and exits, so a rerun continues where it stopped,
    and no training outlives this process (on a shared GPU, holding its memory)."""
    STOPPING.set()
    for child in list(CHILDREN):
        child.send_signal(signal.SIGTERM)


class Run:
    def __init__(self, setting: str, method: str, args: argparse.Namespace):
        self.setting, self.method, self.args = setting, method, args
        self.config = config_path(setting, method)
        self.name = f"omniglot_{setting}_{method}"
        self.folder = args.out / self.name
        self.paths = ExperimentPaths(self.folder)
        # The config as training will read it (so a bad override is refused now, not in a subprocess).
        per_epoch = parse_command_line(["--name_of_args_json_file", str(self.config), *args.overrides]).total_iter_per_epoch
        if args.iterations % per_epoch:
            raise SystemExit(f"--iterations {args.iterations} is not a whole number of {self.config.name}'s epochs "
                             f"({per_epoch} meta-iterations each): pick a multiple of {per_epoch}")
        self.epochs = args.iterations // per_epoch
        self.log = args.out / f"{self.name}.log"
        trained = len(read_epoch_rows(self.folder))
        if trained > self.epochs:  # its ensemble test would pick among epochs past the budget
            raise SystemExit(f"{self.folder} holds {trained} trained epochs, more than the {self.epochs} of "
                             f"--iterations {args.iterations}, and its ensemble test would choose among all of them: "
                             f"give another --out, or --iterations {trained * per_epoch}")

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, str(REPO / "train_maml_system.py"), "--name_of_args_json_file", str(self.config),
                "--experiments_dir", str(self.args.out), "--experiment_name", self.name,
                "--show_progress", "false", *self.args.overrides, *extra]

    def execute(self) -> Optional[str]:
        """Train what is missing of the budget, then test; None, or what went wrong."""
        env = dict(os.environ, OMP_NUM_THREADS=str(self.args.threads), MKL_NUM_THREADS=str(self.args.threads))
        with self.log.open("a") as log:
            done = len(read_epoch_rows(self.folder))
            if done < self.epochs:  # a pause counts the epochs of this invocation, so ask for what is missing
                started = time.perf_counter()
                code = run_child(self.command("--total_epochs_before_pause", str(self.epochs - done)), log, env)
                if code == INTERRUPTED and STOPPING.is_set():
                    return "stopped at a resumable checkpoint"
                if code != 0:
                    return f"training exited {code}"
                print(f"{self.name}: trained {self.epochs - done} epochs in {time.perf_counter() - started:.0f} s",
                      file=sys.stderr, flush=True)
            summary, statistics = self.paths.test_summary(), self.paths.summary_statistics
            if self.args.test and not (summary.is_file() and summary.stat().st_mtime >= statistics.stat().st_mtime):
                started = time.perf_counter()
                code = run_child(self.command("--evaluate_on_test_set_only", "true"), log, env)
                if code != 0:
                    return f"the ensemble test exited {code}"
                print(f"{self.name}: tested in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        return None

    def result(self) -> dict:
        rows = read_epoch_rows(self.folder)[:self.epochs]
        line = {"setting": self.setting, "method": self.method, "config": str(self.config.relative_to(REPO)),
                "epochs": len(rows), "iterations": self.args.iterations if len(rows) == self.epochs else None,
                "val_accuracy": [round(row["val_accuracy_mean"], 4) for row in rows],
                "epoch_time_s": [round(row["epoch_time_s"], 1) for row in rows]}
        if self.paths.test_summary().is_file():
            test = read_summary(self.paths.test_summary())
            line.update(ensemble_test_accuracy=round(test["ensemble_test_accuracy"], 4),
                        ensemble_test_confidence_95=round(test["ensemble_test_confidence_95"], 4))
        return line


def table(results: list[dict]) -> tuple[list[str], bool]:
    """Markdown rows, and whether every CxGrad run is at or above its MAML twin at the budget."""
    lines = ["| setting | method | validation accuracy per epoch | s per epoch | ensemble test | CxGrad - MAML at the budget |",
             "|---|---|---|---|---|---|"]
    behind = False
    final = {(r["setting"], r["method"]): r["val_accuracy"][-1] for r in results if r["iterations"]}
    for r in results:
        verdict = ""
        if r["method"] == "CxGrad" and (r["setting"], "maml") in final and (r["setting"], "CxGrad") in final:
            gap = final[(r["setting"], "CxGrad")] - final[(r["setting"], "maml")]
            behind |= gap < 0
            verdict = f"{100 * gap:+.1f} points" + (" (BEHIND)" if gap < 0 else "")
        accuracies = " / ".join(f"{100 * a:.1f}%" for a in r["val_accuracy"]) or "-"
        seconds = f"{sum(r['epoch_time_s']) / len(r['epoch_time_s']):.0f}" if r["epoch_time_s"] else "-"
        test = (f"{100 * r['ensemble_test_accuracy']:.2f}% +- {100 * r['ensemble_test_confidence_95']:.2f}%"
                if "ensemble_test_accuracy" in r else "-")
        lines.append(f"| {r['setting']} | {r['method']} | {accuracies} | {seconds} | {test} | {verdict} |")
    return lines, behind


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--iterations", type=int, default=2000, help="meta-iterations per run (default 2000)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run (default 1)")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "omniglot_twins")
    parser.add_argument("--no-test", dest="test", action="store_false", help="skip the ensemble tests")
    args = parser.parse_args(argv)
    args.overrides, args.out = overrides, args.out.resolve()
    runs = [Run(setting, method, args) for setting in args.settings for method in args.methods]
    args.out.mkdir(parents=True, exist_ok=True)
    STOPPING.clear()
    # Restored afterwards, so that calling main() in a process (as the tests do) leaves its handlers as they were.
    # A signal inherited as ignored stays ignored, as in train_maml_system.py (utils/interrupt.py): a shell starts
    # `command &` deaf to Ctrl-C, and so are its children, which keep stopping on SIGTERM.
    previous = {number: signal.signal(number, stop_children) for number in (signal.SIGTERM, signal.SIGINT)
                if signal.getsignal(number) != signal.SIG_IGN}
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            problems = dict(zip((run.name for run in runs), pool.map(Run.execute, runs)))
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    results = [run.result() for run in runs]
    for line in results:
        print(json.dumps(line), flush=True)
    lines, behind = table(results)
    print("\n".join(lines))
    failed = {name: problem for name, problem in problems.items() if problem}
    for name, problem in failed.items():
        print(f"{name}: {problem}; see {args.out / (name + '.log')}", file=sys.stderr)
    if STOPPING.is_set():
        print("stopped by a signal: rerun the same command to continue", file=sys.stderr)
        return INTERRUPTED
    return 2 if failed else 1 if behind else 0


if __name__ == "__main__":
    sys.exit(main())
