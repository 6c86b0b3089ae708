"""Step schedules of the samplers: pure arithmetic, computed once on the host before the step loop.

Exactness matters here: the fixtures were made by the public code, which evaluates the cosine schedule on
one-element float32 tensors. We do the same (a vectorised cosine may round differently in the last bit).
"""

from __future__ import annotations

import math

import torch


def cosine_keep_masked(masked: int, timesteps: int) -> list[int]:
    """Image tokens still masked after each step: floor(masked * cos(pi/2 * (s+1)/T)), at least 1, 0 at the end."""
    return [row[0] for row in keep_masked_table([masked], timesteps)]


def keep_masked_table(masked: list[int], timesteps: int) -> list[list[int]]:
    """`cosine_keep_masked` for several rows at once: ``table[step][row]``."""
    counts = torch.tensor(masked, dtype=torch.long).float()  # (B,)
    # float32 ratio and cosine one element at a time, as the public code does; the products (correctly rounded
    # either way) in one pass, so the table costs one read of a host tensor, not one per step
    fracs = [torch.cos(0.5 * math.pi * torch.tensor([(step + 1) / timesteps])) for step in range(timesteps - 1)]
    table = (counts * torch.cat(fracs)[:, None]).floor().clamp_min(1).long().tolist() if fracs else []
    table.append([0] * len(masked))
    return table


def masked_upper_bounds(masked: list[int], keep: list[list[int]]) -> list[list[int]]:
    """Most masked cells each row can have at the start of each step (``bounds[step][row]``).

    A step leaves at most min(keep, M - 1) cells masked (ties can leave fewer), so these bounds are known
    before sampling: they size the per-step tensors and random draws without a device round trip.
    """
    bounds = [list(masked)]
    for step_keep in keep[:-1]:
        bounds.append([max(0, min(k, m - 1)) for k, m in zip(step_keep, bounds[-1], strict=True)])
    return bounds


def recompute_widths(lengths: list[int], compute_ratio: float) -> list[int]:
    """ML-Cache: positions each row recomputes on a cached step, floor(q * (n - 1)) + 1 of its n real positions.

    That is how many positions lie at or below the row's q-quantile of max logits when no two are equal (the
    rank is computed in float32, as torch.quantile computes it). Known before the loop, so a cached step sizes
    its tensors without reading the device.
    """
    ranks = torch.tensor(compute_ratio, dtype=torch.float32) * (torch.tensor(lengths, dtype=torch.float32) - 1)
    return (ranks.clamp_min(0).long() + 1).tolist()


def transfer_tokens(masked: int, steps: int) -> list[int]:
    """Tokens revealed per step of one understanding block: masked spread evenly, remainder to the first steps."""
    base, remainder = divmod(masked, steps)
    return [base + 1 if step < remainder else base for step in range(steps)]


def refresh_steps(timesteps: int, use_cache: bool, warmup_ratio: float, refresh_interval: int) -> list[bool]:
    """ML-Cache: True where the step computes every position (and rebuilds the cache), False where it reuses it."""
    warmup = int(timesteps * warmup_ratio)
    return [not use_cache or step <= warmup or (step - warmup) % refresh_interval == 0 for step in range(timesteps)]
