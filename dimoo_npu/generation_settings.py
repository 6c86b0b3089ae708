"""Sampling settings of the generation tasks, checked up front so bad values fail before any model loads.

Defaults follow the public inference scripts: text-to-image and painting 64 steps at CFG 4.0, editing
CFG 2.5 with image CFG 4.0, understanding 128 steps over 1024 answer tokens in blocks of 256.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dimoo_npu.errors import InputError


def _check_steps(name: str, value: int) -> None:
    if value < 1:
        raise InputError(f"{name} is {value}: sampling needs at least 1 step (e.g. --{name.replace('_', '-')} 64)")


def _check_guidance(name: str, value: float) -> None:
    if value < 0:
        raise InputError(f"{name} is {value}: guidance scales cannot be negative (0 turns guidance off)")


def _check_temperature(value: float) -> None:
    if value < 0:
        raise InputError(f"temperature is {value}: use 0 (greedy) or a positive value")


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
        _check_steps("timesteps", self.timesteps)
        _check_guidance("cfg_scale", self.cfg_scale)
        _check_guidance("cfg_img", self.cfg_img)
        _check_temperature(self.temperature)
        if not 0.0 < self.cache_ratio < 1.0:
            raise InputError(f"cache_ratio {self.cache_ratio} is outside (0, 1): the share of positions reused")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise InputError(f"warmup_ratio {self.warmup_ratio} is outside [0, 1)")
        if self.refresh_interval < 1:
            raise InputError(f"refresh_interval {self.refresh_interval} must be at least 1")
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
        _check_steps("steps", self.steps)
        _check_guidance("cfg_scale", self.cfg_scale)
        _check_temperature(self.temperature)
        if self.gen_length < 1 or self.block_length < 1 or self.gen_length % self.block_length:
            raise InputError(
                f"gen_length {self.gen_length} must be a positive multiple of block_length {self.block_length}"
            )
        blocks = self.gen_length // self.block_length
        if self.steps % blocks:
            raise InputError(
                f"steps {self.steps} must be a multiple of the {blocks} answer blocks "
                f"(gen_length / block_length), e.g. {blocks * max(1, self.steps // blocks)}"
            )
        return self

    def sampler_kwargs(self) -> dict[str, Any]:
        return asdict(self)
