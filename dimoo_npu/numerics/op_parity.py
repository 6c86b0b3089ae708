"""Op-level parity: seeded inputs for every op and the error of an implementation against the reference.

Shared by tests/unit/test_ops_parity.py and scripts/op_parity_table.py, so the table reports exactly what the
tests check. Each case holds fp32 inputs; ``cast`` rounds them to the dtype under test (the rotary cos/sin
tables stay fp32, as the model builds them). The reference runs on the same rounded inputs, so the error
measures the kernel alone, not the rounding of its inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dimoo_npu.model import rotary_tables
from dimoo_npu.numerics.tolerances import tolerance
from dimoo_npu.ops import reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class OpCase:
    op: str
    name: str
    args: tuple  # fp32 tensors, bool masks and Python scalars, in the op's signature order


def _padding_mask(lengths: tuple[int, ...], keys: int, left: bool) -> torch.Tensor:
    """(B, Lk) bool, True = real key; rows padded on the right (or the left) up to ``keys``."""
    index = torch.arange(keys)[None]  # (1, Lk)
    counts = torch.tensor(lengths)[:, None]  # (B, 1)
    return index >= keys - counts if left else index < counts


def attention_cases(generator: torch.Generator) -> list[OpCase]:
    specs = [  # (name, B, H, Lq, Lk, D, key lengths or None, left padding)
        ("B1 H1 L1 no-mask", 1, 1, 1, 1, 8, None, False),
        ("B2 H4 L7 right-pad 7/3", 2, 4, 7, 7, 16, (7, 3), False),
        ("B3 H2 L13 left-pad 13/0/5 (one row all padding)", 3, 2, 13, 13, 32, (13, 0, 5), True),
        ("B2 H3 Lq5 Lk11 cached-step right-pad 11/6", 2, 3, 5, 11, 8, (11, 6), False),
        ("B2 H4 L9 no-mask", 2, 4, 9, 9, 16, None, False),
    ]
    cases = []
    for name, b, h, lq, lk, d, lengths, left in specs:
        q = torch.randn(b, h, lq, d, generator=generator)
        k = torch.randn(b, h, lk, d, generator=generator)
        v = torch.randn(b, h, lk, d, generator=generator)
        mask = None if lengths is None else _padding_mask(lengths, lk, left)
        cases.append(OpCase("attention", name, (q, k, v, mask, d**-0.5)))
    return cases


def rms_norm_cases(generator: torch.Generator) -> list[OpCase]:
    cases = []
    for b, length, channels in [(1, 1, 8), (2, 7, 32), (3, 13, 48)]:
        x = 2 * torch.randn(b, length, channels, generator=generator)
        weight = 1 + 0.5 * torch.randn(channels, generator=generator)
        cases.append(OpCase("rms_norm", f"x ({b}, {length}, {channels})", (x, weight, 1e-5)))
    return cases


def rotary_cases(generator: torch.Generator) -> list[OpCase]:
    cases = []
    for b, h, length, d, shared in [(1, 1, 1, 8, True), (2, 4, 7, 16, False), (3, 2, 13, 32, True)]:
        x = torch.randn(b, h, length, d, generator=generator)
        rows = 1 if shared else b
        positions = torch.randint(0, 4096, (rows, length), generator=generator)
        cos, sin = rotary_tables(positions, d, 500000.0)  # (rows, 1, L, D) fp32
        form = "11SD" if shared else "B1SD"
        cases.append(OpCase("rotary", f"x ({b}, {h}, {length}, {d}) cos/sin {form}", (x, cos, sin)))
    return cases


def swiglu_cases(generator: torch.Generator) -> list[OpCase]:
    cases = []
    for shape in [(1, 1, 2), (2, 7, 80), (3, 13, 45)]:
        gate = 2 * torch.randn(shape, generator=generator)
        up = 2 * torch.randn(shape, generator=generator)
        cases.append(OpCase("swiglu", f"gate/up {shape}", (gate, up)))
    return cases


def add_rms_norm_cases(generator: torch.Generator) -> list[OpCase]:
    cases = []
    for b, length, channels in [(1, 1, 8), (2, 7, 32), (3, 13, 48)]:
        x = 2 * torch.randn(b, length, channels, generator=generator)
        residual = torch.randn(b, length, channels, generator=generator)
        weight = 1 + 0.5 * torch.randn(channels, generator=generator)
        cases.append(OpCase("add_rms_norm", f"x, residual ({b}, {length}, {channels})", (x, residual, weight, 1e-5)))
    return cases


def swiglu_packed_cases(generator: torch.Generator) -> list[OpCase]:
    return [
        OpCase("swiglu_packed", f"gate_up {shape}", (2 * torch.randn(shape, generator=generator),))
        for shape in [(1, 1, 2), (2, 7, 160), (3, 13, 90)]
    ]


def quantized_matmul_cases(generator: torch.Generator) -> list[OpCase]:
    """Both schemes; shapes below and above torch._int_mm's size rules (see `dimoo_npu.ops.torch_impl`)."""
    cases = []
    for scheme in ("w8a8", "w8a16"):
        for shape, out in [((1, 1, 8), 8), ((2, 7, 45), 13), ((3, 13, 64), 96)]:
            x = 2 * torch.randn(shape, generator=generator)
            weight, scale = reference.quantize_rows(torch.randn(out, shape[-1], generator=generator) / 8)
            args = (x, weight, scale[:, 0], scheme)
            cases.append(OpCase("quantized_matmul", f"{scheme} x {shape} weight ({out}, {shape[-1]})", args))
    return cases


def op_cases(seed: int = 0) -> list[OpCase]:
    """Every op's cases: odd lengths, B > 1, several heads, padding with different lengths per row."""
    generator = torch.Generator().manual_seed(seed)
    builders = (
        attention_cases,
        rms_norm_cases,
        rotary_cases,
        swiglu_cases,
        add_rms_norm_cases,
        swiglu_packed_cases,
        quantized_matmul_cases,
    )
    return [case for build in builders for case in build(generator)]


def cast(case: OpCase, dtype: torch.dtype, device: str | torch.device = "cpu") -> tuple:
    """The case's arguments on ``device``, floating tensors in ``dtype`` (rotary cos/sin stay fp32, masks bool)."""
    keep_fp32 = {1, 2} if case.op == "rotary" else set()
    return tuple(
        (a.to(device, dtype) if a.is_floating_point() and i not in keep_fp32 else a.to(device))
        if isinstance(a, torch.Tensor)
        else a
        for i, a in enumerate(case.args)
    )


def outputs(result: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """An op's outputs as a tuple (add_rms_norm returns two)."""
    return result if isinstance(result, tuple) else (result,)


def compare(
    fn: Callable, case: OpCase, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(implementation output, reference output), both fp32 on the CPU, on the same ``dtype`` inputs; an op with
    several outputs gives them flattened one after the other."""
    args = cast(case, dtype, device)
    got, expected = outputs(fn(*args)), outputs(getattr(reference, case.op)(*args))
    shapes = [(t.dtype, tuple(t.shape)) for t in got]
    if shapes != [(t.dtype, tuple(t.shape)) for t in expected]:
        raise AssertionError(
            f"{case.op} [{case.name}] {dtype}: got {shapes}, expected {[(t.dtype, tuple(t.shape)) for t in expected]}"
        )
    return (torch.cat([t.float().cpu().flatten() for t in ts]) for ts in (got, expected))


def max_abs_error(fn: Callable, case: OpCase, dtype: torch.dtype, device: str | torch.device = "cpu") -> float:
    got, expected = compare(fn, case, dtype, device)
    return float((got - expected).abs().nan_to_num(float("inf")).max())


def parity_failure(fn: Callable, case: OpCase, dtype: torch.dtype, device: str | torch.device = "cpu") -> str | None:
    """None when ``fn`` matches the reference within the ``op`` tolerance, else what went wrong (errors included)."""
    tol = tolerance("op", dtype)
    atol, rtol = tol.atol, tol.rtol
    try:
        got, expected = compare(fn, case, dtype, device)
    except (AssertionError, RuntimeError, ValueError) as err:
        return f"{case.op} [{case.name}] {dtype}: {type(err).__name__}: {err}"
    excess = (got - expected).abs() - (atol + rtol * expected.abs())
    if torch.isfinite(got).all() and bool((excess <= 0).all()):
        return None
    worst = float((got - expected).abs().nan_to_num(float("inf")).max())
    return f"{case.op} [{case.name}] {dtype}: max abs error {worst:.3g} > atol {atol:g} + rtol {rtol:g} * |ref|"
