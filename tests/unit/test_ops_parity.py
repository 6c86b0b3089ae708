"""Every op implementation against the reference: shapes, dtypes, key padding; and proof the check can fail.

The npu implementation runs on the documented fake torch_npu (tests/fakes/torch_npu, CPU tensors).
Tolerances: the ``op`` row of `dimoo_npu.numerics.tolerances` (fp32 1e-5; bf16/fp16 two roundings, relative).
"""

from __future__ import annotations

import pytest
import torch

import dimoo_npu
from dimoo_npu.adapters.npu import import_torch_npu
from dimoo_npu.numerics.golden import forward_errors
from dimoo_npu.numerics.op_parity import DTYPES, OpCase, cast, op_cases, outputs, parity_failure
from dimoo_npu.ops import OP_NAMES, reference, resolve_ops
from tests.conftest import CHECKPOINT

CASES = op_cases()
UNIT_ROUNDOFF = {torch.bfloat16: 2**-8, torch.float16: 2**-11}


def _failures(fn_for_op, op: str, dtypes=DTYPES) -> list[str]:
    return [f for case in CASES if case.op == op for dtype in dtypes if (f := parity_failure(fn_for_op, case, dtype))]


def test_cases_cover_the_brief():
    attention = [c for c in CASES if c.op == "attention"]
    masks = [c.args[3] for c in attention if c.args[3] is not None]
    assert any(c.args[0].shape[0] > 1 and c.args[0].shape[1] > 1 for c in attention)  # B > 1, several heads
    assert any(c.args[0].shape[2] % 2 == 1 for c in attention)  # odd lengths
    assert any(c.args[0].shape[2] != c.args[1].shape[2] for c in attention)  # Lq != Lk (cached step)
    assert any(len(set(m.sum(-1).tolist())) == m.shape[0] for m in masks)  # rows with different lengths
    assert any(not bool(m.any(-1).all()) for m in masks)  # a row with no real key
    assert {c.op for c in CASES} == set(OP_NAMES)


# add_rms_norm rounds twice by design: its sum is rounded to the dtype before the norm, as in the unfused model
# (x = x + delta; norm(x)) and in npu_add_rms_norm, which returns that rounded sum.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", [op for op in OP_NAMES if op != "add_rms_norm"])
def test_reference_accumulates_in_fp32_and_rounds_once(op, dtype):
    """Reduced-precision reference = fp32 reference on the same rounded inputs, within one rounding."""
    for case in (c for c in CASES if c.op == op):
        rounded = cast(case, dtype)
        widened = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in rounded)
        fn = getattr(reference, op)
        for got, expected in zip(outputs(fn(*rounded)), outputs(fn(*widened)), strict=True):
            assert got.dtype == dtype
            bound = UNIT_ROUNDOFF[dtype] * expected.abs() + 1e-7
            assert bool(((got.float() - expected).abs() <= bound).all()), f"{case.name}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("impl", ["torch", "npu"])
def test_implementation_matches_reference(impl, op, dtype, request):
    if impl == "npu":
        request.getfixturevalue("fake_torch_npu")
    if (impl, op, dtype) == ("npu", "quantized_matmul", torch.float32):
        pytest.skip("the npu int8 kernels take fp16/bf16 only; fp32 runs them in bf16 (tests/unit/test_npu_int8.py)")
    ops = resolve_ops("cpu", impl)
    assert ops.names[op] == impl
    assert _failures(getattr(ops, op), op, [dtype]) == []


# --- mutants: each slip a caller of torch_npu could make; the same check must catch every one ------------------


def _npu_attention(q, k, v, atten_mask, scale, layout="BNSD"):
    return import_torch_npu().npu_fusion_attention(q, k, v, q.shape[1], layout, atten_mask=atten_mask, scale=scale)[0]


def _b1ss(hidden: torch.Tensor, lq: int) -> torch.Tensor:
    return hidden[:, None, None, :].expand(hidden.shape[0], 1, lq, hidden.shape[1]).contiguous()


def mask_polarity_not_inverted(q, k, v, kpm, scale):
    return _npu_attention(q, k, v, None if kpm is None else _b1ss(kpm, q.shape[2]), scale)


def scale_left_at_default(q, k, v, kpm, scale):
    return _npu_attention(q, k, v, None if kpm is None else _b1ss(~kpm, q.shape[2]), 1.0)


def mask_passed_as_b11s(q, k, v, kpm, scale):
    return _npu_attention(q, k, v, None if kpm is None else (~kpm)[:, None, None, :], scale)


def empty_rows_sent_to_kernel(q, k, v, kpm, scale):
    return _npu_attention(q, k, v, None if kpm is None else _b1ss(~kpm, q.shape[2]), scale)


def bsnd_layout_for_bnsd_tensors(q, k, v, kpm, scale):
    return _npu_attention(q, k, v, None if kpm is None else _b1ss(~kpm, q.shape[2]), scale, layout="BSND")


def rms_norm_takes_rstd(x, weight, eps):
    return import_torch_npu().npu_rms_norm(x, weight, epsilon=eps)[1]


def rotary_interleaved(x, cos, sin):
    return import_torch_npu().npu_rotary_mul(x.float(), cos, sin, rotary_mode="interleave").to(x.dtype)


def rotary_cos_sin_swapped(x, cos, sin):
    return import_torch_npu().npu_rotary_mul(x.float(), sin, cos).to(x.dtype)


def swiglu_halves_swapped(gate, up):
    return import_torch_npu().npu_swiglu(torch.cat([up, gate], dim=-1), dim=-1)


def swiglu_split_on_wrong_axis(gate, up):
    return import_torch_npu().npu_swiglu(torch.cat([gate, up], dim=-1), dim=0)


def swiglu_packed_halves_swapped(gate_up):
    return import_torch_npu().npu_swiglu(torch.cat(gate_up.chunk(2, dim=-1)[::-1], dim=-1), dim=-1)


def add_rms_norm_returns_rstd(x, residual, weight, eps):
    y, rstd, summed = import_torch_npu().npu_add_rms_norm(x, residual, weight, epsilon=eps)
    return y, rstd.expand_as(y).to(y.dtype)


def add_rms_norm_normalises_x_alone(x, residual, weight, eps):
    return import_torch_npu().npu_rms_norm(x, weight, epsilon=eps)[0], x + residual


MUTANTS = [
    ("attention", mask_polarity_not_inverted),
    ("attention", scale_left_at_default),
    ("attention", mask_passed_as_b11s),
    ("attention", empty_rows_sent_to_kernel),
    ("attention", bsnd_layout_for_bnsd_tensors),
    ("rms_norm", rms_norm_takes_rstd),
    ("rotary", rotary_interleaved),
    ("rotary", rotary_cos_sin_swapped),
    ("swiglu", swiglu_halves_swapped),
    ("swiglu", swiglu_split_on_wrong_axis),
    ("swiglu_packed", swiglu_packed_halves_swapped),
    ("add_rms_norm", add_rms_norm_returns_rstd),
    ("add_rms_norm", add_rms_norm_normalises_x_alone),
]


@pytest.mark.parametrize(("op", "mutant"), MUTANTS, ids=[m.__name__ for _, m in MUTANTS])
def test_parity_check_catches_mutant(fake_torch_npu, op, mutant):
    assert _failures(mutant, op, [torch.float32]), f"{mutant.__name__} slipped through the {op} parity check"


def test_npu_attention_sends_no_empty_row_to_the_kernel(fake_torch_npu, monkeypatch):
    """The fake returns NaN for a row whose keys are all masked (no inner_precise=2); ops.npu must avoid it."""
    case: OpCase = next(c for c in CASES if c.op == "attention" and "all padding" in c.name)
    seen = []
    real = fake_torch_npu.npu_fusion_attention
    monkeypatch.setattr(fake_torch_npu, "npu_fusion_attention", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    out = resolve_ops("cpu", "npu").attention(*case.args)
    assert torch.isfinite(out).all()
    mask = seen[0]["atten_mask"]
    assert mask.dtype == torch.bool and mask.shape[1] == 1  # B1SS, True = masked out
    assert not bool(mask.all(dim=-1).any())
    assert seen[0]["scale"] == case.args[4]


# --- the whole tiny model on npu ops (fake) against the goldens and the reference ops --------------------------


def test_tiny_model_on_npu_ops_matches_golden_fp32(fake_torch_npu, golden):
    model = dimoo_npu.load_model(CHECKPOINT, ops=resolve_ops("cpu", "npu"))
    assert dict(model.ops.names) == dict.fromkeys(OP_NAMES, "npu")
    errors = forward_errors(model, golden, torch.device("cpu"))
    assert max(v for k, v in errors.items() if k != "loss") <= 2e-4, errors  # cases.json forward.atol_fp32
    assert errors["loss"] <= 1e-4


def test_tiny_model_on_npu_ops_matches_reference_ops_bf16(fake_torch_npu, golden):
    """bf16: npu ops vs reference ops on the same bf16 weights, and both vs the fp32 golden.

    Both kernels compute in fp32 and round once, so they agree far better than either agrees with fp32; the
    golden bound is the one justified in tests/golden/test_forward_golden.py (6% of the largest logit).
    """
    ids, lengths = golden["forward.input_ids"], golden["forward.lengths"]
    mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
    logits = {}
    for impl in ("npu", "reference"):
        model = dimoo_npu.load_model(CHECKPOINT, dtype=torch.bfloat16, ops=resolve_ops("cpu", impl))
        with torch.no_grad():
            logits[impl] = model(ids, mask).float()
    expected = golden["forward.logits_image"]
    scale = float(expected.abs().max())
    for row, n in enumerate(lengths.tolist()):
        npu_rows, ref_rows = logits["npu"][row, :n, -8192:], logits["reference"][row, :n, -8192:]
        assert float((npu_rows - ref_rows).abs().max()) <= 0.01 * scale
        assert float((npu_rows - expected[row, :n]).abs().max()) <= 0.06 * scale
