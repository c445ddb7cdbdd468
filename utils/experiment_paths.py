"""The experiment folder: every file name in it, spelled once, for the code that writes and the code that reads.

    EXPERIMENT/config.yaml                          the resolved config
    EXPERIMENT/saved_models/train_model_{epoch}     the best `max_models_to_save` epochs by val accuracy
    EXPERIMENT/saved_models/train_model_latest      everything needed to resume exactly (mid-epoch after a signal)
    EXPERIMENT/logs/summary_statistics.csv          one row per epoch
    EXPERIMENT/logs/inner_loop_statistics.csv       per epoch and inner step (log_inner_loop_statistics)
    EXPERIMENT/logs/tensorboard/                    TensorBoard events (use_tensorboard)
    EXPERIMENT/test_summary.{json,csv}              the ensemble test on the training dataset
    EXPERIMENT/test_summary_{DATASET}.{json,csv}    the ensemble test on another dataset (test_dataset, cross-domain)
    EXPERIMENT/plots/                               the figures of utils/plot_experiment.py (its default --out)
    EXPERIMENT/.trainer.lock                        held by the process using the folder (utils/trainer_lock.py)

Training writes these files (experiment_builder.py, utils/checkpoints.py); the analysis scripts
(utils/summarize_results.py, utils/plot_experiment.py, benchmarks/time_to_accuracy.py) read them, so
renaming one here renames it for both.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

CHECKPOINT_PREFIX = "train_model_"
TEST_SUMMARY_STEM = "test_summary"


@dataclass(frozen=True)
class ExperimentPaths:
    folder: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))

    @property
    def config(self) -> Path:
        return self.folder / "config.yaml"

    # ------------------------------------------------------------------ checkpoints
    @property
    def saved_models(self) -> Path:
        return self.folder / "saved_models"

    def checkpoint(self, tag: Union[int, str]) -> Path:
        """`train_model_{epoch}` for an epoch number, `train_model_latest` for "latest"."""
        return self.saved_models / f"{CHECKPOINT_PREFIX}{tag}"

    @property
    def latest_checkpoint(self) -> Path:
        return self.checkpoint("latest")

    def saved_epochs(self) -> list[int]:
        """Epoch numbers of the `train_model_{epoch}` files, ascending."""
        if not self.saved_models.is_dir():
            return []
        pattern = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
        return sorted(int(m.group(1)) for p in self.saved_models.iterdir() if (m := pattern.match(p.name)))

    # ------------------------------------------------------------------ logs
    @property
    def logs(self) -> Path:
        return self.folder / "logs"

    @property
    def summary_statistics(self) -> Path:
        return self.logs / "summary_statistics.csv"

    @property
    def inner_loop_statistics(self) -> Path:
        return self.logs / "inner_loop_statistics.csv"

    @property
    def tensorboard(self) -> Path:
        return self.logs / "tensorboard"

    # ------------------------------------------------------------------ the ensemble test
    @staticmethod
    def test_summary_name(dataset: Optional[str] = None, suffix: str = ".json") -> str:
        """`test_summary.json` in-domain; `test_summary_{dataset}.json` for a cross-domain test set."""
        return f"{TEST_SUMMARY_STEM}{f'_{dataset}' if dataset else ''}{suffix}"

    def test_summary(self, dataset: Optional[str] = None, suffix: str = ".json") -> Path:
        return self.folder / self.test_summary_name(dataset, suffix)

    def cross_domain_summaries(self) -> list[Path]:
        """The `test_summary_{DATASET}.json` files, sorted by name."""
        return sorted(self.folder.glob(f"{TEST_SUMMARY_STEM}_*.json"))

    # ------------------------------------------------------------------ the rest
    @property
    def plots(self) -> Path:
        return self.folder / "plots"

    @property
    def trainer_lock(self) -> Path:
        return self.folder / ".trainer.lock"
