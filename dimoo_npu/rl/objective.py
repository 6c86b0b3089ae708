"""GRPO's loss on per-token log-probabilities (Shao et al. 2024, DeepSeekMath, eq. 3; as TRL's GRPOTrainer).

For a group of G completions of one prompt with rewards r_1..r_G, the advantage of completion i is
A_i = (r_i - mean(r)) / (std(r) + 1e-4) (std with Bessel's correction, as ``torch.std``). For each scored token t
of completion i, with ratio rho = exp(logp - logp_old):

    l_it = -min(rho * A_i, clip(rho, 1 - epsilon, 1 + epsilon) * A_i) + beta * KL_it
    KL_it = exp(logp_ref - logp) - (logp_ref - logp) - 1          (Schulman's k3 estimator, always >= 0)

The loss of a completion is the mean of l_it over its scored tokens, and the step's loss the mean over
completions. With one update per rollout (``num_iterations`` 1) logp_old is logp detached: rho is 1 but its
gradient is that of logp, the policy gradient. ``beta`` 0 drops the KL term (and the reference model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) rewards, consecutive groups of ``group_size`` -> (B,) group-normalised advantages; exactly 0 in a group
    whose rewards are all equal (its mean can round off them, and the tiny std would blow that up to ~1e-4)."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    advantages = centred / (grouped.std(dim=1, keepdim=True) + ADVANTAGE_EPS)
    return torch.where(uniform_groups(rewards, group_size)[:, None], 0.0, advantages).reshape(-1)


def uniform_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) rewards -> (B / group_size,) bool: the groups whose completions all scored the same (no signal)."""
    grouped = rewards.view(-1, group_size)
    return grouped.amax(dim=1) == grouped.amin(dim=1)


@dataclass
class GRPOLoss:
    per_sequence: torch.Tensor  # (B,) differentiable
    kl: torch.Tensor  # () mean KL over scored tokens (0 without a reference)
    clip_fraction: torch.Tensor  # () share of scored tokens whose clipped term was the one taken


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    scored: torch.Tensor,
    epsilon: float,
    beta: float,
) -> GRPOLoss:
    """The per-completion GRPO loss (see the module doc); tensors (B, K), ``advantages`` (B,)."""
    ratio = torch.exp(logp - old_logp)
    advantage = advantages[:, None]
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantage
    per_token = -torch.min(unclipped, clipped)
    weight = scored.float()
    count = weight.sum()
    if ref_logp is not None and beta != 0:
        delta = ref_logp - logp
        kl_token = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl_token
        kl = (kl_token.detach() * weight).sum() / count.clamp_min(1)
    else:
        kl = torch.zeros((), device=logp.device)
    per_sequence = (per_token * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1)
    was_clipped = (clipped < unclipped).detach().float()
    clip_fraction = (was_clipped * weight).sum() / count.clamp_min(1)
    return GRPOLoss(per_sequence, kl, clip_fraction)
