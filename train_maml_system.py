"""Train MAML, MAML++ or CxGrad and end with the top-N ensemble test.

    python train_maml_system.py --name_of_args_json_file experiment_config/omniglot_5way_1shot/CxGrad_4conv_cpu.yaml
    python train_maml_system.py --name_of_args_json_file CONFIG --evaluate_on_test_set_only true [--test_dataset CUB]

Any config key can be overridden: --batch_size 2 --total_epochs 10 --device cpu.
Exit status: 0 done, 2 an error (printed as "error: ..."), 75 stopped by SIGINT/SIGTERM after saving a
resumable checkpoint (rerun with --continue_from_epoch latest).
"""
from __future__ import annotations

import sys

from data import DatasetError
from experiment_builder import ExperimentBuilder
from utils.config import ConfigError, parse_command_line
from utils.interrupt import INTERRUPTED_EXIT_CODE, TrainingInterrupted
from utils.nonfinite import TrainingDiverged
from utils.storage import CheckpointError, StorageError


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_command_line(argv)
        ExperimentBuilder(config).run_experiment()
    except (ConfigError, DatasetError, CheckpointError, StorageError, TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(stop, file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
