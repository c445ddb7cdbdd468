"""Train MAML, MAML++ or CxGrad and end with the top-N ensemble test.

    python train_maml_system.py --name_of_args_json_file experiment_config/omniglot_5way_1shot/CxGrad_4conv_cpu.yaml
    python train_maml_system.py --name_of_args_json_file CONFIG --evaluate_on_test_set_only true [--test_dataset CUB]
    torchrun --nproc_per_node=N train_maml_system.py --name_of_args_json_file CONFIG   (N GPUs, batch_size per GPU)

Any config key can be overridden: --batch_size 2 --total_epochs 10 --device cpu.
Exit status: 0 done, 2 an error (printed as "error: ...", also when another run trains in the same experiment
folder), 1 a rank of a torchrun run died, hung or never joined,
75 stopped by SIGINT/SIGTERM after saving a resumable checkpoint (rerun with --continue_from_epoch latest).
"""
from __future__ import annotations

import os
import sys

from experiment_builder import ExperimentBuilder
from utils import distributed
from utils.backend import configure_backend, resolve_device
from utils.checkpoints import CheckpointError
from utils.config import ConfigError, parse_command_line
from utils.dataset_format import DatasetError
from utils.experiment_paths import ExperimentPaths
from utils.interrupt import INTERRUPTED_EXIT_CODE, TrainingInterrupted
from utils.nonfinite import TrainingDiverged
from utils.storage import StorageError
from utils.trainer_lock import ExperimentBusyError


def main(argv: list[str] | None = None) -> int:
    prefix = f"rank {os.environ['RANK']}: " if distributed.launched_by_torchrun() else ""
    try:
        config = parse_command_line(argv)
        device = resolve_device(config.device)
        configure_backend(config, device)  # process-wide torch settings, once, before anything is built
        with distributed.session(device, config.distributed_timeout_s) as context:
            ExperimentBuilder(config, context).run_experiment()
    except (ConfigError, DatasetError, CheckpointError, StorageError, TrainingDiverged, ExperimentBusyError) as error:
        print(f"error: {prefix}{error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"{prefix}{stop}", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    except distributed.DistributedStartError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except distributed.DistributedError as error:
        latest = ExperimentPaths(config.experiment_folder).latest_checkpoint
        print(f"error: {error}.\nAnother rank has probably died or hangs: see its messages. Checkpoints are "
              f"written atomically, so the last one ({latest}) is intact: rerun the command with "
              f"--continue_from_epoch latest (the default) to resume, on any number of ranks.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
