"""torch.distributed on the CPU (gloo): 2 ranks started by torchrun train exactly like 1 process.

N ranks with batch_size B per rank must equal one process with batch_size N*B: the same meta-
gradients, the same weights after training, the same validation and ensemble-test numbers, and
checkpoints that resume on another number of ranks.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import command_line, folder_held_by_another_process, tiny_overrides
from data import FewShotDataProvider
from experiment_builder import ExperimentBuilder
from utils.config import load_config
from utils.interrupt import INTERRUPTED_EXIT_CODE
from utils.checkpoints import read_checkpoint
from utils.experiment_paths import ExperimentPaths

pytestmark = pytest.mark.slow  # every test here starts torchrun or rank processes

REPO = Path(__file__).resolve().parents[1]
ENVIRONMENT = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
# Tasks per rank; the one-process reference uses RANKS * TASKS_PER_RANK. evaluation_batch_size is
# fixed so both compute the same evaluation batches (its default follows batch_size).
RANKS, TASKS_PER_RANK = 2, 2
RUN = dict(total_epochs=2, total_iter_per_epoch=2, evaluation_batch_size=2, contextual_grad=True)


def torchrun(nproc: int, *arguments: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free port of its own) with one thread per rank."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *arguments]
    done = subprocess.run(command, cwd=REPO, env=ENVIRONMENT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def rank_environments(world_size: int) -> list[dict[str, str]]:
    """What torchrun would set for each rank of a run started by hand (so one rank can die or be
    signalled alone), with a free port of this machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [dict(ENVIRONMENT, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)) for rank in range(world_size)]


def start_ranks(script: list[str], overrides: dict) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, *script, *command_line(overrides)], cwd=REPO, env=environment,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for environment in rank_environments(RANKS)]


# Two ranks sum a meta-batch's float32 gradients in another order than one process, and the CPU's kernels
# block a batch of 2 tasks otherwise than one of 4 (on an AVX2 CPU the gradients then differ by ~3e-7). Adam
# turns such noise on a near-zero gradient into up to ~1e-5 of weight after the 4 steps here; a missing or
# wrong reduction moves weights by about the meta learning rate (1e-3) a step, far outside these bounds.
GRADIENT_TOLERANCE = dict(rtol=1e-4, atol=1e-6)
WEIGHT_TOLERANCE = dict(rtol=0, atol=1e-4)


def named(name: str):
    """assert_close's message: the tensor's name, then what differs and by how much."""
    return lambda message: f"{name}: {message}"


def weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in state.items()}


@pytest.fixture(scope="module")
def experiments(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experiments")


@pytest.fixture(scope="module")
def one_process_run(toy_datasets, experiments):
    """The reference: one process with the whole meta-batch, RANKS * TASKS_PER_RANK tasks, on one thread
    like each rank: the CPU's channels-last kernels sum in an order that depends on the thread count."""
    config = load_config(overrides=tiny_overrides(toy_datasets, experiments, experiment_name="one_process",
                                                  batch_size=RANKS * TASKS_PER_RANK, **RUN))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        builder = ExperimentBuilder(config)
        summary = builder.run_experiment()
    finally:
        torch.set_num_threads(threads)
    return weights(builder.model.state_dict()), builder.state["epoch_rows"], summary


def test_meta_gradients_of_tasks_split_over_two_ranks_equal_one_process(toy_datasets, tmp_path):
    overrides = tiny_overrides(toy_datasets, tmp_path, learnable_per_layer_per_step_inner_loop_learning_rate=True,
                               use_multi_step_loss_optimization=True, contextual_grad=True)
    output = tmp_path / "gradients.pt"
    torchrun(RANKS, "tests/distributed_worker.py", "gradients",
             json.dumps(dict(overrides, batch_size=TASKS_PER_RANK)), str(output))
    split = torch.load(output)

    config = load_config(overrides=dict(overrides, batch_size=RANKS * TASKS_PER_RANK))
    builder = ExperimentBuilder(config)
    builder.model.run_train_iter(FewShotDataProvider(config, splits=("train",)).train_batch(0), epoch=0)
    whole = {name: p.grad for name, p in builder.model.named_parameters() if p.grad is not None}

    assert set(split) == set(whole) and len(whole) > 10
    for name, gradient in whole.items():
        assert gradient.abs().max() > 0, name
        torch.testing.assert_close(split[name], gradient, **GRADIENT_TOLERANCE, msg=named(name))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists a process's threads through Linux's /proc")
def test_the_process_group_and_its_threads_end_with_the_run(toy_datasets, tmp_path):
    """A process group that outlives the run (something still holds it after destroy_process_group) keeps
    gloo's threads running into the interpreter's exit, where one can abort the rank by SIGABRT
    ("terminate called without an active exception") after a run that worked: CI saw it now and then.
    Importing torch._dynamo once a group exists (the first optimizer does) was such a holder."""
    overrides = tiny_overrides(toy_datasets, tmp_path, experiment_name="threads", batch_size=TASKS_PER_RANK,
                               total_epochs=1, total_iter_per_epoch=1, num_evaluation_tasks=4,
                               evaluation_batch_size=2, contextual_grad=True)
    done = torchrun(RANKS, "tests/distributed_worker.py", "threads_after_run", *command_line(overrides))
    threads = {rank: json.loads(names) for rank, names in
               (line.split(" threads: ") for line in done.stdout.splitlines() if " threads: " in line)}
    assert sorted(threads) == [f"rank {rank}" for rank in range(RANKS)], done.stdout
    for rank, names in threads.items():
        assert not [name for name in names if "gloo" in name], \
            f"{rank} still runs the process group's threads after the run: {names}"


@pytest.fixture(scope="module")
def two_rank_run(toy_datasets, experiments):
    """The same training on RANKS ranks with TASKS_PER_RANK tasks each, through the command line."""
    overrides = tiny_overrides(toy_datasets, experiments, experiment_name="two_ranks", batch_size=TASKS_PER_RANK,
                               **RUN)
    done = torchrun(RANKS, "train_maml_system.py", *command_line(overrides))
    return overrides, done.stdout


def test_two_ranks_train_like_one_process_with_the_doubled_meta_batch(one_process_run, two_rank_run):
    reference_weights, reference_rows, reference_summary = one_process_run
    overrides, stdout = two_rank_run
    assert stdout.count("epoch 1:") == 1  # only rank 0 reports
    folder = load_config(overrides=overrides).experiment_folder
    paths = ExperimentPaths(folder)

    trained = read_checkpoint(paths.latest_checkpoint)
    assert trained["world_size"] == RANKS
    for name, tensor in reference_weights.items():
        torch.testing.assert_close(trained["network"][name], tensor, **WEIGHT_TOLERANCE, msg=named(name))

    rows = list(csv.DictReader(open(paths.summary_statistics)))
    for row, reference in zip(rows, reference_rows, strict=True):
        for key in ("train_loss_mean", "train_accuracy_mean", "val_loss_mean", "val_accuracy_mean"):
            assert float(row[key]) == pytest.approx(reference[key], rel=1e-5, abs=1e-6), key
    summary = json.loads(paths.test_summary().read_text())
    assert [m["epoch"] for m in summary["models"]] == [m["epoch"] for m in reference_summary["models"]]
    assert summary["num_test_tasks"] == reference_summary["num_test_tasks"]
    for key in ("ensemble_test_accuracy", "ensemble_test_confidence_95", "best_single_model_test_accuracy"):
        assert summary[key] == pytest.approx(reference_summary[key], abs=1e-6), key
    assert not list(folder.rglob("*.tmp"))


def test_a_two_rank_run_resumes_on_one_rank(one_process_run, two_rank_run, tmp_path, capsys):
    reference_weights, reference_rows, _ = one_process_run
    overrides, _ = two_rank_run
    # A copy of the two-rank experiment, resumed after its epoch 0 (its epoch-1 checkpoints are rewritten).
    folder = tmp_path / "resumed"
    shutil.copytree(load_config(overrides=overrides).experiment_folder, folder)
    # batch_size counts tasks per rank: one rank takes the whole meta-batch of the two.
    resumed = ExperimentBuilder(load_config(overrides=dict(
        overrides, experiments_dir=str(tmp_path), experiment_name="resumed", batch_size=RANKS * TASKS_PER_RANK,
        continue_from_epoch=0)))
    resumed._resume()
    assert resumed.state["next_epoch"] == 1 and len(resumed.state["epoch_rows"]) == 1
    assert "Note:" not in capsys.readouterr().out
    assert resumed.train() is True
    for name, tensor in reference_weights.items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, **WEIGHT_TOLERANCE, msg=named(name))
    assert resumed.state["epoch_rows"][1]["val_loss_mean"] == pytest.approx(reference_rows[1]["val_loss_mean"],
                                                                             rel=1e-5)


def test_a_rank_that_dies_ends_the_run_with_a_clear_message_and_a_valid_checkpoint(toy_datasets, tmp_path):
    """Two ranks started by hand (torchrun would stop the survivor at once): rank 1 dies in epoch 1."""
    overrides = tiny_overrides(toy_datasets, tmp_path, experiment_name="dies", batch_size=TASKS_PER_RANK,
                               distributed_timeout_s=60, **RUN)
    ranks = start_ranks(["tests/distributed_worker.py", "die_in_epoch", "1"], overrides)
    try:
        survivor_errors = [rank.communicate(timeout=240)[1] for rank in ranks][0]
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [1, 3]
    assert "error: rank 0 of 2: all-reduce of the meta-gradients failed" in survivor_errors
    assert "Another rank has probably died" in survivor_errors and "Traceback" not in survivor_errors

    latest = read_checkpoint(ExperimentPaths(tmp_path / "dies").latest_checkpoint)
    assert latest["experiment"]["next_epoch"] == 1
    assert not list((tmp_path / "dies").rglob("*.tmp"))


@pytest.mark.parametrize("rank", [0, 1], ids=["server_alone", "no_server"])
def test_a_rank_that_finds_no_peers_says_so_without_a_traceback(toy_datasets, tmp_path, rank):
    """Rank 0 waits for a rank 1 that never comes; rank 1 finds no rank 0 at MASTER_ADDR:MASTER_PORT."""
    overrides = tiny_overrides(toy_datasets, tmp_path, experiment_name="alone", distributed_timeout_s=2, **RUN)
    environment = rank_environments(2)[rank]  # the other rank is never started
    port = environment["MASTER_PORT"]
    done = subprocess.run([sys.executable, "train_maml_system.py", *command_line(overrides)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=environment)
    assert done.returncode == 1
    # (c10d may log a line of its own first.)
    assert f"\nerror: rank {rank} of 2 could not join the process group at 127.0.0.1:{port}" in "\n" + done.stderr
    assert "torchrun --nproc_per_node=N" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "alone").exists()  # nothing was written


def test_torchrun_with_one_process_is_the_plain_run(one_process_run, toy_datasets, experiments):
    reference_weights, reference_rows, reference_summary = one_process_run
    overrides = tiny_overrides(toy_datasets, experiments, experiment_name="torchrun_one",
                               batch_size=RANKS * TASKS_PER_RANK, **RUN)
    torchrun(1, "train_maml_system.py", *command_line(overrides))
    paths = ExperimentPaths(experiments / "torchrun_one")
    trained = read_checkpoint(paths.latest_checkpoint)
    for name, tensor in reference_weights.items():
        assert torch.equal(trained["network"][name], tensor), name
    assert trained["experiment"]["epoch_rows"][-1]["val_loss_mean"] == reference_rows[-1]["val_loss_mean"]
    summary = json.loads(paths.test_summary().read_text())
    assert summary["ensemble_test_accuracy"] == reference_summary["ensemble_test_accuracy"]


def test_a_resume_that_changes_the_meta_batch_says_how_to_keep_it(two_rank_run, capsys):
    overrides, _ = two_rank_run
    ExperimentBuilder(load_config(overrides=dict(overrides, batch_size=TASKS_PER_RANK)))._resume()
    note = capsys.readouterr().out
    assert "2 rank(s) x 2 tasks = 4 tasks per meta-batch; this run uses 1 rank(s) x 2 = 2" in note
    assert f"--batch_size {RANKS * TASKS_PER_RANK} continues it unchanged" in note


def test_a_signal_to_one_rank_stops_both_after_the_same_iteration_and_resumes_exactly(toy_datasets, tmp_path):
    """SIGTERM reaches rank 1 only: both ranks stop after the same iteration, rank 0 saves, and the
    resumed 2-rank run ends bit for bit where an uninterrupted 2-rank run ends."""
    run = dict(RUN, total_iter_per_epoch=20, distributed_timeout_s=60)
    uninterrupted = tiny_overrides(toy_datasets, tmp_path, experiment_name="uninterrupted",
                                   batch_size=TASKS_PER_RANK, **run)
    torchrun(RANKS, "train_maml_system.py", *command_line(uninterrupted))

    overrides = dict(uninterrupted, experiment_name="signalled")
    ranks = start_ranks(["train_maml_system.py"], overrides)
    try:
        for line in ranks[0].stdout:
            if line.startswith("Training from epoch 0"):
                ranks[1].send_signal(signal.SIGTERM)
                break
        errors = [rank.communicate(timeout=240)[1] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [INTERRUPTED_EXIT_CODE] * RANKS, errors
    assert "rank 0: stopped by a signal to another rank after" in errors[0]
    assert "rank 1: stopped by SIGTERM after" in errors[1]
    stopped = read_checkpoint(ExperimentPaths(tmp_path / "signalled").latest_checkpoint)["experiment"]
    done = stopped["next_epoch"] * run["total_iter_per_epoch"] + stopped["epoch_progress"]["iterations"]
    assert done < run["total_epochs"] * run["total_iter_per_epoch"]

    torchrun(RANKS, "train_maml_system.py", *command_line(overrides))
    expected = read_checkpoint(ExperimentPaths(tmp_path / "uninterrupted").latest_checkpoint)
    resumed = read_checkpoint(ExperimentPaths(tmp_path / "signalled").latest_checkpoint)
    for name, tensor in expected["network"].items():
        assert torch.equal(resumed["network"][name], tensor), name
    for row, reference in zip(resumed["experiment"]["epoch_rows"], expected["experiment"]["epoch_rows"],
                              strict=True):
        for key in ("train_loss_mean", "train_accuracy_mean", "val_loss_mean", "val_accuracy_mean"):
            assert row[key] == pytest.approx(reference[key], rel=1e-12), key


def test_two_ranks_on_a_folder_another_run_trains_in_both_stop_at_once(toy_datasets, tmp_path):
    """Rank 0 finds the folder locked; rank 1, which takes no lock, learns it from rank 0 instead of waiting
    in the next collective for a rank that has gone."""
    overrides = tiny_overrides(toy_datasets, tmp_path, experiment_name="busy", batch_size=TASKS_PER_RANK,
                               distributed_timeout_s=60, **RUN)
    with folder_held_by_another_process(tmp_path / "busy") as holder:
        ranks = start_ranks(["train_maml_system.py"], overrides)
        try:
            errors = [rank.communicate(timeout=120)[1] for rank in ranks]
        finally:
            for rank in ranks:
                rank.kill()
    for rank, error in enumerate(errors):  # whole, in the report of a failure: the assertion's message is cut
        print(f"--- rank {rank}, exit code {ranks[rank].returncode}, stderr ---\n{error}")
    assert [rank.returncode for rank in ranks] == [2, 2], errors
    assert f"error: rank 0: {tmp_path / 'busy'} is in use by another training run (pid {holder.pid} " in errors[0]
    assert "error: rank 1: rank 0 stopped the run: " in errors[1] and "Traceback" not in errors[1]
