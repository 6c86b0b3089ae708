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


# The strictest shape rule torch._int_mm has on any build (CUDA's; CPU builds may accept more): more than 16 rows,
# inner and output sizes multiples of 8. Other shapes are padded with zeros up to it, which changes no sum.
INT_MM_MIN_ROWS = 17
INT_MM_MULTIPLE = 8
# Integers up to 2**24 are exact in fp32: a sum of at most this many int8 products (each at most 127**2 in size)
# stays below it in any order of summation, so fp32 matmuls over inner slices this wide are exact.
EXACT_FP32_TERMS = 2**24 // 127**2


@torch.compiler.assume_constant_result  # a fact of the host: graph mode takes it as a constant, not a graph break
def int_mm_is_fast(device: torch.device) -> bool:
    """torch._int_mm on CPU is fast with AVX-512 VNNI (oneDNN); without it, it falls back to a loop far slower
    than an fp32 matmul (50x on an AVX2 core), so `int8_matmul` takes the exact fp32 path there."""
    return device.type != "cpu" or torch.cpu._is_vnni_supported()


def int8_matmul(a: torch.Tensor, b: torch.Tensor, use_int_mm: bool | None = None) -> torch.Tensor:
    """a (M, K) int8 @ b (N, K) int8 transposed -> (M, N) int32, exact (no overflow for K < 2**17).

    ``use_int_mm`` (None: `int_mm_is_fast`): torch._int_mm, padded to its shape rule; else fp32 matmuls over inner
    slices of ``EXACT_FP32_TERMS``, each exact, summed in int32.
    """
    if use_int_mm if use_int_mm is not None else int_mm_is_fast(a.device):
        return _padded_int_mm(a, b)
    total = None
    for start in range(0, a.shape[1], EXACT_FP32_TERMS):
        inner = slice(start, start + EXACT_FP32_TERMS)
        part = F.linear(a[:, inner].float(), b[:, inner].float()).to(torch.int32)
        total = part if total is None else total.add_(part)
    return total


def _padded_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    pad_m = max(INT_MM_MIN_ROWS - m, 0)
    pad_k, pad_n = -k % INT_MM_MULTIPLE, -n % INT_MM_MULTIPLE
    if pad_m or pad_k:
        a = F.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        b = F.pad(b, (0, pad_k, 0, pad_n))
    return torch._int_mm(a, b.t())[:m, :n]


def quantized_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """The reference's `quantized_matmul` with the integer product exact in `int8_matmul` (w8a8), or the int8
    weight widened to x's dtype inside the matmul and scaled after it (w8a16).

    It is also the cuda kernel: there `int8_matmul` is torch._int_mm (cuBLASLt int8 tensor cores, padded to its
    m > 16, k and n multiples of 8 rule). Chosen over torch._scaled_mm FP8 because it runs the very int8
    checkpoints `dimoo quantize` writes, bit for bit the same integers as on CPU and npu (FP8 would need another
    format, e4m3 weights, and an sm_89+ GPU), needs no extra package (torchao), and int8 tensor cores exist from
    sm_75. w8a16 on cuda widens one weight at a time to bf16 for a cuBLAS matmul: no int8 throughput, half the
    weight memory. Where this torch cannot load it, `dimoo_npu.ops.registry.cuda_int8_unavailable` says why.
    """
    if scheme == "w8a16":
        return F.linear(x, weight.to(x.dtype)) * weight_scale.to(x.dtype)
    q, scale = reference.quantize_rows(x)
    flat = int8_matmul(q.reshape(-1, q.shape[-1]), weight).view(*q.shape[:-1], -1)  # (..., N) int32
    return (flat.float() * scale * weight_scale.float()).to(x.dtype)
