"""Sampling settings of the generation tasks, checked up front so bad values fail before any model loads.

Defaults follow the public inference scripts: text-to-image and painting 64 steps at CFG 4.0, editing
CFG 2.5 with image CFG 4.0, understanding 128 steps over 1024 answer tokens in blocks of 256.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dimoo_npu.errors import InputError

# What to do instead, for the values a user sets most often.
_POSITIVE_HINTS = {"timesteps": "sampling needs at least 1 step (e.g. 64)", "steps": "sampling needs at least 1 step"}
_NOT_NEGATIVE_HINTS = {
    "cfg_scale": "guidance scales cannot be negative (0 turns guidance off)",
    "cfg_img": "guidance scales cannot be negative (0 turns guidance off)",
    "temperature": "use 0 (greedy) or a positive value",
}


def check_positive(**counts: int) -> None:
    """Step counts, intervals and lengths are integers >= 1."""
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            hint = _POSITIVE_HINTS.get(name, "use 1 or more")
            raise InputError(f"{name}={value!r} must be a positive integer: {hint}")


def check_not_negative(**values: float) -> None:
    """Guidance scales and temperatures are >= 0 (0 switches guidance off / samples greedily)."""
    for name, value in values.items():
        if not value >= 0:
            hint = _NOT_NEGATIVE_HINTS.get(name, "use a value >= 0")
            raise InputError(f"{name}={value} is negative: {hint}")


def check_image_settings(
    timesteps: int,
    temperature: float,
    cfg_scale: float,
    cfg_img: float,
    cache_ratio: float,
    warmup_ratio: float,
    refresh_interval: int,
) -> None:
    """The checks `sample_image` runs, callable before a model loads. Ratios 0 and 1 are meaningful
    (recompute everything / only the least confident position; refresh at every step)."""
    check_positive(timesteps=timesteps, refresh_interval=refresh_interval)
    check_not_negative(cfg_scale=cfg_scale, cfg_img=cfg_img, temperature=temperature)
    for name, value in (("cache_ratio", cache_ratio), ("warmup_ratio", warmup_ratio)):
        if not 0 <= value <= 1:
            raise InputError(f"{name}={value} must be within [0, 1]: the share of positions reused / of warm-up steps")


def check_text_settings(gen_length: int, block_length: int, steps: int, temperature: float, cfg_scale: float) -> int:
    """The checks `sample_text` runs; returns the number of answer blocks (LLaDA splits steps equally)."""
    check_positive(gen_length=gen_length, block_length=block_length, steps=steps)
    check_not_negative(temperature=temperature, cfg_scale=cfg_scale)
    if gen_length % block_length:
        raise InputError(
            f"gen_length={gen_length} is not a multiple of block_length={block_length}: choose a "
            "block_length that divides gen_length"
        )
    blocks = gen_length // block_length
    if steps % blocks:
        raise InputError(
            f"steps={steps} cannot be split equally over {blocks} blocks (gen_length / block_length): "
            f"use a multiple of {blocks}, e.g. {blocks * max(1, steps // blocks)}"
        )
    return blocks


@dataclass
class ImageSettings:
    """How `dimoo_npu.sampling.sample_image` runs (see SPEC "Image sampling" and "ML-Cache")."""

    timesteps: int = 64
    temperature: float = 1.0
    cfg_scale: float = 4.0
    cfg_img: float = 0.0
    use_cache: bool = False
    cache_ratio: float = 0.9
    warmup_ratio: float = 0.3
    refresh_interval: int = 5

    def check(self) -> ImageSettings:
        settings = self.sampler_kwargs()
        del settings["use_cache"]
        check_image_settings(**settings)
        return self

    def sampler_kwargs(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TextSettings:
    """How `dimoo_npu.sampling.sample_text` runs (see SPEC "Understanding sampling")."""

    gen_length: int = 1024
    block_length: int = 256
    steps: int = 128
    temperature: float = 0.0
    cfg_scale: float = 0.0

    def check(self) -> TextSettings:
        check_text_settings(**self.sampler_kwargs())
        return self

    def sampler_kwargs(self) -> dict[str, Any]:
        return asdict(self)
