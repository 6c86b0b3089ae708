"""ML-Cache (max-logit cache) as an explicit object handed to ``model(..., cache=...)``.

Holds, for every row of a padded batch (each CFG branch of each prompt is a row), the K/V of every layer
at every position and the last image-code logits of every position. A refresh step rebuilds it from a full
forward; a cached step recomputes only the least confident positions (lowest max logit) and keeps the rest.
"""

from __future__ import annotations

import torch


class MLCache:
    """K/V per layer (B, H, L, D) and image-code logits (B, L, C) of every position of every row."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.logits: torch.Tensor | None = None  # (B, L, C)
        self.max_logit: torch.Tensor | None = None  # (B, L)
        self.full_step = True

    def begin_step(self, full: bool) -> None:
        """Say what the next forward is: a full forward stores every layer's K/V, a cached one scatters rows.

        Needed because the model hands its rotary positions to `update` on full forwards too. A full step starts
        from empty dicts: the old K/V go before the new are made, and a compiled forward sees the same (empty)
        cache on every full step, so it does not compile a second graph for the second refresh.
        """
        self.full_step = full
        if full:
            self.keys, self.values = {}, {}

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (full step, or positions None) or scatter the new rows at positions (B, K); return full K/V."""
        if self.full_step or positions is None:
            # contiguous: v may be a view into the fused [q; k; v] matmul output, which it would keep alive
            self.keys[layer], self.values[layer] = k.contiguous(), v.contiguous()
            return self.keys[layer], self.values[layer]
        index = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, H, K, D)
        self.keys[layer].scatter_(2, index, k)
        self.values[layer].scatter_(2, index, v)
        return self.keys[layer], self.values[layer]

    def store_logits(self, logits: torch.Tensor) -> None:
        """Keep a full forward's image-code logits (B, L, C) of every position."""
        self.logits = logits
        self.max_logit = logits.max(dim=-1).values  # (B, L)

    def merge_logits(self, positions: torch.Tensor, logits: torch.Tensor) -> None:
        """Write a cached step's logits (B, K, C) at positions (B, K); repeated positions carry equal values."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]  # (B, 1)
        self.logits[rows, positions] = logits.to(self.logits.dtype)
        self.max_logit[rows, positions] = logits.max(dim=-1).values.to(self.max_logit.dtype)

    def logits_at(self, positions: torch.Tensor) -> torch.Tensor:
        """Cached logits (B, K, C) at positions (B, K)."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]  # (B, 1)
        return self.logits[rows, positions]  # row copies: cheaper than gather with an expanded index

    def recompute_positions(self, real: torch.Tensor, widths: torch.Tensor, width: int) -> torch.Tensor:
        """Positions (B, width) for the next cached step: the widths[b] real positions of row b with the lowest
        max logit (see `dimoo_npu.sampling.schedule.recompute_widths`), in ascending order.

        Rows with fewer than ``width`` repeat their first position, which rewrites identical K/V and logits.
        Reads nothing back: ``width`` is known on the host. Ties at the cutoff are broken by top-k, where the
        quantile rule (threshold, then ``<=``) took every tied position.
        """
        score = self.max_logit.float().masked_fill(~real, float("inf"))  # (B, L); padding never chosen
        lowest = score.topk(width, dim=1, largest=False).indices  # (B, width), lowest first
        chosen = torch.arange(width, device=real.device) < widths[:, None]  # (B, width)
        ordered = torch.where(chosen, lowest, real.shape[1]).sort(dim=1).values  # chosen positions first, ascending
        return torch.where(chosen, ordered, ordered[:, :1])
