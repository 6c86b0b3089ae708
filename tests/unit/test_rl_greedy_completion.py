"""``rl.greedy_completion``: the last completion of each group is the greedy decode that evaluation draws, and the
group's other completions are the very draws the run makes without it; the step logs the greedy rows' reward."""

from __future__ import annotations

import json

import pytest
import torch

from dimoo_npu.rl.trainer import GRPOTrainer, run_grpo
from dimoo_npu.sampling import sample_image
from dimoo_npu.sampling.record import Rollout
from tests.unit.rl_support import image_rollout, tiny_grpo_config, tiny_policy

N = 3  # completions per group: two sampled, then the greedy one
EDIT_AND_CAPTION = ("rl.tasks=[edit-recolour, caption]", "rl.task_items=2", f"rl.num_generations={N}",
                    f"global_batch_size={2 * N}", "rl.temperature=1.3")  # fmt: skip


def _trainer(tmp, greedy: bool) -> GRPOTrainer:
    return GRPOTrainer(tiny_grpo_config(tmp, *EDIT_AND_CAPTION, f"rl.greedy_completion={greedy}"))


def _rows(rollout: Rollout, rows: list[int]) -> torch.Tensor:
    return rollout.select(torch.tensor(rows)).tokens


@pytest.fixture(scope="module")
def trainers(tmp_path_factory) -> tuple[GRPOTrainer, GRPOTrainer]:
    tmp = tmp_path_factory.mktemp("greedy")
    sampled_only, with_greedy = _trainer(tmp / "sampled", False), _trainer(tmp / "greedy", True)
    for a, b in zip(sampled_only.model.parameters(), with_greedy.model.parameters(), strict=True):
        assert torch.equal(a, b), "both runs start from the same seeded model"
    return sampled_only, with_greedy


def test_edit_groups_end_with_their_greedy_decode(trainers):
    sampled_only, with_greedy = trainers
    groups, items = [4, 5], with_greedy.task_items["edit-recolour"]
    with torch.no_grad():
        plain, mixed = sampled_only._rollout(groups, items), with_greedy._rollout(groups, items)
        prompts = [with_greedy._picture_prompt(g, item).prompt for g, item in zip(groups, items, strict=True)]
        greedy = sample_image(with_greedy.model, prompts, timesteps=with_greedy.timesteps, temperature=0.0)
    assert torch.equal(_rows(mixed, [0, 1, 3, 4]), _rows(plain, [0, 1, 3, 4])), "the sampled draws are unchanged"
    assert torch.equal(_rows(mixed, [2, 5]), greedy), "each group's last row is its prompt's greedy decode"
    assert not torch.equal(_rows(plain, [2, 5]), greedy), "a sampled row at 1.3 is not the greedy decode"
    assert torch.equal(mixed.sequence.gather(1, mixed.positions), mixed.tokens), "rows keep their own trajectory"


def test_caption_groups_end_with_their_greedy_answer(trainers):
    sampled_only, with_greedy = trainers
    groups, items = [1, 3], with_greedy.task_items["caption"]
    with torch.no_grad():
        (plain, _), (mixed, rewards) = sampled_only._answer_rollout(groups, items), with_greedy._answer_rollout(
            groups, items
        )
    assert torch.equal(_rows(mixed, [0, 1, 3, 4]), _rows(plain, [0, 1, 3, 4]))
    assert rewards.shape == (2 * N,)
    with torch.no_grad():
        again, _ = with_greedy._answer_rollout(groups, items)
    assert torch.equal(_rows(again, [2, 5]), _rows(mixed, [2, 5])), "the greedy answer is deterministic"


def test_the_step_logs_the_greedy_rows_reward(tmp_path, monkeypatch):
    seen = []
    rewards = GRPOTrainer._rewards

    def remember(self, rollout, items):
        values = rewards(self, rollout, items)
        seen.append(values.view(len(items), N)[:, -1])
        return values

    monkeypatch.setattr(GRPOTrainer, "_rewards", remember)
    overrides = ("rl.reward_function=tests.unit.rl_rewards:redness", f"rl.num_generations={N}",
                 f"global_batch_size={2 * N}", "rl.greedy_completion=true", "train_iters=1")  # fmt: skip
    run_grpo(tiny_grpo_config(tmp_path, *overrides))
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["reward_greedy"] == pytest.approx(float(torch.cat(seen).double().mean()))
    assert record["grad_norm"] > 0


def test_rollouts_of_different_widths_do_not_stack():
    model = tiny_policy()
    short = image_rollout(model, steps=2)
    with pytest.raises(ValueError, match="equal widths and steps"):
        Rollout.stacked([short, image_rollout(model, steps=3)])
    assert Rollout.stacked([short, short]).tokens.shape[0] == 2 * short.tokens.shape[0]
