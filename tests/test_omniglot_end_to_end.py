"""End to end on the real Omniglot zips: preprocess, a short CxGrad training, the ensemble test.

The zips are found through the environment variable OMNIGLOT_ZIPS (a folder); `.ci/run` and the
Makefile point it at ../shared/data/omniglot. Unset, the test is skipped; set to a folder without
the zips, it fails.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from utils.experiment_paths import ExperimentPaths

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]




def test_preprocess_train_and_ensemble_test_on_real_omniglot(omniglot_zips, scratch_dir):
    tmp_path = scratch_dir
    datasets = tmp_path / "datasets"
    subprocess.run([sys.executable, "preprocess/preprocess.py", "--datasets", "omniglot", "--source",
                    str(omniglot_zips), "--dest", str(datasets)], cwd=REPO, check=True, timeout=600)
    # The CPU-budget CxGrad config, shortened to 2 epochs of 60 meta-iterations.
    command = [sys.executable, "train_maml_system.py", "--name_of_args_json_file",
               "experiment_config/omniglot_5way_1shot/CxGrad_4conv_cpu.yaml",
               "--datasets_dir", str(datasets), "--experiments_dir", str(tmp_path / "experiments"),
               "--total_epochs", "2", "--total_iter_per_epoch", "60", "--num_evaluation_tasks", "100",
               "--max_models_to_save", "2", "--show_progress", "false", "--device", "cpu"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = ExperimentPaths(tmp_path / "experiments" / "omniglot_5way_1shot_CxGrad_4conv_cpu")
    summary = json.loads(folder.test_summary().read_text())
    assert summary["dataset"] == "omniglot" and summary["num_test_tasks"] == 100
    # Chance is 20%; 120 meta-iterations of CxGrad are far above it on the 423 held-out characters.
    assert summary["ensemble_test_accuracy"] > 0.7, summary  # 86.6% when written
    assert 0 < summary["ensemble_test_confidence_95"] < 0.1
