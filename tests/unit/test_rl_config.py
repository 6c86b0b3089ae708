"""The ``rl:`` section of a run config: present (even empty) turns Self-GRPO on, absent leaves supervised training."""

from __future__ import annotations

import pytest

from dimoo_npu.train.config import RLArgs, load_config
from dimoo_npu.utils.errors import ConfigError
from tests.unit.train_support import TINY_CONFIG


def test_absent_section_is_supervised_and_an_override_into_it_turns_it_on():
    assert load_config(TINY_CONFIG).rl is None
    config = load_config(TINY_CONFIG, ["rl.num_generations=2", "beta=0"])
    assert config.rl == RLArgs(num_generations=2, beta=0.0)


def test_an_empty_section_takes_the_defaults_and_needs_no_shards(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text(TINY_CONFIG.read_text().replace("runs/tiny-cpu-shards", '""') + "\nrl:\n")
    assert load_config(path).rl == RLArgs()
    path.write_text(path.read_text().replace("\nrl:\n", "\n"))  # supervised again: the shards are needed
    with pytest.raises(ConfigError, match="data.shards is empty"):
        load_config(path)


def test_rl_values_are_checked():
    with pytest.raises(ConfigError, match="rl.likelihood is 'exact'"):
        load_config(TINY_CONFIG, ["rl.likelihood=exact"])
    with pytest.raises(ConfigError, match="rl.epsilon is nan"):
        load_config(TINY_CONFIG, ["rl.epsilon=.nan"])
