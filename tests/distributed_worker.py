"""Rank programs for tests/test_distributed.py, started by torchrun (or by hand with its variables).

    python tests/distributed_worker.py gradients OVERRIDES_JSON OUTPUT_FILE
        Rank r draws the tasks r*B..r*B+B-1 of iteration 0, as ExperimentBuilder.train does; rank 0
        saves the meta-gradients after the all-reduce, those the optimizer would step with.
    python tests/distributed_worker.py die_in_epoch EPOCH TRAIN_MAML_SYSTEM_ARGUMENTS...
        train_maml_system.py, except that the last rank dies (exit code 3, no cleanup) when
        `EPOCH` starts, like a crashed process or a lost machine.
    python tests/distributed_worker.py threads_after_run TRAIN_MAML_SYSTEM_ARGUMENTS...
        train_maml_system.py, then each rank prints the names of its process's threads that are still
        alive ("rank R threads: [...]"): the process group's own (gloo's) must have ended with the run,
        before the interpreter's exit, where they can abort the process.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import closing
from pathlib import Path

import torch

import train_maml_system
from data import FewShotDataProvider
from experiment_builder import ExperimentBuilder
from few_shot_learning_system import MAMLFewShotClassifier
from utils import distributed
from utils.config import load_config


def gradients(overrides_json: str, output: str) -> None:
    config = load_config(overrides=json.loads(overrides_json))
    with distributed.session(torch.device("cpu"), timeout_s=60) as context:
        builder = ExperimentBuilder(config, context)
        # The provider's batch-preparing threads end with the block, as in training: no thread of ours
        # should run into the interpreter's exit (see test_the_process_group_and_its_threads_end_with_the_run).
        with closing(FewShotDataProvider(config, splits=("train",),
                                         first_train_task=context.rank * config.batch_size)) as provider:
            model = builder.model
            average_gradients = model.gradient_reducer  # what the builder installed
            reduced = {}

            def reduce_and_keep(parameters):
                average_gradients(parameters)
                reduced.update({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})

            model.gradient_reducer = reduce_and_keep
            model.run_train_iter(provider.train_batch(0), epoch=0)
        if context.is_main:
            torch.save(reduced, output)


def die_in_epoch(epoch: str, *arguments: str) -> int:
    if int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1:
        train_iter = MAMLFewShotClassifier.run_train_iter

        def run_train_iter(self, task, current_epoch):
            if current_epoch == int(epoch):
                os._exit(3)
            return train_iter(self, task, current_epoch)

        MAMLFewShotClassifier.run_train_iter = run_train_iter
    return train_maml_system.main(list(arguments))


def threads_after_run(*arguments: str) -> int:
    exit_code = train_maml_system.main(list(arguments))
    tasks = Path("/proc/self/task")  # one entry per thread of this process (Linux)
    names = sorted((task / "comm").read_text().strip() for task in tasks.iterdir())
    # One write of the whole line: the ranks share torchrun's stdout, and print()'s separate write of the
    # newline let the two ranks' lines run together.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"rank {os.environ['RANK']} threads: {json.dumps(names)}\n".encode())
    return exit_code


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    modes = {"gradients": gradients, "die_in_epoch": die_in_epoch, "threads_after_run": threads_after_run}
    sys.exit(modes[mode](*rest))
