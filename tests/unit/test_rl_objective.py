"""GRPO on a tiny model: both likelihood estimates and the clipped, KL-regularised loss, each gradient against
autograd of the explicit formula written out token by token (one unpadded row per forward, full-vocabulary
logits sliced by hand, plain Python sums)."""

from __future__ import annotations

import math

import pytest
import torch

from dimoo_npu.numerics.tolerances import TOLERANCES
from dimoo_npu.rl.likelihood import (
    sampled_timestep_mask,
    sampled_timestep_scores,
    trajectory_scores,
)
from dimoo_npu.rl.objective import group_advantages, grpo_loss, uniform_groups
from tests.unit.rl_support import image_rollout, tiny_policy
from tests.unit.train_support import tiny_special_tokens

TOKENS = tiny_special_tokens()
CODES = (TOKENS["image_offset"], TOKENS["image_offset"] + TOKENS["codebook_size"])
EPSILON, BETA = 0.2, 0.05


def _explicit_logp(model, rollout, row: int, hidden: set[int], k: int, temperature: float) -> torch.Tensor:
    """log p(token k | row with the ``hidden`` cells masked), from one unpadded forward of the whole vocabulary."""
    length = int(rollout.real[row].sum())
    ids = rollout.sequence[row, :length].clone()
    for j in hidden:
        ids[rollout.positions[row, j]] = TOKENS["mask"]
    logits = model(ids[None])[0, rollout.positions[row, k], CODES[0] : CODES[1]] / temperature
    return logits[rollout.tokens[row, k] - CODES[0]] - torch.logsumexp(logits, dim=0)


def _explicit_loss(terms: list[list[tuple[torch.Tensor, float, float]]], advantages: list[float]) -> torch.Tensor:
    """Mean over rows of the mean over a row's tokens of -min(rho A, clip(rho) A) + beta KL; terms (logp, old, ref)."""
    rows = []
    for row_terms, advantage in zip(terms, advantages, strict=True):
        total = 0.0
        for logp, old, ref in row_terms:
            ratio = torch.exp(logp - old)
            clipped = torch.clamp(ratio, 1 - EPSILON, 1 + EPSILON)
            total = total - torch.minimum(ratio * advantage, clipped * advantage)
            total = total + BETA * (torch.exp(ref - logp) - (ref - logp) - 1)
        rows.append(total / len(row_terms))
    return sum(rows) / len(rows)


def _grads(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_gradients(ours: list[torch.Tensor], explicit: list[torch.Tensor]) -> None:
    tol = TOLERANCES["explicit"]["float32"]
    assert any(g.abs().max() > 0 for g in explicit), "the check needs a non-zero gradient"
    for a, b in zip(ours, explicit, strict=True):
        torch.testing.assert_close(a, b, atol=tol.atol, rtol=tol.rtol)


def _old_and_ref(logp: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logp_old with ratios of 1.65, 0.61 and 1 in turn (outside and inside the clip range), and a stand-in
    reference logp near the policy's."""
    shift = torch.tensor([-0.5, 0.5, 0.0]).repeat(logp.shape[1] // 3 + 1)[: logp.shape[1]]
    noise = torch.randn(logp.shape, generator=torch.Generator().manual_seed(seed)) * 0.3
    return logp.detach() + shift, logp.detach() + noise


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_timestep_gradient_equals_the_explicit_formula(temperature):
    model = tiny_policy()
    rollout = image_rollout(model, steps=3)
    hidden = sampled_timestep_mask(rollout, [torch.Generator().manual_seed(10 + i) for i in range(2)])
    assert hidden.any(dim=1).all()
    advantages = torch.tensor([0.8, -1.3])
    scores = sampled_timestep_scores(model, rollout, hidden, TOKENS["mask"], CODES, temperature)
    old, ref = _old_and_ref(scores.logp, 1)
    loss = grpo_loss(scores.logp, old, ref, advantages, scores.scored, EPSILON, BETA)
    assert 0 < float(loss.clip_fraction) < 1, "the check covers clipped and unclipped tokens"
    loss.per_sequence.mean().backward()
    ours = _grads(model)

    terms = []
    for row in range(2):
        cells = set(hidden[row].nonzero().flatten().tolist())
        terms.append(
            [
                (_explicit_logp(model, rollout, row, cells, k, temperature), float(old[row, k]), float(ref[row, k]))
                for k in sorted(cells)
            ]
        )
    _explicit_loss(terms, advantages.tolist()).backward()
    _assert_same_gradients(ours, _grads(model))


def test_trajectory_gradient_equals_the_explicit_formula():
    model = tiny_policy(seed=1)
    rollout = image_rollout(model, steps=3, seed=5)
    scores = trajectory_scores(model, rollout, TOKENS["mask"], CODES)
    assert scores.scored.all()
    advantages = torch.tensor([-0.4, 1.1])
    old, ref = _old_and_ref(scores.logp, 2)
    grpo_loss(scores.logp, old, ref, advantages, scores.scored, EPSILON, BETA).per_sequence.mean().backward()
    ours = _grads(model)

    terms = []
    for row in range(2):
        steps = rollout.reveal_step[row].tolist()
        row_terms = []
        for k, step in enumerate(steps):
            masked = {j for j, s in enumerate(steps) if s >= step}  # every cell not yet revealed at that step
            logp = _explicit_logp(model, rollout, row, masked, k, 1.0)
            row_terms.append((logp, float(old[row, k]), float(ref[row, k])))
        terms.append(row_terms)
    _explicit_loss(terms, advantages.tolist()).backward()
    _assert_same_gradients(ours, _grads(model))


def test_with_one_update_per_rollout_the_gradient_is_the_policy_gradient():
    """logp_old = logp detached and beta 0: the loss's gradient is -mean_i A_i * mean_t grad logp_it."""
    model = tiny_policy(seed=2)
    rollout = image_rollout(model, steps=2, seed=7)
    scores = trajectory_scores(model, rollout, TOKENS["mask"], CODES)
    advantages = torch.tensor([1.0, -1.0])
    loss = grpo_loss(scores.logp, scores.logp.detach(), None, advantages, scores.scored, EPSILON, 0.0)
    assert float(loss.clip_fraction) == 0 and float(loss.kl) == 0
    loss.per_sequence.mean().backward()
    ours = _grads(model)
    scores = trajectory_scores(model, rollout, TOKENS["mask"], CODES)
    (-(advantages[:, None] * scores.logp).mean(dim=1).mean()).backward()
    _assert_same_gradients(ours, _grads(model))


def test_group_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.25, 0.75])
    advantages = group_advantages(rewards, 2)
    std = math.sqrt(0.5)  # Bessel-corrected std of (1, 0); (0.25, 0.75) has half of it
    first, third = 0.5 / (std + 1e-4), 0.25 / (0.5 * std + 1e-4)
    expected = [first, -first, 0.0, 0.0, -third, third]
    torch.testing.assert_close(advantages, torch.tensor(expected))


def test_a_group_that_scored_alike_has_exactly_zero_advantage():
    rewards = torch.tensor([0.9, 0.9, 0.9, 1.0, 0.0, 1.0])
    assert rewards[:3].mean() != rewards[0], "the mean rounds off the rewards (~6e-4 advantages): the case guarded"
    advantages = group_advantages(rewards, 3)
    assert advantages[:3].tolist() == [0.0, 0.0, 0.0] and advantages[3:].abs().min() > 0.5
    assert uniform_groups(rewards, 3).tolist() == [True, False]


def test_kl_is_zero_against_itself_and_positive_otherwise():
    logp = torch.tensor([[-1.0, -2.0]])
    scored = torch.ones(1, 2, dtype=torch.bool)
    same = grpo_loss(logp, logp, logp, torch.zeros(1), scored, EPSILON, BETA)
    other = grpo_loss(logp, logp, logp - 0.5, torch.zeros(1), scored, EPSILON, BETA)
    assert float(same.kl) == 0 and float(other.kl) > 0
    torch.testing.assert_close(other.per_sequence, BETA * other.kl[None])


def test_trajectory_of_an_answer_scores_each_revealed_token_over_the_whole_vocabulary():
    from dimoo_npu.sampling import sample_text

    model = tiny_policy(seed=3)
    prompt = torch.cat([torch.arange(1, 6), torch.tensor([TOKENS["boa"]]), torch.full((4,), TOKENS["mask"])])
    prompt = torch.cat([prompt, torch.tensor([TOKENS["eoa"]])])
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    rollout = sample_text(
        model, [prompt, prompt[1:]], gen_length=4, block_length=4, steps=2, temperature=1.0, generator=generators,
        record=True,
    )  # fmt: skip
    scores = trajectory_scores(model, rollout, TOKENS["mask"], None)
    for row in range(2):
        steps = rollout.reveal_step[row].tolist()
        length = int(rollout.real[row].sum())
        for k, step in enumerate(steps):
            ids = rollout.sequence[row, :length].clone()
            for j, s in enumerate(steps):
                if s >= step:
                    ids[rollout.positions[row, j]] = TOKENS["mask"]
            logits = model(ids[None])[0, rollout.positions[row, k]]
            expected = logits[rollout.tokens[row, k]] - torch.logsumexp(logits, dim=0)
            tol = TOLERANCES["explicit"]["float32"]
            torch.testing.assert_close(scores.logp[row, k], expected, atol=tol.atol, rtol=tol.rtol)
