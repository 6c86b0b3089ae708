"""Fake ``npu_rms_norm``, ``npu_rotary_mul`` and ``npu_swiglu`` on CPU tensors, written from their documentation.

Docs: Ascend/op-plugin docs/zh/custom_APIs/torch_npu/ (commit 517f2e7d); schemas from
op_plugin/config/op_plugin_functions.yaml; output shapes from op_plugin/python/meta/_meta_registrations.py.
Each kernel computes in fp32 and rounds its output once to the input dtype.
"""

from __future__ import annotations

import torch

from torch_npu._checks import check

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (x dtype, gamma dtype) pairs the rms_norm doc lists for Atlas A2/A3.
RMS_NORM_DTYPE_PAIRS = {
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32),
}

# Broadcast forms of r1/r2 the rotary_mul doc allows, per non-D axis: "F" = full size of input, "1" = broadcast.
# half, 4-D: BNSD 11SD/B1SD/BNSD, BSND 1S1D/BS1D/BSND, SBND S11D/SB1D/SBND; 3-D (TND): T1D/TND.
# interleave: only 11SD, 1S1D, S11D and T1D.
ROTARY_FORMS = {
    ("half", 4): {"11F", "F1F", "FFF", "1F1", "FF1", "F11"},
    ("half", 3): {"F1", "FF"},
    ("interleave", 4): {"11F", "1F1", "F11"},
    ("interleave", 3): {"F1"},
}


def npu_rms_norm(self, gamma, epsilon=1e-06):
    """Doc: Ascend/op-plugin docs/zh/custom_APIs/torch_npu/（beta）torch_npu-npu_rms_norm.md.

    y = x / sqrt(mean(x²) + eps) * gamma over gamma's trailing dims; returns (y, rstd fp32 keepdim).
    """
    check(2 <= self.dim() <= 8, f"npu_rms_norm: self must have 2-8 dims, got {self.dim()}")
    check(
        1 <= gamma.dim() <= self.dim() - 1 and tuple(gamma.shape) == tuple(self.shape[self.dim() - gamma.dim() :]),
        f"npu_rms_norm: gamma shape {tuple(gamma.shape)} must equal a trailing slice of self {tuple(self.shape)}",
    )
    check(
        (self.dtype, gamma.dtype) in RMS_NORM_DTYPE_PAIRS,
        f"npu_rms_norm: (self, gamma) dtypes ({self.dtype}, {gamma.dtype}) are not a supported pair",
    )
    dims = tuple(range(self.dim() - gamma.dim(), self.dim()))
    x = self.float()
    rstd = torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + epsilon)  # (..., 1, ...) fp32
    return (x * rstd * gamma.float()).to(self.dtype), rstd


class _NoBackward(torch.autograd.Function):
    """Identity forward whose backward fails like an op absent from derivatives.yaml."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("the derivative for 'npu_add_rms_norm' is not implemented (fake torch_npu)")


def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06):
    """Doc: Ascend/op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_add_rms_norm.md; op-plugin test
    test/test_custom_ops/test_npu_add_rms_norm.py (its numpy reference).

    x = x1 + x2 (in x1's dtype), y = x / sqrt(mean(x²) + eps) * gamma over gamma's trailing dims; returns
    (y, rstd fp32 keepdim, x). No backward (test/test_base_ops/test_autograd_error_fallback.py): calling
    ``.backward()`` through any output raises RuntimeError "not implemented".
    """
    check(1 <= x1.dim() <= 8, f"npu_add_rms_norm: x1 must have 1-8 dims, got {x1.dim()}")
    check(x1.shape == x2.shape, f"npu_add_rms_norm: x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)} differ")
    for name, t in (("x1", x1), ("x2", x2), ("gamma", gamma)):
        check(t.dtype in FLOAT_DTYPES, f"npu_add_rms_norm: {name} dtype {t.dtype} is not float16/bfloat16/float32")
    check(x1.dtype == x2.dtype == gamma.dtype, "npu_add_rms_norm: x1, x2 and gamma must share one dtype")
    check(
        1 <= gamma.dim() <= x1.dim() and tuple(gamma.shape) == tuple(x1.shape[x1.dim() - gamma.dim() :]),
        f"npu_add_rms_norm: gamma shape {tuple(gamma.shape)} must equal a trailing slice of x1 {tuple(x1.shape)}",
    )
    summed = x1 + x2
    dims = tuple(range(summed.dim() - gamma.dim(), summed.dim()))
    x = summed.float()
    rstd = torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    y = (x * rstd * gamma.float()).to(x1.dtype)
    return tuple(_NoBackward.apply(t) for t in (y, rstd, summed))


def _rotate(x: torch.Tensor, mode: str, rotate) -> torch.Tensor:
    if rotate is not None:
        return x @ rotate.float()  # doc: rotate(x) = x · rotate
    if mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)  # "... d two -> ... (d two)"


def _rotary_form(x: torch.Tensor, r: torch.Tensor) -> str:
    return "".join(
        "F" if rs == xs and xs != 1 else ("1" if rs == 1 else "?")
        for xs, rs in zip(x.shape[:-1], r.shape, strict=False)
    )


def _form_allowed(x: torch.Tensor, r: torch.Tensor, forms: set[str]) -> bool:
    """True when r's non-D axes match an allowed form; an axis of size 1 in x matches both "F" and "1"."""
    form = _rotary_form(x, r)
    return any(
        all(f == a or (f == "1" and xs == 1) for f, a, xs in zip(form, allowed, x.shape, strict=False))
        for allowed in forms
    )


def npu_rotary_mul(self, r1, r2, rotary_mode="half", rotate=None):
    """Doc: Ascend/op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_rotary_mul.md.

    out = x * r1 + rotate(x) * r2 (r1 = cos, r2 = sin); 'half' = rotate-half (NeoX), 'interleave' = GPT-J pairs.
    Like op-plugin's RotaryMulKernelNpuOpApi.cpp, r1/r2 of another dtype are first cast to x's dtype.
    """
    check(
        rotary_mode in ("half", "interleave"),
        f"The rotary_mode of npu_rotary_mul should be half or interleave, but got {rotary_mode}",
    )
    check(self.dim() in (3, 4), f"npu_rotary_mul: input must be 3-D or 4-D, got {self.dim()}-D")
    for name, t in (("input", self), ("r1", r1), ("r2", r2)):
        check(t.dtype in FLOAT_DTYPES, f"npu_rotary_mul: {name} dtype {t.dtype} is not float16/bfloat16/float32")
    check(
        r1.shape == r2.shape and r1.dim() == self.dim(),
        f"npu_rotary_mul: r1 {tuple(r1.shape)} and r2 {tuple(r2.shape)} must share a shape with input's rank",
    )
    head_dim = self.shape[-1]
    check(head_dim % 2 == 0 and head_dim < 896, f"npu_rotary_mul: D={head_dim} must be even and < 896")
    check(r1.shape[-1] == head_dim, f"npu_rotary_mul: r1/r2 last dim {r1.shape[-1]} != D={head_dim}")
    forms = ROTARY_FORMS[(rotary_mode, self.dim())]
    check(
        _form_allowed(self, r1, forms),
        f"npu_rotary_mul: r1/r2 shape {tuple(r1.shape)} is not a documented {rotary_mode} broadcast of input "
        f"{tuple(self.shape)}",
    )
    if rotate is not None:
        check(
            rotate.dim() == 2 and tuple(rotate.shape) == (head_dim, head_dim), "npu_rotary_mul: rotate must be (D, D)"
        )
    cos = r1.to(self.dtype).float()
    sin = r2.to(self.dtype).float()
    x = self.float()
    return (x * cos + _rotate(x, rotary_mode, rotate) * sin).to(self.dtype)


def npu_swiglu(self, dim=-1):
    """Doc: Ascend/op-plugin docs/zh/custom_APIs/torch_npu/（beta）torch_npu-npu_swiglu.md.

    Splits input in half along ``dim``: A = first half, B = second half; returns silu(A) * B.
    """
    check(1 <= self.dim() <= 8, f"npu_swiglu: input must have 1-8 dims, got {self.dim()}")
    check(self.dtype in FLOAT_DTYPES, f"npu_swiglu: dtype {self.dtype} is not float32/float16/bfloat16")
    check(self.numel() > 0, "npu_swiglu: empty tensors are not supported")
    check(self.is_contiguous(), "npu_swiglu: non-contiguous input is not supported")
    check(-self.dim() <= dim <= self.dim() - 1, f"npu_swiglu: dim {dim} out of range for {self.dim()}-D input")
    check(self.shape[dim] % 2 == 0, f"npu_swiglu: size {self.shape[dim]} along dim {dim} is not divisible by 2")
    a, b = self.float().chunk(2, dim=dim)
    return (torch.nn.functional.silu(a) * b).to(self.dtype)
