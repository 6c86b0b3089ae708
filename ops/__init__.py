"""Fused-op dispatch: one signature per op, a CPU reference kernel and per-backend implementations.

Implementations are chosen once (`resolve_ops`) when a model is built and kept as plain callables,
so torch.compile and graph capture see static code.

Op signatures (shapes use B batch, H heads, L/Lq/Lk lengths, D head dim, C channels):
- ``attention(q, k, v, key_padding_mask, scale) -> out``: q (B, H, Lq, D), k/v (B, H, Lk, D),
  key_padding_mask (B, Lk) bool, True = real key, or None; bidirectional; out (B, H, Lq, D). The model hands it
  ``attention_mask(key_padding_mask, Lq)`` instead, made once per forward in the kernel's own form.
- ``rms_norm(x, weight, eps) -> y``: normalise over the last dim, eps inside the square root.
- ``rotary(x, cos, sin) -> y``: x (B, H, L, D), cos/sin (B or 1, 1, L, D) fp32 holding the angle of
  pair (i, i + D/2) at both i and i + D/2 ("rotate half", NeoX convention).
- ``swiglu(gate, up) -> silu(gate) * up``.
- ``add_rms_norm(x, residual, weight, eps) -> (rms_norm(x + residual), x + residual)``: inference only (the
  npu kernel has no backward).
- ``swiglu_packed(gate_up) -> swiglu(*gate_up.chunk(2, -1))``: the fused [gate, up] projection as is.
- ``quantized_matmul(x, weight, weight_scale, scheme) -> F.linear(x, weight * weight_scale[:, None])``: weight
  (N, K) int8, weight_scale (N,) fp32 per output channel; scheme ``w8a8`` rounds x per token to int8 first,
  ``w8a16`` takes x as it is. Each implementation's kernel serves the devices `QUANTIZED_MATMUL_DEVICES` names
  (`require_quantized_matmul` refuses the others).
"""

from dimoo_npu.ops.registry import (
    OP_NAMES,
    OpSet,
    available_implementations,
    has_quantized_matmul,
    require_quantized_matmul,
    resolve_ops,
)

__all__ = [
    "OP_NAMES",
    "OpSet",
    "available_implementations",
    "has_quantized_matmul",
    "require_quantized_matmul",
    "resolve_ops",
]
