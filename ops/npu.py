"""Ascend kernels: the ops on torch_npu's fused operators, with their documented contracts.

torch_npu is imported lazily, on the first call, through `dimoo_npu.adapters.npu.import_torch_npu`,
so importing this module (or choosing ``npu`` on a machine without CANN) never loads vendor code early.
Contracts (Ascend/op-plugin, docs/zh/custom_APIs/torch_npu/ and op_plugin/config/op_plugin_functions.yaml):

- ``npu_fusion_attention`` returns a 7-tuple; ``[0]`` is the output. ``atten_mask`` True/1 = masked OUT
  (the opposite of our key_padding_mask), shapes BNSS/B1SS/11SS/SS only; ``scale`` defaults to 1.0.
- ``npu_rms_norm`` returns ``(y, rstd)``; eps is the ``epsilon`` keyword, inside the square root.
- ``npu_rotary_mul`` 'half' mode is the rotate-half (NeoX) convention with r1 = cos, r2 = sin.
- ``npu_swiglu`` gates with the FIRST half: ``silu(x[..., :h]) * x[..., h:]``.
- ``npu_add_rms_norm(x1, x2, gamma, epsilon)`` returns ``(y, rstd, x1 + x2)`` and has NO backward: inference only
  (the model uses it only in its fused inference layout, see `dimoo_npu.model.fuse_projections`).
- int8 (docs torch_npu-npu_dynamic_quant.md, -npu_quant_matmul.md, -npu_weight_quant_batchmatmul.md): inputs in
  fp16/bf16 only; ``npu_quant_matmul``'s x2 and ``npu_weight_quant_batchmatmul``'s weight are (K, N); K, N <= 65535.
"""

from __future__ import annotations

import torch

from dimoo_npu.adapters.npu import import_torch_npu
from dimoo_npu.ops import reference

# Layout of the (B, H, L, D) tensors the model hands us: "BNSD" in torch_npu's naming (N = heads).
ATTENTION_LAYOUT = "BNSD"


def attention_mask_for_npu(key_padding_mask: torch.Tensor, query_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch_npu's ``atten_mask`` (B, 1, Lq, Lk) bool, True = masked out, and which rows have a real key (B,).

    A row whose keys are all padding would be an "invalid row" for the kernel (the docs warn of precision
    loss there, and forbid it outright in varlen mode), so such rows are given a mask that hides nothing;
    `attention` then replaces their output. B11S is not an accepted shape, hence the expand over Lq.
    """
    real = key_padding_mask.bool()  # (B, Lk), True = real key
    has_key = real.any(dim=-1)  # (B,)
    hidden = ~real & has_key[:, None]  # (B, Lk), True = masked out
    batch, keys = hidden.shape
    return hidden[:, None, None, :].expand(batch, 1, query_length, keys).contiguous(), has_key  # (B, 1, Lq, Lk)


def attention_mask(key_padding_mask: torch.Tensor, query_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_mask_for_npu`, made once per forward rather than once per block (it copies B * Lq * Lk bools)."""
    return attention_mask_for_npu(key_padding_mask, query_length)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask, scale: float) -> torch.Tensor:
    """Bidirectional attention on ``npu_fusion_attention`` (BNSD); a row with no real key attends uniformly.

    key_padding_mask: (B, Lk) bool, or what `attention_mask` made of it (rebuilt if made for another Lq, as
    under sequence parallelism, where the residual stream the model sees is a slice of the queries).
    """
    torch_npu = import_torch_npu()
    heads = q.shape[1]
    if key_padding_mask is None:
        # No mask: full bidirectional attention (sparse_mode and the tockens band do not apply).
        return torch_npu.npu_fusion_attention(q, k, v, heads, ATTENTION_LAYOUT, scale=scale, keep_prob=1.0)[0]
    if isinstance(key_padding_mask, torch.Tensor):
        key_padding_mask = attention_mask_for_npu(key_padding_mask, q.shape[2])
    atten_mask, has_key = key_padding_mask
    if atten_mask.shape[2] != q.shape[2]:
        atten_mask = atten_mask[:, :, :1].expand(-1, -1, q.shape[2], -1).contiguous()
    out = torch_npu.npu_fusion_attention(
        q, k, v, heads, ATTENTION_LAYOUT, atten_mask=atten_mask, scale=scale, keep_prob=1.0, sparse_mode=0
    )[0]  # (B, H, Lq, D)
    return reference.uniform_where_no_key(out, v, has_key)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Documented (x, gamma) dtype pairs: equal dtypes, or fp16/bf16 x with fp32 gamma; anything else is cast.
    gamma = weight if weight.dtype in (x.dtype, torch.float32) else weight.to(x.dtype)
    return import_torch_npu().npu_rms_norm(x, gamma, epsilon=eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one kernel; no backward, so inference only."""
    y, _, summed = import_torch_npu().npu_add_rms_norm(x, residual, weight.to(x.dtype), epsilon=eps)
    return y, summed


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D) with cos/sin (B or 1, 1, L, D): the B1SD / 11SD broadcast of a BNSD input.

    LLaDA rotates q and k in fp32 whatever the model dtype (``rope_full_precision``). Handing the kernel a
    bf16 x with fp32 cos/sin would not keep that: op-plugin's RotaryMulKernelNpuOpApi.cpp casts r1/r2 to
    x's dtype when they differ, rounding the angles to 8 bits. So the kernel runs on fp32 inputs and only
    the result is rounded back, as in the reference; the cost is one up- and one down-cast of q and k.
    """
    out = import_torch_npu().npu_rotary_mul(x.float(), cos.float(), sin.float(), rotary_mode="half")
    return out.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # npu_swiglu splits its input in half along `dim` and applies silu to the first half: [gate, up].
    return swiglu_packed(torch.cat([gate, up], dim=-1))


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """The fused [gate, up] projection's output as is: no cat (the layout `fuse_projections` makes)."""
    return import_torch_npu().npu_swiglu(gate_up.contiguous(), dim=-1)


def quantized_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """The reference's ``quantized_matmul`` on torch_npu's int8 kernels; x (..., K), weight (N, K) int8.

    - ``w8a8``: ``npu_dynamic_quant`` rounds x per token (int8 + an fp32 scale per row), then ``npu_quant_matmul``
      multiplies int8 by int8 with the weight's fp32 scale (N,) and the tokens' as ``pertoken_scale`` (M,), the
      output in x's dtype (documented: bf16 or fp16 with fp32 scales).
    - ``w8a16``: ``npu_weight_quant_batchmatmul`` widens the weight inside the matmul; its ``antiquant_scale``
      must be in x's dtype (single-op mode), so the fp32 scale is rounded to it (under one rounding of the output).

    Both take x as 2-D (M, K) and the weight as a (K, N) view of the stored (N, K) (the documented ``x2.t()``
    layout; no copy). Both take fp16/bf16 x only: fp32 x (an int8 `dimoo check` runs at fp32) goes through them in
    bf16 and is widened back, so the check still measures these kernels; bf16's rounding is far inside the int8
    tolerance rows.
    """
    if x.dtype not in (torch.float16, torch.bfloat16):
        return quantized_matmul(x.to(torch.bfloat16), weight, weight_scale, scheme).to(x.dtype)
    torch_npu = import_torch_npu()
    flat = x.reshape(-1, x.shape[-1])
    if scheme == "w8a8":
        q, token_scale = torch_npu.npu_dynamic_quant(flat)
        out = torch_npu.npu_quant_matmul(
            q, weight.t(), weight_scale.float(), pertoken_scale=token_scale, output_dtype=x.dtype
        )
    else:
        out = torch_npu.npu_weight_quant_batchmatmul(flat, weight.t(), weight_scale.to(x.dtype))
    return out.view(*x.shape[:-1], weight.shape[0])
