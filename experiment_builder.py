"""The experiment: training epochs, validation, resume and the top-N ensemble test.

The experiment folder's files are named in utils/experiment_paths.py (MAML++'s layout); the checkpoints,
what they hold and how they are checked, in utils/checkpoints.py. Under torchrun the ranks split the
tasks and only rank 0 writes files (utils/distributed.py).
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from data import FewShotDataProvider
from few_shot_learning_system import MAMLFewShotClassifier
from utils.backend import resolve_device
from utils.checkpoints import Checkpoint, CheckpointError, CheckpointStore, best_epochs, read_checkpoint
from utils.config import ExperimentConfig, save_config
from utils.distributed import DistributedContext
from utils.experiment_paths import ExperimentPaths
from utils.inner_loop_statistics import InnerLoopStatisticsLog
from utils.interrupt import StopRequest, TrainingInterrupted
from utils.nonfinite import count_skipped
from utils.preflight import check_datasets
from utils.storage import StorageError, probe_writable, write_csv, write_json
from utils.tensorboard_log import TensorBoardLog
from utils.trainer_lock import ExperimentBusyError, lock_experiment_folder


def fresh_epoch_progress() -> dict[str, Any]:
    """The part of an epoch done so far: what a mid-epoch (interrupted) checkpoint must carry."""
    return {"iterations": 0, "losses": [], "accuracies": [], "skipped": 0, "seconds": 0.0}


def progress_line(epoch: int, progress: dict[str, Any], iterations_per_epoch: int, seconds: float,
                  last_report: tuple[int, int] = (0, 0)) -> str:
    """One line on the epoch so far (`progress` as fresh_epoch_progress makes it; `seconds` since the epoch
    started, time before an interruption included), for logs that have no progress bar.

    `last_report` is (meta-iterations, finite losses) at the previous line, or where this process took the
    epoch up: the line also gives the mean since then, so that a log shows the learning curve within an
    epoch, not only the running mean over it (which lags it).
    """
    done = progress["iterations"]
    each = seconds / max(done, 1)
    line = (f"epoch {epoch}: {done}/{iterations_per_epoch} meta-iterations, {each:.2f} s each, the epoch's "
            f"training ends in about {(iterations_per_epoch - done) * each / 60:.0f} min; ")
    losses, accuracies = progress["losses"], progress["accuracies"]
    if not losses:
        return line + "no finite loss yet"
    line += f"train loss {np.mean(losses):.4f} accuracy {np.mean(accuracies):.4f} so far"
    since_iteration, since_finite = last_report
    if since_iteration > 0 and len(losses) > since_finite:  # from iteration 0 it is the running mean itself
        line += (f"; since iteration {since_iteration}: loss {np.mean(losses[since_finite:]):.4f} "
                 f"accuracy {np.mean(accuracies[since_finite:]):.4f}")
    if progress["skipped"]:
        line += f" ({progress['skipped']} non-finite skipped)"
    return line


def fresh_state() -> dict[str, Any]:
    """What, besides the tensors, must survive a restart, as a new experiment starts it.

    "normalisation" is [mean, std] of the training split once training has started, and only when
    input_normalisation is dataset_statistics (None otherwise): the test applies the model's own.
    """
    return {"next_epoch": 0, "epoch_rows": [], "normalisation": None, "epoch_progress": fresh_epoch_progress(),
            "nonfinite_in_a_row": 0}


def mean_and_confidence(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval, 1.96 * std / sqrt(n)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(1.96 * values.std() / math.sqrt(len(values)))


class ExperimentBuilder:
    def __init__(self, config: ExperimentConfig, distributed: Optional[DistributedContext] = None):
        self.config = config
        self.distributed = distributed or DistributedContext(device=resolve_device(config.device))
        self.device = self.distributed.device
        self.folder = config.experiment_folder
        self.paths = ExperimentPaths(self.folder)
        self.checkpoints = CheckpointStore(self.paths, config)
        torch.manual_seed(config.seed)
        self.model = MAMLFewShotClassifier(config, self.device, gradient_reducer=self.distributed.average_gradients)
        self.distributed.broadcast_parameters(self.model)
        self.state: dict[str, Any] = fresh_state()
        self.stop = StopRequest()  # installed around training by run_experiment

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> Checkpoint:
        return self.checkpoints.capture(self.model, self.state, self.distributed.world_size)

    def _restore(self, checkpoint: Checkpoint, path: Path, restore_training: bool) -> None:
        self.checkpoints.restore(checkpoint, path, self.model, restore_training)
        if restore_training:
            # Checkpoints from before a state key existed resume with its fresh value, inside the epoch's
            # progress too (a mid-epoch checkpoint carries the progress as that version made it).
            saved = checkpoint["experiment"]
            self.state = {**fresh_state(), **saved,
                          "epoch_progress": {**fresh_epoch_progress(), **saved.get("epoch_progress", {})}}

    def _resume(self) -> None:
        choice = self.config.continue_from_epoch
        if choice == "from_scratch":
            if self.checkpoints.resume_candidates():
                raise CheckpointError(
                    f"{self.checkpoints.folder} already holds checkpoints and from_scratch would overwrite them; "
                    f"resume with --continue_from_epoch latest, or start a new --experiment_name")
            return
        if choice == "latest":
            checkpoint, path = self.checkpoints.newest_valid()
            if checkpoint is None:
                return  # nothing to resume: a new experiment
        else:
            path = self.checkpoints.path(int(choice))
            checkpoint = self.checkpoints.read_epoch(int(choice))
        self._restore(checkpoint, path, restore_training=True)
        if self.distributed.is_main:
            done = self.state["epoch_progress"]["iterations"]
            print(f"Resumed {self.folder} from {path.name}: next epoch {self.state['next_epoch']}"
                  + (f", iteration {done} of {self.config.total_iter_per_epoch}" if done else ""))
            self._note_meta_batch_change(checkpoint)

    def _note_meta_batch_change(self, checkpoint: Checkpoint) -> None:
        """batch_size counts tasks per rank: resuming on another number of ranks may change the meta-batch."""
        saved_ranks = checkpoint.get("world_size", 1)
        saved = checkpoint["config"]["batch_size"] * saved_ranks
        ranks = self.distributed.world_size
        if saved != self.config.batch_size * ranks:
            advice = (f"; --batch_size {saved // ranks} continues it unchanged" if saved % ranks == 0 else "")
            print(f"Note: the checkpoint was trained with {saved_ranks} rank(s) x {saved // saved_ranks} tasks = "
                  f"{saved} tasks per meta-batch; this run uses {ranks} rank(s) x {self.config.batch_size} = "
                  f"{self.config.batch_size * ranks}{advice}")

    def _save_epoch(self, epoch: int) -> None:
        if self.distributed.is_main:  # the others wait at the barrier that ends the epoch
            self.checkpoints.save_epoch(self._checkpoint(), epoch, keep=self.best_epochs())

    def best_epochs(self) -> list[int]:
        """The `max_models_to_save` epochs with the best validation accuracy (later epochs win ties)."""
        return best_epochs(self.state["epoch_rows"], self.config.max_models_to_save)

    # ------------------------------------------------------------------ training
    def evaluate(self, provider: FewShotDataProvider, split: str) -> dict[str, np.ndarray]:
        batch_size = self.config.evaluation_batch_size or self.config.batch_size
        # Each rank computes whole batches of a single process's run, so the gathered results equal its.
        tasks = self.distributed.evaluation_shard(self.config.num_evaluation_tasks, batch_size)
        parts = [self.model.run_validation_iter(batch) for batch in
                 provider.evaluation_batches(split, tasks.stop, batch_size, first_task=tasks.start)]
        local = {key: torch.cat([part[key] for part in parts]) for key in parts[0]} if parts else None
        shards = [shard for shard in self.distributed.gather(local) if shard is not None]
        return {key: torch.cat([shard[key] for shard in shards]).numpy() for key in shards[0]}

    def train(self) -> bool:
        """Train up to `total_epochs`; False when `total_epochs_before_pause` stopped it earlier."""
        first_epoch = self.state["next_epoch"]
        tensorboard = (TensorBoardLog(self.paths.tensorboard, first_epoch)
                       if self.config.use_tensorboard and self.distributed.is_main else None)
        try:
            return self._train_epochs(tensorboard)
        finally:
            if tensorboard is not None:
                tensorboard.close()

    def _train_epochs(self, tensorboard: Optional[TensorBoardLog]) -> bool:
        config = self.config
        # Statistics of an epoch interrupted by a signal cover the iterations run after the resume.
        # Under torchrun they are rank 0's share of the tasks.
        inner_loop_log = (InnerLoopStatisticsLog(self.paths.inner_loop_statistics, self.state["next_epoch"])
                          if config.log_inner_loop_statistics and self.distributed.is_main else None)
        # A resumed run keeps the statistics it started with, even if the dataset was rebuilt since.
        recorded = self._recorded_input_statistics if self.state["normalisation"] is not None else None
        with self.distributed.main_first():  # one process decodes the dataset into its cache
            provider = FewShotDataProvider(config, input_statistics=recorded, splits=("train", "val"),
                                           first_train_task=self.distributed.rank * config.batch_size)
        statistics = provider.scaling.statistics  # recorded only when used
        self.state["normalisation"] = None if statistics is None else [values.tolist() for values in statistics]
        # The worker threads end with training, also on an error or a signal, instead of preparing batches
        # nobody will read until the interpreter exits.
        with closing(provider):
            return self._run_epochs(provider, inner_loop_log, tensorboard)

    def _recorded_input_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """The training split's (mean, std) the checkpoint recorded; asked for only by dataset_statistics."""
        if self.state["normalisation"] is None:
            raise CheckpointError(
                f"input_normalisation is dataset_statistics, but the checkpoints in {self.checkpoints.folder} "
                f"record no input statistics (they were trained with input_normalisation none); test with "
                f"--input_normalisation none, the config they were trained with ({self.paths.config})")
        mean, std = (np.asarray(values, dtype=np.float32) for values in self.state["normalisation"])
        return mean, std

    def _run_epochs(self, provider: FewShotDataProvider, inner_loop_log: Optional[InnerLoopStatisticsLog],
                           tensorboard: Optional[TensorBoardLog]) -> bool:
        config = self.config
        epochs_run = 0
        while self.state["next_epoch"] < config.total_epochs:
            if epochs_run == config.total_epochs_before_pause:
                if self.distributed.is_main:
                    print(f"Paused after {epochs_run} epochs (total_epochs_before_pause); resume with "
                          f"--continue_from_epoch latest")
                return False
            epoch = self.state["next_epoch"]
            if epochs_run == 0 and self.distributed.is_main:
                print(f"Training from epoch {epoch}, iteration {self.state['epoch_progress']['iterations']}; "
                      f"Ctrl-C or SIGTERM saves a resumable checkpoint after the current iteration", flush=True)
            started = self._train_iterations(provider, epoch, inner_loop_log)
            self._end_epoch(provider, epoch, started, inner_loop_log, tensorboard)
            epochs_run += 1
            if self._stop_requested():  # the signal came during validation: the epoch is saved, stop now
                raise TrainingInterrupted(
                    f"stopped by {self.stop.signal_name} after epoch {epoch}; its checkpoint is saved in "
                    f"{self.checkpoints.folder}. Resume: rerun the same command with --continue_from_epoch latest")
        return True

    def _train_iterations(self, provider: FewShotDataProvider, epoch: int,
                          inner_loop_log: Optional[InnerLoopStatisticsLog]) -> float:
        """The epoch's remaining meta-iterations (all of them, unless a signal stopped it mid-way before).

        Returns the time the epoch started, counting the time it ran before an interruption.
        """
        config = self.config
        progress = self.state["epoch_progress"]
        started = time.time() - progress["seconds"]
        first_iteration = epoch * config.total_iter_per_epoch + progress["iterations"]
        show_progress = config.show_progress and self.distributed.is_main
        # Without the bar, a long epoch in a log file says now and then that it is alive and how fast it goes.
        report_every = config.progress_interval_s if self.distributed.is_main and not config.show_progress else 0.0
        next_report = time.monotonic() + report_every if report_every > 0 else math.inf
        last_report = (progress["iterations"], len(progress["losses"]))
        with tqdm(total=config.total_iter_per_epoch, initial=progress["iterations"],
                  disable=not show_progress, desc=f"epoch {epoch}", leave=False) as bar:
            for iteration, batch in enumerate(provider.train_batches(
                    first_iteration, config.total_iter_per_epoch - progress["iterations"]), first_iteration):
                metrics = self.model.run_train_iter(batch, epoch)
                self._count_nonfinite(metrics["skipped"], iteration, epoch)
                if not metrics["skipped"]:
                    progress["losses"].append(metrics["loss"])
                    progress["accuracies"].append(metrics["accuracy"])
                    if inner_loop_log is not None:
                        inner_loop_log.add(metrics["inner_loop_statistics"])
                progress["iterations"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", accuracy=f"{metrics['accuracy']:.4f}")
                if time.monotonic() >= next_report:
                    print(progress_line(epoch, progress, config.total_iter_per_epoch, time.time() - started,
                                        last_report), flush=True)
                    last_report = (progress["iterations"], len(progress["losses"]))
                    next_report = time.monotonic() + report_every
                if self._stop_requested():
                    progress["seconds"] = time.time() - started
                    self._stop_mid_epoch(iteration, epoch)
        return started

    def _end_epoch(self, provider: FewShotDataProvider, epoch: int, started: float,
                   inner_loop_log: Optional[InnerLoopStatisticsLog], tensorboard: Optional[TensorBoardLog]) -> None:
        """Validate, step the schedule, record the epoch's row, save its checkpoints and logs."""
        losses, accuracies = self._progress_over_ranks()
        validation = self.evaluate(provider, "val")
        learning_rate = self.model.optimizer.param_groups[0]["lr"]
        self.model.scheduler.step()
        row = {"epoch": epoch,
               "train_loss_mean": float(np.mean(losses)), "train_loss_std": float(np.std(losses)),
               "train_accuracy_mean": float(np.mean(accuracies)),
               "train_accuracy_std": float(np.std(accuracies)),
               "val_loss_mean": float(validation["loss"].mean()), "val_loss_std": float(validation["loss"].std()),
               "val_accuracy_mean": float(validation["accuracy"].mean()),
               "val_accuracy_std": float(validation["accuracy"].std()),
               "meta_learning_rate": learning_rate, "epoch_time_s": time.time() - started,
               "nonfinite_iterations_skipped": self.state["epoch_progress"]["skipped"]}
        self.state["epoch_rows"].append(row)
        self.state["next_epoch"] = epoch + 1
        self.state["epoch_progress"] = fresh_epoch_progress()
        self._save_epoch(epoch)
        if self.distributed.is_main:
            write_csv(self.paths.summary_statistics, self.state["epoch_rows"])
            print(f"epoch {epoch}: train loss {row['train_loss_mean']:.4f} "
                  f"acc {row['train_accuracy_mean']:.4f} | val loss {row['val_loss_mean']:.4f} "
                  f"acc {row['val_accuracy_mean']:.4f} | "
                  f"{row['epoch_time_s']:.1f}s", flush=True)
        inner_loop_rows = []
        if inner_loop_log is not None:
            inner_loop_rows = inner_loop_log.end_epoch(epoch, self.model.query_step_weights(epoch))
        if tensorboard is not None:
            tensorboard.log_epoch(row, inner_loop_rows)
        self.distributed.barrier()  # the epoch's files are on disk for every rank

    def _count_nonfinite(self, skipped: bool, iteration: int, epoch: int) -> None:
        """Count an update skipped for a non-finite loss or gradient; stop the run after too many in a row."""
        in_a_row = count_skipped(self.state["nonfinite_in_a_row"], skipped, iteration,
                                 self.config.max_consecutive_nonfinite_iterations,
                                 self.checkpoints.latest)
        self.state["nonfinite_in_a_row"] = in_a_row
        if skipped:
            self.state["epoch_progress"]["skipped"] += 1
            tqdm.write(f"warning: meta-iteration {iteration} (epoch {epoch}): loss or gradient not finite, update "
                       f"skipped ({in_a_row} in a row of {self.config.max_consecutive_nonfinite_iterations} allowed)",
                       file=sys.stderr)

    def _stop_requested(self) -> bool:
        """Every rank stops after the same iteration, whichever of them received the signal."""
        if self.distributed.any_rank(self.stop.requested) and not self.stop.requested:
            self.stop.signal_name = "a signal to another rank"
        return self.stop.requested

    def _progress_over_ranks(self) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's per-iteration losses and accuracies, each the mean over the ranks, which is the
        mean over the whole meta-batch (values already averaged, after a resume, stay as they are)."""
        progress = self.state["epoch_progress"]
        losses, accuracies = self.distributed.average_over_ranks(
            np.array([progress["losses"], progress["accuracies"]]))
        return losses, accuracies

    def _stop_mid_epoch(self, iteration: int, epoch: int) -> None:
        """Save where this epoch stands (only `train_model_latest`: epoch checkpoints stay whole epochs)."""
        path = self.checkpoints.latest
        progress = self.state["epoch_progress"]
        # The checkpoint carries the mean over the ranks of each iteration's metrics, as an epoch's row does.
        progress["losses"], progress["accuracies"] = (values.tolist() for values in self._progress_over_ranks())
        if self.distributed.is_main:
            self.checkpoints.save_latest(self._checkpoint())
        self.distributed.barrier()
        done = progress["iterations"]
        raise TrainingInterrupted(
            f"stopped by {self.stop.signal_name} after meta-iteration {iteration} (epoch {epoch}, {done} of "
            f"{self.config.total_iter_per_epoch} iterations); saved {path}. Resume: rerun the same command with "
            f"--continue_from_epoch latest")

    # ------------------------------------------------------------------ the ensemble test
    def run_ensemble_test(self) -> dict[str, Any]:
        """Average the softmax outputs of the best epochs on the fixed test tasks; write the summary.

        `test_time_s` in the summary is this method's wall time (reading the checkpoints and the test split,
        then every model on every test task), which the training's `epoch_time_s` leave out."""
        started = time.monotonic()
        config = self.config
        checkpoint, path = self.checkpoints.newest_valid()
        if checkpoint is None:
            raise CheckpointError(f"no trained model in {self.checkpoints.folder}: train first (same config, "
                                  f"without --evaluate_on_test_set_only)")
        self._restore(checkpoint, path, restore_training=True)
        epochs = [e for e in self.best_epochs() if self.checkpoints.path(e).exists()]
        if not epochs:
            raise CheckpointError(f"no epoch checkpoints left in {self.checkpoints.folder}")
        test_name = config.test_dataset or config.dataset_name
        folder = (config.dataset_folder.parent / test_name) if config.test_dataset else None
        with self.distributed.main_first():  # the trained model's input scaling, also on another dataset
            provider = FewShotDataProvider(config, dataset_folder=folder, dataset_name=test_name,
                                           input_statistics=self._recorded_input_statistics, splits=("test",))
        val_accuracy = {row["epoch"]: row["val_accuracy_mean"] for row in self.state["epoch_rows"]}
        per_model, summed = [], None
        for epoch in epochs:
            epoch_path = self.checkpoints.path(epoch)
            self._restore(read_checkpoint(epoch_path), epoch_path, restore_training=False)
            outputs = self.evaluate(provider, "test")
            summed = outputs["probabilities"] if summed is None else summed + outputs["probabilities"]
            accuracy, interval = mean_and_confidence(outputs["accuracy"])
            per_model.append({"epoch": epoch, "val_accuracy": val_accuracy[epoch],
                              "test_accuracy": accuracy, "test_confidence_95": interval})
        ensemble_accuracy = (summed.argmax(-1) == outputs["labels"]).mean(axis=1)  # the same tasks for every model
        accuracy, interval = mean_and_confidence(ensemble_accuracy)
        best_single = per_model[0]  # epochs are ordered by validation accuracy
        summary = {"dataset": test_name, "trained_on": config.dataset_name,
                   "num_test_tasks": int(len(ensemble_accuracy)),
                   "ways": config.num_classes_per_set, "shots": config.num_samples_per_class,
                   "ensemble_test_accuracy": accuracy, "ensemble_test_confidence_95": interval,
                   "best_single_model_epoch": best_single["epoch"],
                   "best_single_model_test_accuracy": best_single["test_accuracy"],
                   "best_single_model_test_confidence_95": best_single["test_confidence_95"],
                   "models": per_model, "test_time_s": time.monotonic() - started}
        if not self.distributed.is_main:
            return summary
        cross_domain = test_name if config.test_dataset else None
        write_json(self.paths.test_summary(cross_domain, ".json"), summary)
        write_csv(self.paths.test_summary(cross_domain, ".csv"),
                  [{key: value for key, value in summary.items() if key != "models"}])
        print(f"Ensemble of {len(per_model)} models (epochs {epochs}) on {test_name} test, "
              f"{len(ensemble_accuracy)} tasks: accuracy {100 * accuracy:.2f}% +- {100 * interval:.2f}% "
              f"(best single model: {100 * best_single['test_accuracy']:.2f}% "
              f"+- {100 * best_single['test_confidence_95']:.2f}%) in {summary['test_time_s']:.0f} s", flush=True)
        return summary

    def run_experiment(self) -> Optional[dict[str, Any]]:
        """Train (resuming as configured) and end with the ensemble test; or only test."""
        check_datasets(self.config)  # contradictions with the datasets fail now, not after an epoch
        with self._hold_folder():
            if self.config.evaluate_on_test_set_only:
                return self.run_ensemble_test()
            return self._train_and_test()

    @contextmanager
    def _hold_folder(self) -> Iterator[None]:
        """The run's claim on its folder: no other process trains in it meanwhile (utils/trainer_lock.py), and
        it has room for the checkpoints (the best epochs, latest, one being written).

        Rank 0, the only rank that writes, checks both; every rank learns the outcome, so all stop together.
        """
        training = not self.config.evaluate_on_test_set_only
        with ExitStack() as held:
            problem = None
            if self.distributed.is_main:
                try:
                    held.enter_context(lock_experiment_folder(self.paths, training))
                    if training:
                        probe_writable(self.folder, self.checkpoints.bytes_needed(self.model))
                except Exception as error:  # any error: the other ranks must hear of it, not wait to time out
                    problem = error
            busy, message = self.distributed.gather(
                None if problem is None else (isinstance(problem, ExperimentBusyError), str(problem)),
                what="rank 0's check of the experiment folder")[0] or (None, None)
            if problem is not None:
                raise problem
            if message is not None:
                error_type = ExperimentBusyError if busy else StorageError
                raise error_type(f"rank 0 stopped the run: {message}")
            yield

    def _train_and_test(self) -> Optional[dict[str, Any]]:
        self._resume()
        if self.distributed.is_main:
            save_config(self.config, self.paths.config)
        self.distributed.barrier()  # every rank has read the checkpoints before any is rewritten
        with self.stop:  # SIGINT/SIGTERM: finish the iteration, save, raise TrainingInterrupted
            finished = self.train()
        if finished:
            return self.run_ensemble_test()
        return None
