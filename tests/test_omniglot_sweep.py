"""benchmarks/omniglot_sweep.sh: every candidate is a valid change of the CPU config it sweeps (at its baseline).

The sweep's runs take minutes each, so they are not run here; but a misspelt key or a bad value in a
candidate would only show once its turn came, after the candidates before it had trained.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from utils.config import parse_command_line

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "omniglot_sweep.sh"


def candidates() -> dict[str, list[str]]:
    text = SCRIPT.read_text()
    table = text[text.index("declare -A CANDIDATES=("):text.index("\n)\n")]
    return {name: options.split() for name, options in re.findall(r'\[([\w.]+)\]="([^"]*)"', table)}


def test_every_candidate_is_a_valid_change_of_the_cpu_config():
    found = candidates()
    assert {"cx_baseline", "maml_twin", "cx_inner_lr_0.05", "cx_64_filters", "cx_second_order"} <= set(found)
    config_file = re.search(r"^config=(\S+)$", SCRIPT.read_text(), re.MULTILINE).group(1)
    swept = re.search(r"^baseline=\(([^)]*)\)$", SCRIPT.read_text(), re.MULTILINE).group(1).split()
    command = ["--name_of_args_json_file", str(REPO / config_file), *swept]
    baseline = parse_command_line(command).to_dict()
    for name, options in found.items():
        changed = parse_command_line([*command, *options]).to_dict()
        differing = {key for key in baseline if baseline[key] != changed[key]}
        assert bool(differing) == (name != "cx_baseline"), (name, differing)
    # Run without names, the script sweeps every candidate.
    default = re.search(r"\|\| names=\(([^)]*)\)", SCRIPT.read_text()).group(1).split()
    assert sorted(default) == sorted(found)


def test_an_unknown_candidate_is_refused_before_anything_trains(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "cx_baseline", "cx_inner_lr_0.5"], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "sweep")})
    assert result.returncode == 2 and "unknown candidate 'cx_inner_lr_0.5'" in result.stderr
    assert not (tmp_path / "sweep").exists()
