"""Int8 on Ascend (issue 27): the fake torch_npu's int8 ops against their documentation, and the npu
``quantized_matmul`` on them against the CPU reference (op by op, slips a caller could make, the whole model).

Docs: Ascend/op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_dynamic_quant.md, -npu_quant_matmul.md,
-npu_weight_quant_batchmatmul.md (their 函数原型 sections are the prototypes below, verbatim).
"""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

import dimoo_npu
from dimoo_npu.numerics.compare import compare_layer
from dimoo_npu.numerics.op_parity import op_cases, parity_failure
from dimoo_npu.numerics.tolerances import tolerance
from dimoo_npu.ops import npu as npu_ops
from dimoo_npu.ops import reference, resolve_ops
from tests.conftest import CHECKPOINT

PROTOTYPES = {
    "npu_dynamic_quant": "input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode='pertoken', "
    "dst_type_max=0.0",
    "npu_quant_matmul": "x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None, "
    "group_sizes=None",
    "npu_weight_quant_batchmatmul": "x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None, "
    "quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0",
}
CASES = [case for case in op_cases() if case.op == "quantized_matmul"]
HALF = (torch.bfloat16, torch.float16)


def _params(signature: inspect.Signature) -> list[tuple[str, object, object]]:
    return [(p.name, p.default, p.kind) for p in signature.parameters.values()]


@pytest.mark.parametrize("op", sorted(PROTOTYPES))
def test_signature_equals_the_documented_prototype(fake_torch_npu, op):
    namespace: dict = {}
    exec(compile(ast.parse(f"def {op}({PROTOTYPES[op]}): pass"), op, "exec"), namespace)  # the doc's own text
    assert _params(inspect.signature(getattr(fake_torch_npu._quant, op))) == _params(inspect.signature(namespace[op]))


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _int8(*shape, seed=1):
    return torch.randint(-127, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


def test_dynamic_quant_is_the_documented_per_token_formula(fake_torch_npu):
    x = _randn(2, 5, 16, dtype=torch.bfloat16)
    y, scale = fake_torch_npu.npu_dynamic_quant(x)
    assert y.dtype == torch.int8 and y.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (2, 5)  # input's shape without the last dim
    expected_scale = x.float().abs().amax(-1) / 127  # rowMax(abs(x)) / DTYPE_MAX
    assert torch.equal(scale, expected_scale)
    assert torch.equal(y, torch.round(x.float() / expected_scale[..., None]).to(torch.int8))
    with pytest.raises(RuntimeError, match="not float16/bfloat16"):
        fake_torch_npu.npu_dynamic_quant(x.float())
    with pytest.raises(RuntimeError, match="more than 1 dim"):
        fake_torch_npu.npu_dynamic_quant(x[0, 0])


def test_quant_matmul_scales_columns_and_tokens(fake_torch_npu):
    x1, weight = _int8(6, 32), _int8(24, 32, seed=2)  # weight stored (n, k): x2 is its (k, n) view
    scale, token = _randn(24).abs(), _randn(6, seed=3).abs()
    out = fake_torch_npu.npu_quant_matmul(x1, weight.t(), scale, pertoken_scale=token, output_dtype=torch.bfloat16)
    exact = (x1.long() @ weight.long().t()).double()
    assert out.dtype == torch.bfloat16 and out.shape == (6, 24)
    torch.testing.assert_close(out.double(), exact * scale.double() * token.double()[:, None], rtol=2**-8, atol=0)
    small = scale / 1024  # inside fp16's range
    fp16 = fake_torch_npu.npu_quant_matmul(x1, weight.t(), small, output_dtype=torch.float16)  # table 2, row 1
    torch.testing.assert_close(fp16.double(), exact * small.double(), rtol=2**-11, atol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x2="untransposed"), "disagree on k"),
        (dict(output_dtype=torch.float32), "output_dtype torch.float32 not faked"),
        (dict(output_dtype=None), "output_dtype None not faked"),  # None = int8 output: requantised, not ours
        (dict(scale="float16"), "scale dtype torch.float16"),
        (dict(scale="2d"), r"scale must be 1-D \(1,\) or \(n,\)"),
        (dict(pertoken_scale="bf16"), "pertoken_scale dtype torch.bfloat16"),
        (dict(pertoken_scale="short"), r"pertoken_scale must be 1-D \(m,\)"),
        (dict(x1="float"), "x1 dtype torch.float32 is not int8"),
    ],
)
def test_quant_matmul_refuses_documented_misuse(fake_torch_npu, change, message):
    x1, weight = _int8(6, 32), _int8(24, 32, seed=2)
    args = dict(
        x1=x1, x2=weight.t(), scale=_randn(24).abs(), pertoken_scale=_randn(6).abs(), output_dtype=torch.bfloat16
    )
    variants = {
        "untransposed": weight,
        "float16": args["scale"].half(),
        "2d": args["scale"][None],
        "bf16": args["pertoken_scale"].bfloat16(),
        "short": args["pertoken_scale"][:5],
        "float": x1.float(),
    }
    args.update({key: variants.get(value, value) if isinstance(value, str) else value for key, value in change.items()})
    with pytest.raises(RuntimeError, match=message):
        fake_torch_npu.npu_quant_matmul(args.pop("x1"), args.pop("x2"), args.pop("scale"), **args)


def test_weight_quant_batchmatmul_dequantises_per_column(fake_torch_npu):
    x, weight = _randn(5, 32, dtype=torch.bfloat16), _int8(24, 32, seed=2)
    scale = _randn(24, dtype=torch.bfloat16).abs()
    out = fake_torch_npu.npu_weight_quant_batchmatmul(x, weight.t(), scale)
    expected = x.double() @ (weight.double() * scale.double()[:, None]).t()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=1e-6)
    with pytest.raises(RuntimeError, match="antiquant_scale dtype torch.float32 must equal x's torch.bfloat16"):
        fake_torch_npu.npu_weight_quant_batchmatmul(x, weight.t(), scale.float())
    with pytest.raises(RuntimeError, match=r"x \(5, 32\) and weight \(24, 32\)"):
        fake_torch_npu.npu_weight_quant_batchmatmul(x, weight, scale)
    with pytest.raises(RuntimeError, match="x dtype torch.float32 is not float16/bfloat16"):
        fake_torch_npu.npu_weight_quant_batchmatmul(x.float(), weight.t(), scale.float())
    with pytest.raises(RuntimeError, match="must be 2-D"):
        fake_torch_npu.npu_weight_quant_batchmatmul(x[None], weight.t(), scale)


# --- the npu implementation of the op ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_npu_quantized_matmul_matches_the_reference(fake_torch_npu, dtype):
    assert [f for case in CASES if (f := parity_failure(npu_ops.quantized_matmul, case, dtype))] == []


def test_npu_quantized_matmul_runs_fp32_through_the_bf16_kernels(fake_torch_npu):
    """fp32 (an int8 `dimoo check`): the bf16 kernels' output widened, within the int8 rows of the reference."""
    for case in CASES:
        x, weight, scale, scheme = case.args
        got = npu_ops.quantized_matmul(x, weight, scale, scheme)
        assert got.dtype == torch.float32
        assert torch.equal(got, npu_ops.quantized_matmul(x.bfloat16(), weight, scale, scheme).float())
        diff = compare_layer(
            case.name, reference.quantized_matmul(x, weight, scale, scheme), got, tolerance("int8", scheme)
        )
        assert diff.passed, diff


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("scheme", ["w8a8", "w8a16"])
def test_npu_quantized_matmul_runs_the_int8_kernels(fake_torch_npu, monkeypatch, scheme, dtype):
    """fp16/bf16 go to the kernels, and fp32 too (in bf16: they take no fp32)."""
    seen = []
    for name in ("npu_dynamic_quant", "npu_quant_matmul", "npu_weight_quant_batchmatmul"):
        real = getattr(fake_torch_npu, name)
        monkeypatch.setattr(fake_torch_npu, name, lambda *a, _n=name, _r=real, **kw: seen.append(_n) or _r(*a, **kw))
    x, (weight, scale) = _randn(2, 3, 32, dtype=dtype), reference.quantize_rows(_randn(24, 32, seed=4))
    out = npu_ops.quantized_matmul(x, weight, scale[:, 0], scheme)
    assert out.shape == (2, 3, 24) and out.dtype == dtype
    kernels = ["npu_dynamic_quant", "npu_quant_matmul"] if scheme == "w8a8" else ["npu_weight_quant_batchmatmul"]
    assert seen == kernels
    seen.clear()
    assert npu_ops.quantized_matmul(x.float(), weight, scale[:, 0], scheme).dtype == torch.float32
    assert seen == kernels


def _without_pertoken_scale(x, weight, weight_scale, scheme):
    torch_npu = fake_npu()
    q, _ = torch_npu.npu_dynamic_quant(x.reshape(-1, x.shape[-1]))
    out = torch_npu.npu_quant_matmul(q, weight.t(), weight_scale, output_dtype=x.dtype)
    return out.view(*x.shape[:-1], -1)


def _weight_scale_as_tokens(x, weight, weight_scale, scheme):
    torch_npu = fake_npu()
    q, token = torch_npu.npu_dynamic_quant(x.reshape(-1, x.shape[-1]))
    out = torch_npu.npu_quant_matmul(q, weight.t(), token.mean()[None], pertoken_scale=token, output_dtype=x.dtype)
    return out.view(*x.shape[:-1], -1)


def _antiquant_scale_lost(x, weight, weight_scale, scheme):
    ones = torch.ones_like(weight_scale, dtype=x.dtype)
    return fake_npu().npu_weight_quant_batchmatmul(x.reshape(-1, x.shape[-1]), weight.t(), ones).view(*x.shape[:-1], -1)


def _w8a16_as_w8a8(x, weight, weight_scale, scheme):
    return npu_ops.quantized_matmul(x, weight, weight_scale, "w8a8")


def fake_npu():
    from dimoo_npu.adapters.npu import import_torch_npu

    return import_torch_npu()


@pytest.mark.parametrize(
    "mutant, scheme",
    [
        (_without_pertoken_scale, "w8a8"),
        (_weight_scale_as_tokens, "w8a8"),
        (_antiquant_scale_lost, "w8a16"),
        (_w8a16_as_w8a8, "w8a16"),
    ],
)
def test_parity_check_catches_a_slip_in_the_npu_call(fake_torch_npu, mutant, scheme):
    cases = [case for case in CASES if case.args[3] == scheme]
    assert any(parity_failure(mutant, case, torch.bfloat16) for case in cases)


def test_int8_model_on_npu_ops_matches_the_reference_ops(fake_torch_npu):
    """The whole tiny model, int8 (both schemes) in bf16, on the npu kernels (fake) against the reference ops on
    the same int8 weights, by the ``int8`` row: one bf16 rounding apart upstream flips a w8a8 activation's int8
    rounding (and w8a16's scale is rounded to bf16), so two correct bf16 runs of one int8 model differ by the
    order of the quantization itself (torch's ops against the reference's: 6.9% of the largest logit, w8a8),
    beyond the bf16 ``layer`` row; a dropped scale or a transposed weight is far beyond both (see the slips
    above, caught op by op)."""
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 17:] = False
    for scheme in ("w8a8", "w8a16"):
        model = dimoo_npu.load_model(CHECKPOINT, dtype=torch.bfloat16, quantize=scheme)
        with torch.no_grad():
            npu = model.use_ops(resolve_ops("cpu", "npu"))(ids, mask).float()
            ref = model.use_ops(resolve_ops("cpu", "reference"))(ids, mask).float()
        diff = compare_layer("logits", ref, npu, tolerance("int8", scheme))
        assert diff.passed, (scheme, diff)


def test_int8_model_on_npu_is_accepted(fake_torch_npu):
    """The device table lets an int8 model use the npu kernels (meta: the plan's structure, no weights)."""
    dimoo_npu.ops.require_quantized_matmul(resolve_ops("npu"), "npu", "w8a8")
    model = dimoo_npu.load_model(CHECKPOINT, device="meta", ops=resolve_ops("npu"), quantize="w8a16")
    assert model.transformer.blocks["0"].q_proj.ops.names["quantized_matmul"] == "npu"


@pytest.mark.parametrize("scheme", ["w8a8", "w8a16"])
def test_int8_check_measures_the_npu_kernels(fake_torch_npu, monkeypatch, scheme):
    """`dimoo check --quantize` with an npu target, the device simulated on the CPU (the fake keeps tensors there):
    it passes by the int8 rows, and fails when the kernel's per-token or per-channel scale is dropped."""
    from dimoo_npu.numerics.backends import TARGETS, Target
    from dimoo_npu.numerics.check import run_check

    monkeypatch.setitem(dimoo_npu.ops.registry.QUANTIZED_MATMUL_DEVICES, "npu", ("npu", "cpu"))
    targets = [TARGETS["cpu-ref"], Target("npu-simulated", "cpu", "npu")]
    report = run_check(CHECKPOINT, targets, quantize=scheme, length=24)
    assert (
        report.passed and scheme in report.comparisons[0].note and "quantized_matmul=npu" in report.comparisons[0].note
    )
    if scheme == "w8a8":
        real = fake_torch_npu.npu_quant_matmul
        broken = lambda *a, pertoken_scale=None, **kw: real(*a, pertoken_scale=None, **kw)  # noqa: E731
        monkeypatch.setattr(fake_torch_npu, "npu_quant_matmul", broken)
    else:
        real = fake_torch_npu.npu_weight_quant_batchmatmul
        monkeypatch.setattr(
            fake_torch_npu,
            "npu_weight_quant_batchmatmul",
            lambda x, w, s, *a, **kw: real(x, w, s.mean()[None], *a, **kw),
        )
    assert not run_check(CHECKPOINT, targets, quantize=scheme, length=24).passed
