"""Learning rate as a pure function of the step (Megatron's warmup + decay), so resuming needs only the step."""

from __future__ import annotations

import math

from dimoo_npu.train.config import TrainConfig


def learning_rate(step: int, config: TrainConfig) -> float:
    """The lr of the optimizer step with 0-based index ``step``.

    Linear warmup from lr/warmup to lr over ``warmup`` steps, then decay from lr to min_lr until
    ``lr_decay_iters`` (cosine: min + (max - min) * (1 + cos(pi * progress)) / 2), then min_lr.
    """
    g = config.gpt_args
    warmup, decay = config.warmup_iters(), config.decay_iters()
    if step < warmup:
        return g.lr * (step + 1) / warmup
    if g.lr_decay_style == "constant":
        return g.lr
    if step >= decay:
        return g.min_lr
    progress = (step - warmup) / max(1, decay - warmup)
    if g.lr_decay_style == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return g.min_lr + (g.lr - g.min_lr) * factor
