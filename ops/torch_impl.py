"""Stock PyTorch kernels (SDPA and friends): the fast path on CPU and CUDA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dimoo_npu.ops import reference


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    real = key_padding_mask.bool()
    has_key = real.any(dim=-1)  # (B,)
    # A row with no real key would be all -inf for SDPA (zeros on CPU, NaN risk elsewhere): let it see every key,
    # then give it the reference's answer for that case, uniform attention = the mean of v.
    visible = (real | ~has_key[:, None])[:, None, None, :]  # (B, 1, 1, Lk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    return reference.uniform_where_no_key(out, v, has_key)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


# LLaDA rotates q and k in fp32 whatever the model dtype (`rope_full_precision`): keep that here.
rotary = reference.rotary


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
