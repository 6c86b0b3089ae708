"""Fake int8 ops ``npu_dynamic_quant``, ``npu_quant_matmul`` and ``npu_weight_quant_batchmatmul`` on CPU tensors.

Docs: Ascend/op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_dynamic_quant.md,
torch_npu-npu_quant_matmul.md and torch_npu-npu_weight_quant_batchmatmul.md (Atlas A2/A3 rows; signatures from
their 函数原型 sections). Only the int8 paths this package uses are computed; the other documented modes (int4,
smooth_scales groups, offsets, output quantization, per-group) are refused, so a caller cannot rely on them here.
Integer products are exact (int64 on CPU); scales apply in fp32 and the output is rounded once.

The functions below keep the documented Python prototypes; the package exposes them as dispatcher ops
(``OPS``: ``torch.ops.npu.<op>``, each with its Meta function), as the real torch_npu does, so graph mode
records them as single nodes.
"""

from __future__ import annotations

import torch
from fake_npu_op_library import define

from torch_npu._checks import check

HALF_DTYPES = (torch.float16, torch.bfloat16)
MAX_INNER = 65535  # quant_matmul: x1/x2 last dim at most 65535; weight_quant_batchmatmul: K, N in [1, 65535]
# npu_quant_matmul, Atlas A2/A3 table 2: (scale dtypes, pertoken_scale dtypes) per output dtype, int8 inputs, no
# offset. An int64 scale (npu_trans_quant_param) is left out: this package passes float scales.
QUANT_MATMUL_COMBOS = {
    torch.bfloat16: ({torch.float32, torch.bfloat16}, {torch.float32, None}),
    torch.float16: ({torch.float32}, {torch.float32, None}),
}


def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                      dst_type_max=0.0):  # fmt: skip
    """Per-token symmetric int8: scale = rowMax(|x|) / 127 (fp32, shape input.shape[:-1]), y = round(x / scale).

    Doc: input float16/bfloat16 only, more than one dim; dst_type None means int8; quant_mode other than
    "pertoken" and dst_type_max are 950-only (A2/A3: not supported).
    """
    check(input.dtype in HALF_DTYPES, f"npu_dynamic_quant: input dtype {input.dtype} is not float16/bfloat16")
    check(input.dim() > 1, f"npu_dynamic_quant: input must have more than 1 dim, got {input.dim()}")
    check(dst_type in (None, torch.int8), f"npu_dynamic_quant: dst_type {dst_type} is not int8 (fake: int8 only)")
    check(quant_mode == "pertoken", f"npu_dynamic_quant: quant_mode {quant_mode!r} is 950-only; A2/A3: pertoken")
    check(smooth_scales is None and group_index is None, "npu_dynamic_quant: smooth_scales/group_index not faked")
    x = input.float()
    scale = x.abs().amax(dim=-1) / 127.0
    # A row of zeros: the kernel's 0/0 is not documented; any finite scale gives y = 0, which is all that matters.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = torch.round(x / safe[..., None]).clamp(-128, 127).to(torch.int8)
    return y, scale


def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                     group_sizes=None):  # fmt: skip
    """out = (x1 @ x2) * scale [* pertoken_scale per row of x1], in ``output_dtype`` (None: int8, requantised).

    Doc: x1 (.., m, k) and x2 (.., k, n) int8, 2-6 dims, k <= 65535; scale 1-D (1,) or (n,); pertoken_scale
    float32 1-D (m,); output dtype and scale dtype as in table 2 (`QUANT_MATMUL_COMBOS`). Here x1 must be 2-D when
    pertoken_scale is given (the doc states its shape for an (m, k) x1 only).
    """
    for name, t in (("x1", x1), ("x2", x2)):
        check(t.dtype == torch.int8, f"npu_quant_matmul: {name} dtype {t.dtype} is not int8 (fake: no int4 path)")
        check(2 <= t.dim() <= 6, f"npu_quant_matmul: {name} must have 2-6 dims, got {t.dim()}")
    k, n = x2.shape[-2], x2.shape[-1]
    check(x1.shape[-1] == k, f"npu_quant_matmul: x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)} disagree on k")
    check(k <= MAX_INNER and n <= MAX_INNER, f"npu_quant_matmul: last dims of x1/x2 must be <= {MAX_INNER}")
    check(offset is None and bias is None and group_sizes is None, "npu_quant_matmul: offset/bias/groups not faked")
    check(output_dtype in QUANT_MATMUL_COMBOS, f"npu_quant_matmul: output_dtype {output_dtype} not faked")
    scale_dtypes, pertoken_dtypes = QUANT_MATMUL_COMBOS[output_dtype]
    check(
        scale.dim() == 1 and scale.shape[0] in (1, n),
        f"npu_quant_matmul: scale must be 1-D (1,) or (n,) = ({n},), got {tuple(scale.shape)}",
    )
    check(scale.dtype in scale_dtypes, f"npu_quant_matmul: scale dtype {scale.dtype} with output {output_dtype}")
    pertoken_dtype = None if pertoken_scale is None else pertoken_scale.dtype
    check(
        pertoken_dtype in pertoken_dtypes,
        f"npu_quant_matmul: pertoken_scale dtype {pertoken_dtype} with output {output_dtype} is not supported",
    )
    product = torch.matmul(x1.long(), x2.long()).float()  # exact integer sums, then fp32
    out = product * scale.float()
    if pertoken_scale is not None:
        m = x1.shape[-2]
        check(
            x1.dim() == 2 and pertoken_scale.dim() == 1 and pertoken_scale.shape[0] == m,
            f"npu_quant_matmul: pertoken_scale must be 1-D (m,) = ({m},) for a 2-D x1, "
            f"got {tuple(pertoken_scale.shape)} with x1 {tuple(x1.shape)}",
        )
        out = out * pertoken_scale.float()[:, None]
    return out.to(output_dtype)


def npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                 quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0):  # fmt: skip
    """y = x @ ((weight + antiquant_offset) * antiquant_scale), in x's dtype.

    Doc: x (M, K) float16/bfloat16; weight (K, N) int8 (a transposed (N, K) view is the recommended per-channel
    input); antiquant_scale per-tensor (1,)/(1, 1) or per-channel (N,)/(1, N) in x's dtype (single-op mode);
    K, N in [1, 65535]; no empty tensors.
    """
    check(x.dtype in HALF_DTYPES, f"npu_weight_quant_batchmatmul: x dtype {x.dtype} is not float16/bfloat16")
    check(x.dim() == 2 and weight.dim() == 2, "npu_weight_quant_batchmatmul: x and weight must be 2-D (M, K), (K, N)")
    check(weight.dtype == torch.int8, f"npu_weight_quant_batchmatmul: weight dtype {weight.dtype} is not int8")
    k, n = weight.shape
    check(x.shape[1] == k, f"npu_weight_quant_batchmatmul: x {tuple(x.shape)} and weight {tuple(weight.shape)} (K, N)")
    check(x.numel() > 0 and weight.numel() > 0, "npu_weight_quant_batchmatmul: empty tensors are not supported")
    check(
        1 <= k <= MAX_INNER and 1 <= n <= MAX_INNER, f"npu_weight_quant_batchmatmul: K, N must be in [1, {MAX_INNER}]"
    )
    check(
        antiquant_scale.dtype == x.dtype,
        f"npu_weight_quant_batchmatmul: antiquant_scale dtype {antiquant_scale.dtype} must equal x's {x.dtype}",
    )
    check(
        tuple(antiquant_scale.shape) in {(1,), (1, 1), (n,), (1, n)},
        f"npu_weight_quant_batchmatmul: antiquant_scale {tuple(antiquant_scale.shape)} is not (1,), (1, 1), "
        f"({n},) or (1, {n})",
    )
    check(
        antiquant_offset is None and quant_scale is None and quant_offset is None and bias is None,
        "npu_weight_quant_batchmatmul: offsets, output quantization and bias are not faked",
    )
    check(antiquant_group_size == 0, "npu_weight_quant_batchmatmul: per-group mode is not faked")
    dequantised = weight.float() * antiquant_scale.float().reshape(1, -1)  # (K, N), scale per column n
    return (x.float() @ dequantised).to(x.dtype)


# --- the dispatcher side: ``torch_npu.<op>`` is ``torch.ops.npu.<op>`` (see fake_npu_op_library) ------------------
# Schemas verbatim from op-plugin op_plugin/config/op_plugin_functions.yaml (commit 517f2e7d); dtype arguments are
# ``int?`` there, so a torch.dtype passed to the op reaches the kernel as its c10::ScalarType value.
SCHEMAS = {
    "npu_dynamic_quant": "npu_dynamic_quant(Tensor input, *, Tensor? smooth_scales=None, Tensor? group_index=None, "
    'int? dst_type=None, str quant_mode="pertoken", float dst_type_max=0.0) -> (Tensor, Tensor)',
    "npu_quant_matmul": "npu_quant_matmul(Tensor x1, Tensor x2, Tensor scale, *, Tensor? offset=None, "
    "Tensor? pertoken_scale=None, Tensor? bias=None, int? output_dtype=None, int? x1_dtype=None, int? x2_dtype=None, "
    "int? pertoken_scale_dtype=None, int? scale_dtype=None, int[]? group_sizes=None, Tensor? y_scale=None) -> Tensor",
    "npu_weight_quant_batchmatmul": "npu_weight_quant_batchmatmul(Tensor x, Tensor weight, Tensor antiquant_scale, "
    "Tensor? antiquant_offset=None, Tensor? quant_scale=None, Tensor? quant_offset=None, Tensor? bias=None, "
    "int antiquant_group_size=0, int inner_precise=0, int? weight_dtype=None) -> Tensor",
}
SCALAR_TYPES = {1: torch.int8, 5: torch.float16, 6: torch.float32, 15: torch.bfloat16}  # c10/core/ScalarType.h


def _dtype(value):
    return SCALAR_TYPES.get(value, value) if isinstance(value, int) else value


def _dynamic_quant_kernel(input, *, dst_type=None, **kwargs):
    return npu_dynamic_quant(input, dst_type=_dtype(dst_type), **kwargs)


def _dynamic_quant_meta(input, **kwargs):
    """Meta function, pertoken int8: y like input, an fp32 scale over input's dims but the last."""
    return torch.empty_like(input, dtype=torch.int8), input.new_empty(input.shape[:-1], dtype=torch.float32)


def _quant_matmul_kernel(x1, x2, scale, *, output_dtype=None, x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None,
                         scale_dtype=None, y_scale=None, **kwargs):  # fmt: skip
    extras = (x1_dtype, x2_dtype, pertoken_scale_dtype, scale_dtype, y_scale)
    check(all(extra is None for extra in extras), "npu_quant_matmul: x1/x2/scale dtypes and y_scale are not faked")
    return npu_quant_matmul(x1, x2, scale, output_dtype=_dtype(output_dtype), **kwargs)


def _quant_matmul_meta(x1, x2, scale, *, output_dtype=None, **kwargs):
    """Meta function, int8 x1/x2: (broadcast batch, m, n) in output_dtype (None: int8)."""
    batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    return x1.new_empty((*batch, x1.shape[-2], x2.shape[-1]), dtype=_dtype(output_dtype) or torch.int8)


def _weight_quant_batchmatmul_kernel(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                     quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0,
                                     weight_dtype=None):  # fmt: skip
    check(weight_dtype is None, "npu_weight_quant_batchmatmul: weight_dtype is not faked")
    return npu_weight_quant_batchmatmul(
        x,
        weight,
        antiquant_scale,
        antiquant_offset,
        quant_scale,
        quant_offset,
        bias,
        antiquant_group_size,
        inner_precise,
    )


def _weight_quant_batchmatmul_meta(x, weight, *args, **kwargs):
    """Meta function, int8 weight without quant_scale: (M, N) in x's dtype."""
    return x.new_empty((x.shape[0], weight.shape[1]), dtype=x.dtype)


OPS = {
    name: define(SCHEMAS[name], kernel, meta)
    for name, kernel, meta in (
        ("npu_dynamic_quant", _dynamic_quant_kernel, _dynamic_quant_meta),
        ("npu_quant_matmul", _quant_matmul_kernel, _quant_matmul_meta),
        ("npu_weight_quant_batchmatmul", _weight_quant_batchmatmul_kernel, _weight_quant_batchmatmul_meta),
    )
}
