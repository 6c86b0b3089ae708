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
