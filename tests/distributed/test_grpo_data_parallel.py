"""Self-GRPO on 2 FSDP2 data-parallel gloo ranks: the same rewards and losses as one process, exact resume, and
uniform groups left out of the update on one rank only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dimoo_npu.rl.trainer import run_grpo
from tests.unit.rl_support import tiny_grpo_config

WORKER = Path(__file__).with_name("grpo_worker.py")


@pytest.fixture(scope="module")
def dp2_runs(run_distributed, tmp_path_factory) -> list[dict]:
    return run_distributed(WORKER, 2, tmp_path_factory.mktemp("grpo_dp2"), [])


def test_ranks_agree_and_resume_exactly(dp2_runs):
    assert dp2_runs[0]["full"] == dp2_runs[1]["full"], "every rank reports the step's global loss"
    assert dp2_runs[0]["resumed"] == dp2_runs[0]["full"]


def test_the_sharded_policy_answers_for_the_self_reward(dp2_runs):
    record = dp2_runs[0]["self"]
    assert 0 <= record["reward_mean"] <= 1 and record["rollout_s"] > 0


def test_two_ranks_reproduce_the_single_process_run(dp2_runs, tmp_path):
    reward = "rl.reward_function=tests.unit.rl_rewards:redness"
    losses = run_grpo(tiny_grpo_config(tmp_path, reward, "train_iters=2", "lr_decay_iters=2"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rewards = [json.loads(line)["reward_mean"] for line in lines]
    # the same rows with the same generators: the same images; only the batch's padding and summation order differ
    assert dp2_runs[0]["rewards"] == pytest.approx(rewards, rel=1e-5)
    assert dp2_runs[0]["full"] == pytest.approx(losses, rel=1e-4, abs=1e-6)


def test_a_rank_with_nothing_to_learn_keeps_in_step_and_the_update_is_unchanged(dp2_runs):
    (start, end), (skipped_start, skipped_end) = dp2_runs[0]["lopsided"].values()
    assert start == skipped_start and end != start, "both runs start alike and rank 1's groups move the policy"
    assert skipped_end == pytest.approx(end, rel=1e-6, abs=1e-6)
    assert dp2_runs[1]["lopsided"] == dp2_runs[0]["lopsided"], "the ranks hold the same weights"
