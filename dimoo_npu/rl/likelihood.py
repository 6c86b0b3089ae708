"""The policy log-likelihood of a recorded rollout (`dimoo_npu.sampling.record.Rollout`) under a model.

A masked-diffusion model has no exact sequence likelihood; GRPO needs per-token log-probabilities whose ratio
between the policy and the behaviour (or reference) model it can clip. Two estimates, both returning one
log-probability per sampled token and the set of tokens they score:

- ``sampled_timestep`` (default; d1, Zhao et al. 2025, "d1: Scaling Reasoning in Diffusion Large Language Models
  via Reinforcement Learning", and MMaDA's UniGRPO, Yang et al. 2025, section 3): draw a ratio t ~ U(0, 1) per
  sample, hide each sampled token with probability t (at least one), and score the hidden tokens with one forward
  of the filled-in sequence: log p(x_k | x with the hidden tokens masked), k hidden. One forward per update, the
  same hidden set for policy, behaviour and reference (it is drawn from a seeded generator), so the ratio compares
  like with like.
- ``trajectory``: the log-probability of each token at the step that revealed it, given the state at the start of
  that step (every token revealed at that step or later masked): log p(x_k | x_s), k revealed at step s. Exact
  along the recorded path (the order in which tokens were revealed is not itself scored, as in d1); one forward
  per sampling step, so it costs the rollout's step count in forwards per update.

Both score the conditional branch (no classifier-free guidance) over the part of the vocabulary the sampler drew
from (``vocab_range``: the image codes for images, everything for answers), with logits divided by the sampling
temperature as TRL's GRPOTrainer does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dimoo_npu.sampling.record import Rollout

ESTIMATES = ("sampled_timestep", "trajectory")


@dataclass
class TokenScores:
    """Per-token log-probabilities (B, K) (differentiable), detached entropies (B, K), and which tokens count."""

    logp: torch.Tensor
    entropy: torch.Tensor
    scored: torch.Tensor


def token_logprobs(
    model,
    rollout: Rollout,
    hidden: torch.Tensor,
    mask_id: int,
    vocab_range: tuple[int, int] | None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token_k | the rollout's sequence with the ``hidden`` (B, K) tokens masked) and the entropy, (B, K)."""
    shown = torch.where(hidden, torch.full_like(rollout.tokens, mask_id), rollout.tokens)
    ids = rollout.sequence.scatter(1, rollout.positions, shown)
    logits = model(ids, rollout.real, logits_for=rollout.positions, vocab_range=vocab_range, check_ids=False).float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    logp_all = logits.log_softmax(dim=-1)  # (B, K, V')
    offset = vocab_range[0] if vocab_range is not None else 0
    logp = logp_all.gather(-1, (rollout.tokens - offset)[..., None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def sampled_timestep_mask(rollout: Rollout, generators: list[torch.Generator]) -> torch.Tensor:
    """The hidden tokens (B, K) of the sampled-timestep estimate: ratio t ~ U(0, 1) per row, each sampled token
    hidden with probability t, and at least the sampled token with the smallest draw. Drawn on the CPU from one
    generator per row, so the mask does not depend on the batch or the device."""
    batch, width = rollout.tokens.shape
    draws = torch.stack([torch.rand(width + 1, generator=g) for g in generators]).to(rollout.tokens.device)
    ratio, uniform = draws[:, :1], draws[:, 1:]
    sampled = rollout.reveal_step >= 0
    uniform = uniform.masked_fill(~sampled, 2.0)  # never hidden; never the smallest
    first = torch.zeros_like(sampled).scatter_(1, uniform.argmin(dim=1, keepdim=True), True)
    return sampled & ((uniform < ratio) | first)


def sampled_timestep_scores(
    model, rollout: Rollout, hidden: torch.Tensor, mask_id: int, vocab_range, temperature: float = 1.0
) -> TokenScores:
    """The sampled-timestep estimate for a given hidden set (`sampled_timestep_mask`): the hidden tokens scored."""
    logp, entropy = token_logprobs(model, rollout, hidden, mask_id, vocab_range, temperature)
    return TokenScores(logp, entropy, hidden)


def trajectory_scores(model, rollout: Rollout, mask_id: int, vocab_range, temperature: float = 1.0) -> TokenScores:
    """The trajectory estimate: every sampled token scored at the step that revealed it (one forward per step)."""
    logp = torch.zeros(rollout.tokens.shape, device=rollout.tokens.device)
    entropy = torch.zeros_like(logp)
    for step in range(rollout.steps):  # every step, even one that revealed nothing: data-parallel ranks stay in step
        revealed = rollout.reveal_step == step
        step_logp, step_entropy = token_logprobs(
            model, rollout, rollout.reveal_step >= step, mask_id, vocab_range, temperature
        )
        logp = torch.where(revealed, step_logp, logp)
        entropy = torch.where(revealed, step_entropy, entropy)
    return TokenScores(logp, entropy, rollout.reveal_step >= 0)
