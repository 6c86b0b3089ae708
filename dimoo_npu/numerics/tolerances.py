"""Every numerical tolerance of the package, in one table: which error each check accepts, per dtype.

A check compares an output against a reference run on the same inputs. The rows differ in what they
measure, so each says how its numbers are applied:

- ``op``: one op against its reference kernel, element by element: ``|out - ref| <= atol + rtol * |ref|``.
- ``pixels``: decoded uint8 images, element by element, in levels of 255 (the ``op`` formula with atol in levels).
- ``layer``, ``onnxruntime``, ``golden``: a whole layer or the logits, against the layer's scale:
  ``max|out - ref| <= atol + rtol * max|ref|`` and ``cosine(out, ref) >= min_cosine``
  (`dimoo_npu.numerics.compare.compare_layer`). Hidden states hold a few huge activations next to many
  near-zero ones, so an element-wise relative error would be dominated by values that do not matter.
  One model run two ways on one device (fused vs plain layout, padded vs alone, another thread count or SIMD
  width) differs in summation order and in which elements take a vector kernel's scalar tail: such runs are
  compared by the fp32 ``layer`` row, never bit for bit (their greedy tokens are still compared exactly).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from dimoo_npu.utils.errors import InputError


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    min_cosine: float = -1.0  # -1: no bound on the cosine


# `dimoo check`, backend against backend: judgement calls of about 16-20 units of round-off of each dtype relative to
# the layer's scale. Deeper models accumulate more: calibrate on the real checkpoint and change them per run with
# --atol/--rtol/--min-cosine.
_LAYER = {
    "float32": Tolerance(atol=1e-4, rtol=1e-4, min_cosine=0.99999),
    "float16": Tolerance(atol=1e-3, rtol=1e-2, min_cosine=0.9999),
    "bfloat16": Tolerance(atol=1e-2, rtol=6e-2, min_cosine=0.999),
}
TOLERANCES: dict[str, dict[str, Tolerance]] = {
    # fp32: the reference accumulates in fp32 too, so only summation order differs. Reduced precision: the
    # reference rounds once, an implementation may round an intermediate too (torch's swiglu rounds silu(gate)
    # before the product), so two roundings of the dtype, plus an atol for values near 0.
    "op": {
        "float32": Tolerance(atol=1e-5, rtol=1e-5),
        "bfloat16": Tolerance(atol=1e-2, rtol=2 * 2**-8),  # 8 significant bits
        "float16": Tolerance(atol=1e-3, rtol=2 * 2**-11),  # 11 significant bits
    },
    "layer": _LAYER,
    # An int8 model (keyed by scheme) against the fp32 model, layer by layer (`dimoo check --quantize`, or an int8
    # checkpoint against its source). Not round-off but the quantization itself: a weight rounded to 1/254 of its
    # row's range, a w8a8 activation to 1/254 of its token's, and the blocks add their errors up. Measured (fp32,
    # 2 x 64 tokens, worst layer, max-abs error / max |ref|, cosine): the bundled shapes model (d 256, trained)
    # w8a16 1.7% / 0.99995, w8a8 6.5% / 0.9996; the tiny fixture (d 32, random weights: 32-wide rows round worst)
    # w8a16 13% / 0.9991, w8a8 15% / 0.9980. The bounds hold the tiny fixture with some room; a kernel bug (a lost
    # scale, a transposed weight) gives errors of the order of the layer's scale and cosines far below these.
    "int8": {
        "w8a16": Tolerance(atol=1e-3, rtol=0.2, min_cosine=0.998),
        "w8a8": Tolerance(atol=1e-3, rtol=0.25, min_cosine=0.995),
    },
    # onnxruntime against torch (same dtype, reference ops): fp16 graphs by the layer rule; onnxruntime's CPU
    # kernels run no bfloat16 graph.
    "onnxruntime": {"float32": Tolerance(atol=1e-4, rtol=0.0, min_cosine=0.99999), "float16": _LAYER["float16"]},
    # The tiny model against the public reference code's goldens (fp32 logits and hidden states: cases.json
    # forward.atol_fp32). Reduced precision, image logits only: about a dozen roundings per block add up to a few
    # percent of the logit range in bf16 (8 significant bits), 8x less in fp16; the cosine catches errors spread
    # over many logits that the max-abs bound alone would let pass.
    "golden": {
        "float32": Tolerance(atol=2e-4, rtol=0.0),
        "bfloat16": Tolerance(atol=0.0, rtol=0.06, min_cosine=0.999),
        "float16": Tolerance(atol=0.0, rtol=0.008, min_cosine=0.99999),
    },
    # A decoded image rounds fp32 to uint8 levels, so round-off that differs with the thread count or SIMD width
    # (ATEN_CPU_CAPABILITY) can move a value across a rounding boundary: one level.
    "pixels": {"float32": Tolerance(atol=1.0, rtol=0.0)},
    # A value or gradient against the same formula written out term by term (dimoo_npu.rl's log-likelihoods and
    # GRPO gradients against autograd of the explicit sums), element by element as ``op``: fp32 on both sides, only
    # the summation order and the batch's padding differ.
    "explicit": {"float32": Tolerance(atol=1e-6, rtol=1e-4)},
}
GOLDEN_LOSS_ATOL = 1e-4  # cases.json loss.atol_fp32: the scalar loss against the golden's


def tolerance(check: str, dtype: torch.dtype | str) -> Tolerance:
    """The row of ``check`` for ``dtype``; a dtype the check cannot judge is refused with the ones it can."""
    name, rows = (dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")), TOLERANCES[check]
    if name not in rows:
        raise InputError(f"the {check} check has no tolerance for {name}: use one of {', '.join(rows)}")
    return rows[name]


def parse_per_dtype(spec: str | None, option: str) -> dict[str, float]:
    """``"1e-3"`` (every dtype) or ``"float32=1e-4,bfloat16=2e-2"`` -> {dtype: value}."""
    if not spec:
        return {}
    try:
        if "=" not in spec:
            return dict.fromkeys(_LAYER, float(spec))
        values = {}
        for item in spec.split(","):
            dtype, _, value = item.partition("=")
            dtype = dtype.strip()
            if dtype not in _LAYER:
                raise InputError(f"{option}: unknown dtype {dtype!r}; use one of {', '.join(_LAYER)}")
            values[dtype] = float(value)
        return values
    except ValueError as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{option} {spec!r} is not a number or dtype=number list, e.g. 'bfloat16=2e-2'") from None


def tolerance_for(
    dtype: str,
    atol: str | None = None,
    rtol: str | None = None,
    min_cosine: float | None = None,
    scheme: str | None = None,
) -> Tolerance:
    """The ``layer`` tolerance of ``dtype`` (an int8 ``scheme``: its ``int8`` row) with any command-line overrides
    applied (`dimoo check`)."""
    overrides = {
        "atol": parse_per_dtype(atol, "--atol").get(dtype),
        "rtol": parse_per_dtype(rtol, "--rtol").get(dtype),
        "min_cosine": min_cosine,
    }
    base = tolerance("int8", scheme) if scheme else tolerance("layer", dtype)
    return replace(base, **{key: value for key, value in overrides.items() if value is not None})
