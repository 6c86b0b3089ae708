"""Fused-op dispatch: one signature per op, a CPU reference kernel and per-backend implementations.

Implementations are chosen once (`resolve_ops`) when a model is built and kept as plain callables,
so torch.compile and graph capture see static code.

Op signatures (shapes use B batch, H heads, L/Lq/Lk lengths, D head dim, C channels):
- ``attention(q, k, v, key_padding_mask, scale) -> out``: q (B, H, Lq, D), k/v (B, H, Lk, D),
  key_padding_mask (B, Lk) bool, True = real key, or None; bidirectional; out (B, H, Lq, D).
- ``rms_norm(x, weight, eps) -> y``: normalise over the last dim, eps inside the square root.
- ``rotary(x, cos, sin) -> y``: x (B, H, L, D), cos/sin (B or 1, 1, L, D) fp32 holding the angle of
  pair (i, i + D/2) at both i and i + D/2 ("rotate half", NeoX convention).
- ``swiglu(gate, up) -> silu(gate) * up``.
"""

from dimoo_npu.ops.registry import OP_NAMES, OpSet, available_implementations, resolve_ops

__all__ = ["OP_NAMES", "OpSet", "available_implementations", "resolve_ops"]
