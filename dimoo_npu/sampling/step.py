"""One sampling step's token math: draw, sample, score, re-mask (image) and reveal (understanding).

Every function works on a padded batch: row b has its own number of live slots, and random numbers are
drawn per row from that row's generator with a shape that depends only on that row, so a seeded sample
does not change with what else is in its batch.
"""

from __future__ import annotations

import torch

Generators = list[torch.Generator | None]


def draw_uniform(
    generators: Generators, counts: list[int], width: int, slots: int, device: torch.device, dtype=torch.float32
) -> torch.Tensor:
    """Uniform [0, 1) noise (B, slots, width): row b draws (counts[b], width) from generators[b]; the rest is 0.5."""
    noise = torch.empty((len(counts), slots, width), dtype=dtype, device=device)
    for row, (gen, count) in enumerate(zip(generators, counts, strict=True)):
        noise[row, count:].fill_(0.5)
        if not count:
            continue
        if gen is None or gen.device == noise.device:
            noise[row, :count].uniform_(generator=gen)  # the numbers torch.rand((count, width)) would draw
        else:  # a CPU generator for a device batch
            noise[row, :count] = torch.rand((count, width), generator=gen, dtype=dtype, device=gen.device)
    return noise


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum over the last dim, as Tensor.argmax, by the faster max kernel on CPU
    (benchmarks/bench_sampling.py measures the samplers that use it)."""
    return x.max(dim=-1).indices


def gumbel_(u: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from uniform draws, in place, with the public code's guards against log(0):
    -log(-log(u + 1e-20) + 1e-20)."""
    return u.add_(1e-20).log_().neg_().add_(1e-20).log_().neg_()


def sample_codes(
    logits: torch.Tensor, temperature: float, generators: Generators, counts: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-max sample over the last dim and its score log(p) + tau * g' (image steps).

    logits (B, K, V) after guidance; counts[b] = slots of row b that get noise. Returns sampled (B, K) indices
    into V and score (B, K). Temperature 0 is plain argmax with score log(p).
    """
    batch, slots, width = logits.shape
    if temperature == 0:
        sampled = argmax(logits)
    else:
        noise = gumbel_(draw_uniform(generators, counts, width, slots, logits.device))
        scaled = logits if temperature == 1 else logits / temperature  # x / 1 == x: skip a pass over (B, K, V)
        sampled = argmax(noise.add_(scaled))  # argmax(logits / tau + g)
    probs = torch.softmax(logits, dim=-1)
    score = torch.log(probs.gather(-1, sampled[..., None]).squeeze(-1).clamp_min(1e-20))  # (B, K)
    if temperature != 0:
        score = score + temperature * gumbel_(draw_uniform(generators, counts, 1, slots, logits.device)[..., 0])
    return sampled, score


def stay_masked(score: torch.Tensor, live: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Which live slots go back to MASK (B, K) bool.

    With M live slots in a row, k = min(keep, M - 1): the slots scoring strictly below the k-th smallest
    live score (0-based) stay masked, so every step fixes at least one token.
    """
    live_count = live.sum(dim=1)  # (B,)
    k = torch.minimum(keep, live_count - 1).clamp_min(0)
    ranked = score.masked_fill(~live, float("inf")).sort(dim=1).values  # dead slots sort last
    cutoff = ranked.gather(1, k[:, None])  # (B, 1)
    return live & (score < cutoff)


def predict_text(
    logits: torch.Tensor,
    temperature: float,
    generators: Generators,
    slots: torch.Tensor | None = None,
    block: int | None = None,
    confidence_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA prediction and its probability (understanding steps): logits (B, K, V) -> (B, K), (B, K).

    Temperature > 0 perturbs in float64 as LLaDA does: argmax exp(l) / (-log u) ** tau. ``slots`` (B, K): which of
    the ``block`` block positions the K logits are (the cached steps ask the head for the masked ones only); the
    noise is still drawn for the whole block, so a row's draws do not depend on its batch. The probability is
    float64 as LLaDA computes it; the cached steps rank and threshold on a float32 one (a third of the cost).
    """
    batch, slots_count, width = logits.shape
    wide = logits.double() if temperature or confidence_dtype == torch.float64 else None
    if temperature == 0:
        predicted = argmax(logits)
    else:
        drawn = slots_count if slots is None else block
        noise = draw_uniform(generators, [drawn] * batch, width, drawn, logits.device, dtype=torch.float64)
        if slots is not None:
            noise = noise.gather(1, slots[..., None].expand(-1, -1, width))
        predicted = argmax(wide.exp() / (-torch.log(noise)) ** temperature)
    if confidence_dtype == torch.float64:
        probs = torch.softmax(wide, dim=-1)
        return predicted, probs.gather(-1, predicted[..., None]).squeeze(-1)
    narrow = logits.to(confidence_dtype)
    chosen = narrow.gather(-1, predicted[..., None]).squeeze(-1)
    return predicted, (chosen - torch.logsumexp(narrow, dim=-1)).exp()


def reveal(confidence: torch.Tensor, counts: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """The counts[b] most confident slots of each row (B, K) bool, and with a threshold also every slot whose
    confidence is >= it; confidence -inf marks slots never chosen."""
    order = confidence.argsort(dim=1, descending=True, stable=True)  # (B, K)
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)  # rank[b, slot]: 0 = most confident
    chosen = rank < counts[:, None]
    if threshold is not None:
        chosen |= confidence >= threshold
    return chosen & (confidence > float("-inf"))
