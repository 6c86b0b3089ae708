"""torchrun's variables are read in `dimoo_npu.utils.envs` only, checked there, with the fix in the error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dimoo_npu.utils import envs
from dimoo_npu.utils.errors import ConfigError


@pytest.fixture(autouse=True)
def _alone(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_a_process_run_alone_is_rank_0_of_1():
    assert envs.torchrun_ranks() == (0, 1, 0)


def test_torchrun_ranks_and_local_rank_defaulting_to_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert envs.torchrun_ranks() == (3, 4, 3)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert envs.torchrun_ranks() == (3, 4, 1)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK='2' is not an integer in \[0, WORLD_SIZE=2\): launch through"),
        ({"RANK": "x"}, "RANK='x' is not an integer"),
        ({"RANK": "0", "LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' is not an integer"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not a positive integer"),
    ],
)
def test_bad_torchrun_values_are_refused_with_the_fix(monkeypatch, values, message):
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        envs.torchrun_ranks()


def test_no_module_of_the_package_reads_the_environment_itself():
    root = Path(__file__).resolve().parents[2]
    readers = [
        str(path.relative_to(root))
        for folder in ("dimoo_npu", "adapters", "ops", "parallel")
        for path in sorted((root / folder).rglob("*.py"))
        if path.name != "envs.py" and re.search(r"os\.environ|getenv\(", path.read_text())
    ]
    assert readers == [], "read environment variables through dimoo_npu.utils.envs"
