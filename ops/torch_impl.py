"""Stock PyTorch kernels (SDPA and friends): the fast path on CPU and CUDA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dimoo_npu.ops import reference


def attention_mask(key_padding_mask: torch.Tensor, query_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's boolean mask (B, 1, 1, Lk), True = visible, and which rows have a real key (B,); once per forward.

    A row with no real key would be all -inf for SDPA (zeros on CPU, NaN risk elsewhere): it sees every key, and
    `attention` then gives it the reference's answer for that case, uniform attention = the mean of v.
    """
    real = key_padding_mask.bool()
    has_key = real.any(dim=-1)  # (B,)
    return (real | ~has_key[:, None])[:, None, None, :], has_key


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask, scale: float) -> torch.Tensor:
    """key_padding_mask: (B, Lk) bool, or what `attention_mask` made of it."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if isinstance(key_padding_mask, torch.Tensor):
        key_padding_mask = attention_mask(key_padding_mask, q.shape[2])
    visible, has_key = key_padding_mask
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    return reference.uniform_where_no_key(out, v, has_key)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


# LLaDA rotates q and k in fp32 whatever the model dtype (`rope_full_precision`): keep that here.
rotary = reference.rotary


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    return swiglu(*gate_up.chunk(2, dim=-1))
