"""benchmarks/h200_targets.sh: every candidate is a valid config, and the script is valid bash.

The script is meant for one device call of at most 10 minutes, a lease that may come once; a misspelt key
or a bad value would only show there, after the GPU time is spent. Its runs are not run here (a dry run on
the CPU, as its header shows, takes minutes).
"""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from utils.config import parse_command_line

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "h200_targets.sh"


def candidates() -> dict[str, list[str]]:
    """name -> the training command line of each `candidate NAME CONFIG [--key value ...] &` in the script."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    variables = dict(re.findall(r"^(\w+)=(experiment_config/\S+)$", text, re.MULTILINE))
    found = {}
    for line in re.findall(r"^candidate (.+?)\s*&\s*$", text, re.MULTILINE):
        name, config, *options = shlex.split(line)
        config = variables.get(config.lstrip("$").strip('"{}'), config)
        found[name] = ["--name_of_args_json_file", str(REPO / config), *options]
    return found


def test_every_candidate_is_a_valid_config_of_omniglot_5_or_20_way_1_shot():
    found = candidates()
    assert len(found) >= 2, found
    ways = set()
    for name, command in found.items():
        config = parse_command_line([*command, "--experiment_name", name])
        assert config.dataset_name == "omniglot" and config.num_samples_per_class == 1, name
        ways.add(config.num_classes_per_set)
    assert ways == {5, 20}  # both targets have a candidate


def test_the_script_is_valid_bash_and_wants_its_output_folder():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode != 0 and "usage" in result.stderr
