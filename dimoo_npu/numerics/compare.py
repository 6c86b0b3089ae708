"""Layer-by-layer comparison of two runs: max abs error, max relative error, cosine similarity, pass/fail.

A layer passes when every value is finite in both runs, ``max_abs <= atol + rtol * ref_scale`` and
``cosine >= min_cosine``, where ``ref_scale`` is the reference layer's largest magnitude. The error is
judged against the layer's scale, not element by element, because hidden states of large
transformers hold a few huge activations next to many near-zero ones: an element-wise relative error
is dominated by values that do not matter. ``max_rel`` reports the same ratio, ``max_abs / ref_scale``.
Only real (unpadded) token positions are compared: a fused kernel may leave padded queries undefined.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import torch

from dimoo_npu.errors import InputError


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    min_cosine: float


# Judgement calls, about 16-20 units of round-off of each dtype relative to the layer's scale (fp32 2^-24,
# fp16 2^-11, bf16 2^-8). Measured on tiny-dimoo (2 layers), cpu vs cpu-ref, lengths 16-256: fp32 max_rel
# 2e-6; fp16 up to 3.5e-3 (cosine 0.999999); bf16 up to 2.8e-2 (cosine 0.99992) at the logits. Deeper models
# accumulate more: calibrate on the real checkpoint and change them per run with --atol/--rtol/--min-cosine.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(atol=1e-4, rtol=1e-4, min_cosine=0.99999),
    "float16": Tolerance(atol=1e-3, rtol=1e-2, min_cosine=0.9999),
    "bfloat16": Tolerance(atol=1e-2, rtol=6e-2, min_cosine=0.999),
}


def parse_per_dtype(spec: str | None, option: str) -> dict[str, float]:
    """``"1e-3"`` (every dtype) or ``"float32=1e-4,bfloat16=2e-2"`` -> {dtype: value}."""
    if not spec:
        return {}
    try:
        if "=" not in spec:
            return dict.fromkeys(DEFAULT_TOLERANCES, float(spec))
        values = {}
        for item in spec.split(","):
            dtype, _, value = item.partition("=")
            dtype = dtype.strip()
            if dtype not in DEFAULT_TOLERANCES:
                raise InputError(f"{option}: unknown dtype {dtype!r}; use one of {', '.join(DEFAULT_TOLERANCES)}")
            values[dtype] = float(value)
        return values
    except ValueError as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{option} {spec!r} is not a number or dtype=number list, e.g. 'bfloat16=2e-2'") from None


def tolerance_for(
    dtype: str, atol: str | None = None, rtol: str | None = None, min_cosine: float | None = None
) -> Tolerance:
    """The default tolerance of ``dtype`` with any command-line overrides applied."""
    tol = DEFAULT_TOLERANCES[dtype]
    overrides = {
        "atol": parse_per_dtype(atol, "--atol").get(dtype),
        "rtol": parse_per_dtype(rtol, "--rtol").get(dtype),
        "min_cosine": min_cosine,
    }
    return replace(tol, **{key: value for key, value in overrides.items() if value is not None})


@dataclass(frozen=True)
class LayerDiff:
    layer: str
    max_abs: float
    max_rel: float
    cosine: float
    passed: bool
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def compare_layer(name: str, reference: torch.Tensor, other: torch.Tensor, tol: Tolerance) -> LayerDiff:
    """Compare one layer's outputs (same shape, fp32) against ``tol``."""
    if reference.shape != other.shape:
        return LayerDiff(
            name, float("inf"), float("inf"), float("nan"), False, f"shape {other.shape} != {reference.shape}"
        )
    ref, out = reference.double().flatten(), other.double().flatten()
    finite = bool(torch.isfinite(ref).all() and torch.isfinite(out).all())
    if not finite:
        return LayerDiff(name, float("nan"), float("nan"), float("nan"), False, "non-finite values (nan/inf)")
    max_abs = float((ref - out).abs().max()) if ref.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    cosine = float(torch.nn.functional.cosine_similarity(ref, out, dim=0, eps=1e-30)) if ref.numel() else 1.0
    if max_abs == 0:
        cosine = 1.0  # identical outputs, also when both are all zeros
    passed = max_abs <= tol.atol + tol.rtol * scale and cosine >= tol.min_cosine
    return LayerDiff(name, max_abs, max_rel, cosine, passed)


def real_positions(outputs: Mapping[str, torch.Tensor], attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keep the rows of real tokens: (B, L, C) -> (N, C), N = number of True entries of the mask."""
    keep = attention_mask.bool().cpu()
    return {name: tensor[keep] for name, tensor in outputs.items()}


def compare_runs(
    reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], names: list[str], tol: Tolerance
) -> list[LayerDiff]:
    """Compare the layers both runs have, in ``names`` order (a run may lack per-layer outputs)."""
    return [compare_layer(name, reference[name], other[name], tol) for name in names if name in other]


def first_failure(diffs: list[LayerDiff]) -> str | None:
    return next((diff.layer for diff in diffs if not diff.passed), None)
