"""The one table of generation defaults, and the sampling settings, checked up front so bad values fail before any
model loads. A request's unset field takes the checkpoint's ``generation_defaults``, else `DEFAULTS`
(`dimoo_npu.settings.requests.resolve`); `ImageSettings` and `TextSettings` default to the same table's values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dimoo_npu.utils.errors import InputError
from dimoo_npu.utils.validate import SCALE_LIMIT, shown

# The public inference scripts' values (inference_t2i.py, inference_i2i.py, inference_mmu.py; the painting boxes
# are the public README's examples; image_budget 0 keeps the input's size, cropped to multiples of 16).
_IMAGE_SAMPLING = {
    "timesteps": 64,
    "temperature": 1.0,
    "cfg_scale": 4.0,
    "use_cache": False,
    "cache_ratio": 0.9,
    "warmup_ratio": 0.3,
    "refresh_interval": 5,
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "t2i": {**_IMAGE_SAMPLING, "width": 1024, "height": 1024},
    "edit": {**_IMAGE_SAMPLING, "cfg_scale": 2.5, "cfg_img": 4.0, "image_budget": 512, "edit_type": "edit"},
    "inpaint": {**_IMAGE_SAMPLING, "mask_h_ratio": 0.5, "mask_w_ratio": 0.5, "image_budget": 0},
    "outpaint": {**_IMAGE_SAMPLING, "mask_h_ratio": 1.0, "mask_w_ratio": 0.2, "image_budget": 0},
    "understand": {
        "gen_length": 1024,
        "block_length": 256,
        "steps": 128,
        "temperature": 0.0,
        "cfg_scale": 0.0,
        "image_budget": 1024,
        "kv_cache": "none",  # the exact algorithm; see KV_CACHE_MODES
        "parallel_threshold": None,  # None: the schedule's count per step, exactly
    },
}
# Understanding's K/V cache modes: "none" recomputes every position at every step (exact); "prefix" reuses the
# prompt's K/V within a block; "dual" also reuses the later blocks', recomputing only the current block.
KV_CACHE_MODES = ("none", "prefix", "dual")
# What --fast sets (explicit flags win): the measured recommended pair (README "Fast understanding").
FAST_UNDERSTANDING = {"kv_cache": "dual", "parallel_threshold": 0.95}
_T2I, _UNDERSTAND = DEFAULTS["t2i"], DEFAULTS["understand"]

# Text-to-image settings of `dimoo bench` by name. "lumina-dimoo": the public README's benchmark-scale command
# (inference_t2i_ddp: 1024 x 1024, --timesteps 64, --cfg_scale 4.0, no ML-Cache; the sampler's temperature 1.0)
# with the README's --seed 65513 as the base seed, and the paper's "for image generation, we sample 64 steps"
# (shared/seeds/002, 004). "checkpoint": the checkpoint's generation_defaults, for small models.
BENCH_PRESETS: dict[str, dict[str, Any]] = {
    "lumina-dimoo": {
        "width": 1024,
        "height": 1024,
        "timesteps": 64,
        "cfg_scale": 4.0,
        "temperature": 1.0,
        "use_cache": False,
        "seed": 65513,
    },
    "checkpoint": {},
}

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
    """Guidance scales and temperatures are in [0, SCALE_LIMIT] (0 switches guidance off / samples greedily;
    past the limit the scaled logits overflow)."""
    for name, value in values.items():
        if not value >= 0:
            hint = _NOT_NEGATIVE_HINTS.get(name, "use a value >= 0")
            raise InputError(f"{name}={value} is negative: {hint}")
        if value > SCALE_LIMIT:
            raise InputError(f"{name}={shown(value)} is over the maximum of {SCALE_LIMIT:g}: use e.g. 4")


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


def check_text_settings(
    gen_length: int,
    block_length: int,
    steps: int,
    temperature: float,
    cfg_scale: float,
    kv_cache: str = "none",
    parallel_threshold: float | None = None,
) -> int:
    """The checks `sample_text` runs; returns the number of answer blocks (LLaDA splits steps equally)."""
    check_positive(gen_length=gen_length, block_length=block_length, steps=steps)
    check_not_negative(temperature=temperature, cfg_scale=cfg_scale)
    check_cache_settings(kv_cache, parallel_threshold)
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


def check_cache_settings(kv_cache: str, parallel_threshold: float | None) -> None:
    """A known K/V cache mode, and a confidence threshold in (0, 1] or None (off)."""
    if kv_cache not in KV_CACHE_MODES:
        raise InputError(f"kv_cache={kv_cache!r} is not a cache mode: use one of {', '.join(KV_CACHE_MODES)}")
    if parallel_threshold is not None and (isinstance(parallel_threshold, bool) or not 0 < parallel_threshold <= 1):
        raise InputError(
            f"parallel_threshold={parallel_threshold!r} must be within (0, 1] (a confidence), or unset for exact "
            "decoding: e.g. 0.9"
        )


@dataclass
class ImageSettings:
    """How `dimoo_npu.sampling.sample_image` runs (see SPEC "Image sampling" and "ML-Cache")."""

    timesteps: int = _T2I["timesteps"]
    temperature: float = _T2I["temperature"]
    cfg_scale: float = _T2I["cfg_scale"]
    cfg_img: float = 0.0  # only editing has an image guidance branch
    use_cache: bool = _T2I["use_cache"]
    cache_ratio: float = _T2I["cache_ratio"]
    warmup_ratio: float = _T2I["warmup_ratio"]
    refresh_interval: int = _T2I["refresh_interval"]

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

    gen_length: int = _UNDERSTAND["gen_length"]
    block_length: int = _UNDERSTAND["block_length"]
    steps: int = _UNDERSTAND["steps"]
    temperature: float = _UNDERSTAND["temperature"]
    cfg_scale: float = _UNDERSTAND["cfg_scale"]
    kv_cache: str = _UNDERSTAND["kv_cache"]
    parallel_threshold: float | None = _UNDERSTAND["parallel_threshold"]

    def check(self) -> TextSettings:
        check_text_settings(**self.sampler_kwargs())
        return self

    def sampler_kwargs(self) -> dict[str, Any]:
        return asdict(self)
