"""Property: whatever a config file or the command line holds, loading it either gives a config or
raises ConfigError (which the command line prints as one line), never another exception."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils.config import (FIELDS, IGNORED_REFERENCE_KEYS, KEY_ALIASES, ConfigError, ExperimentConfig,
                          apply_overrides, build_config, load_config)

KNOWN_KEYS = sorted(FIELDS) + sorted(KEY_ALIASES) + sorted(IGNORED_REFERENCE_KEYS)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=12), st.integers(), st.booleans())
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
                    st.sampled_from(["latest", "from_scratch", "1e400", "nan", "-inf", "3", "0.5", "true", "null",
                                     "cpu", "batched", "", "-2"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                             max_size=3), max_leaves=5)
configs = st.dictionaries(keys, values, max_size=8)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def accepts_or_refuses(load) -> None:
    try:
        config = load()
    except ConfigError as error:
        assert str(error)  # a message to print
        return
    assert isinstance(config, ExperimentConfig)


@FUZZ
@given(configs)
def test_random_overrides_are_accepted_or_refused_with_config_error(overrides):
    accepts_or_refuses(lambda: load_config(overrides=overrides))
    # On top of a file's values, as the command line applies them.
    accepts_or_refuses(lambda: build_config(apply_overrides({"batch_size": 2}, overrides, "the command line")))


@FUZZ
@given(configs, st.sampled_from([".json", ".yaml"]))
def test_random_config_files_are_accepted_or_refused_with_config_error(content, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"config{suffix}"
        if suffix == ".json":
            path.write_text(json.dumps({str(k): v for k, v in content.items()}, allow_nan=True))
        else:
            path.write_text(yaml.safe_dump(content))
        accepts_or_refuses(lambda: load_config(path))


@FUZZ
@given(st.text(max_size=80), st.sampled_from([".json", ".yaml"]))
def test_random_file_text_is_accepted_or_refused_with_config_error(text, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"config{suffix}"
        path.write_text(text)
        accepts_or_refuses(lambda: load_config(path))
