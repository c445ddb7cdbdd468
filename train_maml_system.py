"""Train MAML, MAML++ or CxGrad and end with the top-N ensemble test.

    python train_maml_system.py --name_of_args_json_file experiment_config/omniglot_5way_1shot/CxGrad_4conv_cpu.yaml
    python train_maml_system.py --name_of_args_json_file CONFIG --evaluate_on_test_set_only true [--test_dataset CUB]

Any config key can be overridden: --batch_size 2 --total_epochs 10 --device cpu.
"""
from __future__ import annotations

import sys

from data import DatasetError
from experiment_builder import ExperimentBuilder
from utils.config import ConfigError, parse_command_line
from utils.storage import CheckpointError


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_command_line(argv)
        ExperimentBuilder(config).run_experiment()
    except (ConfigError, DatasetError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
