"""External reward functions for the Self-GRPO tests (named as ``tests.unit.rl_rewards:NAME`` in run configs)."""

from __future__ import annotations

import numpy as np


def redness(images, prompts):
    """Share of the picture's red channel: varies from image to image, so every group has advantages."""
    return [float(np.asarray(image, dtype=np.float64)[..., 0].mean() / 255.0) for image in images]


def raises(images, prompts):
    raise RuntimeError("the scorer is down")


def not_a_number(images, prompts):
    return [float("nan")] * len(images)


def too_large(images, prompts):
    return [1.5] * len(images)


def first_prompt_constant(images, prompts):
    """0.5 for every image of the call's first prompt (a group with no signal), redness for the others."""
    values = redness(images, prompts)
    return [0.5 if prompt == prompts[0] else value for prompt, value in zip(prompts, values, strict=True)]


def constant(images, prompts):
    return [0.5] * len(images)
