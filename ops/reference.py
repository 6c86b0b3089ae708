"""Pure-PyTorch reference kernels: fp32 accumulation, the ground truth every other kernel is tested against.

They are also what the ONNX exporter traces, so they use only plain tensor ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_mask(key_padding_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """The mask `attention` takes, made once per forward: here the key padding mask itself."""
    return key_padding_mask


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Bidirectional attention with padded keys removed; a row with no real key attends uniformly."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    if key_padding_mask is not None:
        hidden = ~key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, Lk)
        scores = scores.masked_fill(hidden, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)  # (B, H, Lq, D)


def uniform_where_no_key(out: torch.Tensor, v: torch.Tensor, has_key: torch.Tensor) -> torch.Tensor:
    """The reference's answer for rows (B,) with no real key, for kernels that cannot express it: mean of v."""
    uniform = v.float().mean(dim=-2, keepdim=True).to(out.dtype)  # (B, H, 1, D)
    return torch.where(has_key[:, None, None, None], out, uniform)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): a residual add that meets a norm; the sum is rounded to x's dtype."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * cos.float() + rotate_half(xf) * sin.float()).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """`swiglu` of a fused [gate, up] projection (gate first, as npu_swiglu splits it)."""
    return swiglu(*gate_up.chunk(2, dim=-1))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of the last dim: (q int8, scale fp32 (..., 1)) with x ~= q * scale, |q| <= 127.

    The one rounding rule of the int8 path: per output channel for weights, per token for w8a8 activations.
    A row of zeros gets scale 1 (q = 0), never a division by zero.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(xf / scale).clamp_(-127, 127).to(torch.int8), scale


def quantized_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """``F.linear(x, weight * weight_scale[:, None])`` for int8 ``weight`` (N, K) and fp32 ``weight_scale`` (N,).

    scheme ``w8a16``: x as it is; ``w8a8``: x rounded per token to int8 first (`quantize_rows`). Here both sides
    are dequantised and multiplied in fp32, the ground truth of the integer kernels; out (..., N) in x's dtype.
    """
    xf = x.float()
    if scheme == "w8a8":
        q, scale = quantize_rows(xf)
        xf = q.float() * scale
    return F.linear(xf, weight.float() * weight_scale.float()[:, None]).to(x.dtype)
