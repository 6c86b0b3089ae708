"""Layer-by-layer comparison of two runs: max abs error, max relative error, cosine similarity, pass/fail.

A layer passes when every value is finite in both runs, ``max_abs <= atol + rtol * ref_scale`` and
``cosine >= min_cosine``, where ``ref_scale`` is the reference layer's largest magnitude (why: see
`dimoo_npu.numerics.tolerances`). ``max_rel`` reports the same ratio, ``max_abs / ref_scale``.
Only real (unpadded) token positions are compared: a fused kernel may leave padded queries undefined.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from dimoo_npu.numerics.tolerances import Tolerance


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
