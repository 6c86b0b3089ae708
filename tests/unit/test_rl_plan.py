"""`dimoo train CONFIG --plan` with an ``rl:`` section counts the frozen reference and the rollout batch."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from dimoo_npu.cli import main
from dimoo_npu.planner.rl_plan import REFERENCE, ROLLOUT
from dimoo_npu.shapes.embedded import EMBEDDED_CHECKPOINT
from tests.unit.rl_support import CONFIG


def _plan(monkeypatch, tmp_path, capsys, config: Path, *overrides: str) -> dict:
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "plan.json"
    base = [f"model.init_from={EMBEDDED_CHECKPOINT}", "micro_batch_size=4"]
    assert main(["train", str(config), *base, *overrides, "--plan", "--json", str(out)]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())


def test_plan_counts_reference_and_rollouts(monkeypatch, tmp_path, capsys):
    plan = _plan(monkeypatch, tmp_path, capsys, CONFIG)
    for rank in plan["ranks"]:
        assert rank["memory"][REFERENCE] == 4 * rank["param_elements"], "fp32, sharded like the policy over dp 2"
        assert rank["memory"][ROLLOUT] > 0
        assert list(rank["memory"])[-1] == "runtime reserve"
    without_reference = _plan(monkeypatch, tmp_path, capsys, CONFIG, "rl.beta=0")
    assert all(REFERENCE not in rank["memory"] for rank in without_reference["ranks"])
    guided = _plan(monkeypatch, tmp_path, capsys, CONFIG, "rl.cfg_scale=2")
    assert guided["ranks"][0]["memory"][ROLLOUT] > plan["ranks"][0]["memory"][ROLLOUT], "two branches per row"


def test_supervised_plan_has_no_rl_terms(monkeypatch, tmp_path, capsys):
    raw = yaml.safe_load(CONFIG.read_text())
    del raw["rl"]
    raw["data"]["shards"] = "shards"
    supervised = tmp_path / "sft.yaml"
    supervised.write_text(yaml.safe_dump(raw))
    plan = _plan(monkeypatch, tmp_path, capsys, supervised)
    assert all(REFERENCE not in rank["memory"] and ROLLOUT not in rank["memory"] for rank in plan["ranks"])


def test_sweep_counts_reference_and_rollouts_and_lists_data_parallel_only(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    out = tmp_path / "sweep.json"
    args = ["train", str(CONFIG), f"model.init_from={EMBEDDED_CHECKPOINT}", "--sweep", "--json", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    fits = json.loads(out.read_text())["fits"]
    assert fits, "the bundled model fits every data-parallel layout"
    for plan in fits:
        assert plan["layout"]["tp"] == plan["layout"]["pp"] == 1, "Self-GRPO is refused at tp or pp > 1"
        assert REFERENCE in plan["ranks"][0]["memory"] and ROLLOUT in plan["ranks"][0]["memory"]
