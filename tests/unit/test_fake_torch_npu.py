"""The fake torch_npu against the official documentation: signatures, formulas, shapes and argument checks.

If the fake drifted from the docs, the npu op tests would pass here and fail on hardware; these tests pin it to
the docs' own reference formulas (Ascend/op-plugin docs/zh/custom_APIs/torch_npu/*.md, commit 517f2e7d).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys

import pytest
import torch

# op_plugin/config/op_plugin_functions.yaml (Ascend/op-plugin 517f2e7d), verbatim.
SCHEMAS = {
    "npu_fusion_attention": "npu_fusion_attention(Tensor query, Tensor key, Tensor value, int head_num, "
    "str input_layout, Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, float scale=1., "
    "float keep_prob=1., "
    "int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0, int[]? prefix=None, "
    "int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0, bool gen_mask_parallel=True, "
    'bool sync=False, str softmax_layout="", Tensor? sink=None, Tensor? dropout_mask=None, int seed=0, int offset=0) '
    "-> (Tensor, Tensor, Tensor, Tensor, int, int, int)",
    "npu_rms_norm": "npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)",
    # The shape of the schema torchair's converters quote for the add_rms_norm family (npu_add_rms_norm_cast).
    "npu_add_rms_norm": "npu_add_rms_norm(Tensor x1, Tensor x2, Tensor gamma, float epsilon=1e-06) "
    "-> (Tensor, Tensor, Tensor)",
    "npu_rotary_mul": "npu_rotary_mul(Tensor self, Tensor r1, Tensor r2, str rotary_mode='half', Tensor? rotate=None) "
    "-> Tensor",
    "npu_swiglu": "npu_swiglu(Tensor self, int dim=-1) -> Tensor",
}


def _schema_params(schema: str) -> list[tuple[str, object]]:
    """[(name, default or inspect.Parameter.empty)] from a native_functions-style schema."""
    body = schema[schema.index("(") + 1 : schema.index(") ->")]
    params = []
    for item in body.split(", "):
        declaration, has_default, default = item.partition("=")
        params.append((declaration.split()[-1], ast.literal_eval(default) if has_default else inspect.Parameter.empty))
    return params


@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_signature_equals_schema(fake_torch_npu, op):
    signature = inspect.signature(getattr(fake_torch_npu, op))
    assert [(p.name, p.default) for p in signature.parameters.values()] == _schema_params(SCHEMAS[op])


def _qkv(b=2, n=4, s=6, d=8, skv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    skv = skv or s
    return (torch.randn(b, n, s, d, generator=g, dtype=dtype), torch.randn(b, n, skv, d, generator=g, dtype=dtype),
            torch.randn(b, n, skv, d, generator=g, dtype=dtype))  # fmt: skip


def test_fusion_attention_matches_the_docs_reference_and_returns_seven(fake_torch_npu):
    q, k, v = _qkv()
    mask = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1)) < 0.4
    mask[..., 0] = False  # no fully masked row
    out = fake_torch_npu.npu_fusion_attention(q, k, v, 4, "BNSD", atten_mask=mask, scale=0.08838)
    assert len(out) == 7
    # Doc example `supported_op_exec`: qk * scale + atten_mask * (-10000), softmax, @ v.
    qk = torch.matmul(q, k.transpose(2, 3)).mul(0.08838) + mask.float() * -10000.0
    torch.testing.assert_close(out[0], torch.softmax(qk, dim=-1) @ v, atol=1e-5, rtol=1e-5)
    assert out[1].shape == out[2].shape == (2, 4, 6, 8) and out[1].dtype == out[2].dtype == torch.float32
    assert out[3].shape == (0,)
    assert out[4:] == (0, 0, 2 * 4 * 6 * 6)
    # softmax_max / softmax_sum are the row max and the row sum of exp(score - max) (every lane).
    scores = torch.matmul(q, k.transpose(2, 3)).mul(0.08838).masked_fill(mask, float("-inf"))
    torch.testing.assert_close(out[1][..., 3], scores.amax(-1))
    torch.testing.assert_close(out[2][..., 0], torch.exp(scores - scores.amax(-1, keepdim=True)).sum(-1))


def test_scale_defaults_to_one_and_pse_is_added_before_scaling(fake_torch_npu):
    q, k, v = _qkv()
    unscaled = fake_torch_npu.npu_fusion_attention(q, k, v, 4, "BNSD")[0]
    torch.testing.assert_close(unscaled, torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
    pse = torch.randn(2, 4, 6, 6)
    out = fake_torch_npu.npu_fusion_attention(q, k, v, 4, "BNSD", pse=pse, scale=0.5)[0]
    torch.testing.assert_close(out, torch.softmax(0.5 * (pse + q @ k.transpose(-1, -2)), -1) @ v)


@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND", "bsnd"])
def test_layouts_agree_with_bnsd(fake_torch_npu, layout):
    q, k, v = _qkv(skv=5)
    expected = fake_torch_npu.npu_fusion_attention(q, k, v, 4, "BNSD", scale=0.3)[0]  # (B, N, S, D)
    to = {
        "BSH": lambda t: t.transpose(1, 2).flatten(2),
        "SBH": lambda t: t.permute(2, 0, 1, 3).flatten(2),
        "BSND": lambda t: t.transpose(1, 2),
    }[layout.upper()]
    out = fake_torch_npu.npu_fusion_attention(*(to(t) for t in (q, k, v)), 4, layout, scale=0.3)
    torch.testing.assert_close(out[0], to(expected))
    assert out[1].shape == (2, 4, 6, 8)


def test_tnd_uses_cumulative_lengths_without_leading_zero(fake_torch_npu):
    lengths = [2, 3, 0, 4]
    tokens = sum(lengths)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(tokens, 2, 8, generator=g) for _ in range(3))
    cumulative = [2, 5, 5, 9]  # a zero-length batch repeats the previous offset
    out = fake_torch_npu.npu_fusion_attention(
        q, k, v, 2, "TND", scale=0.25, actual_seq_qlen=cumulative, actual_seq_kvlen=cumulative
    )
    for start, end in [(0, 2), (2, 5), (5, 9)]:
        part = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]  # (1, N, S, D)
        alone = fake_torch_npu.npu_fusion_attention(*part, 2, "BNSD", scale=0.25)[0]
        torch.testing.assert_close(out[0][start:end], alone[0].transpose(0, 1))
    assert out[1].shape == (tokens, 2, 8)
    dropped = fake_torch_npu.npu_fusion_attention(
        q, k, v, 2, "TND", scale=0.25, actual_seq_qlen=[2, 5, 0, 0], actual_seq_kvlen=[2, 5, 0, 0]
    )  # trailing zeros: the last batches do not take part
    torch.testing.assert_close(dropped[0][:5], out[0][:5])
    with pytest.raises(RuntimeError, match="actual_seq_qlen and actual_seq_kvlen"):
        fake_torch_npu.npu_fusion_attention(q, k, v, 2, "TND")


def test_gqa_shares_kv_heads_and_causal_mode_reads_the_compressed_mask(fake_torch_npu):
    q, _, _ = _qkv(n=4)
    _, k, v = _qkv(n=2, seed=1)
    out = fake_torch_npu.npu_fusion_attention(q, k, v, 4, "BNSD", scale=0.3)[0]
    expected = torch.softmax(0.3 * q @ k.repeat_interleave(2, 1).transpose(-1, -2), -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, expected)
    compressed = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    causal = fake_torch_npu.npu_fusion_attention(q, q, q, 4, "BNSD", atten_mask=compressed, sparse_mode=2)[0]
    full = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    torch.testing.assert_close(causal, fake_torch_npu.npu_fusion_attention(q, q, q, 4, "BNSD", atten_mask=full)[0])
    with pytest.raises(RuntimeError, match="triu"):
        fake_torch_npu.npu_fusion_attention(q, q, q, 4, "BNSD", atten_mask=~compressed, sparse_mode=2)


_ROWS, _COLS = torch.arange(5)[:, None], torch.arange(7)[None]  # Sq = 5, Skv = 7: right-down origin shifts by 2


@pytest.mark.parametrize(
    ("sparse_mode", "tockens", "hidden"),
    [
        (0, (1, 2), (_COLS - _ROWS > 2) | (_ROWS - _COLS > 1)),  # band around the top-left diagonal
        (2, (0, 0), _COLS > _ROWS),  # leftUpCausal
        (3, (0, 0), _COLS > _ROWS + 2),  # rightDownCausal
        (4, (1, 0), (_COLS - _ROWS - 2 > 0) | (_ROWS + 2 - _COLS > 1)),  # band from the right-down corner
    ],
)
def test_sparse_modes_compute_the_documented_region(fake_torch_npu, sparse_mode, tockens, hidden):
    q, k, v = _qkv(b=1, n=2, s=5, skv=7)
    compressed = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    mask = torch.zeros(5, 7, dtype=torch.bool) if sparse_mode == 0 else compressed
    pre, nxt = tockens
    out = fake_torch_npu.npu_fusion_attention(
        q, k, v, 2, "BNSD", atten_mask=mask, sparse_mode=sparse_mode, pre_tockens=pre, next_tockens=nxt
    )[0]
    explicit = fake_torch_npu.npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=hidden, sparse_mode=1)[0]
    torch.testing.assert_close(out, explicit)


def test_fully_masked_rows_are_nan_unless_invalid_row_computation(fake_torch_npu):
    q, k, v = _qkv()
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    mask[1] = True
    out = fake_torch_npu.npu_fusion_attention(q, k, v, 4, "BNSD", atten_mask=mask)[0]
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    defined = fake_torch_npu.npu_fusion_attention(q, k, v, 4, "BNSD", atten_mask=mask, inner_precise=2)[0]
    assert (defined[1] == 0).all()


def test_dropout_is_seeded_and_scaled(fake_torch_npu):
    q, k, v = _qkv()
    first = fake_torch_npu.npu_fusion_attention(q, k, v, 4, "BNSD", keep_prob=0.5, seed=7)
    again = fake_torch_npu.npu_fusion_attention(q, k, v, 4, "BNSD", keep_prob=0.5, seed=7)
    assert torch.equal(first[0], again[0]) and first[4] == 7
    assert not torch.allclose(first[0], fake_torch_npu.npu_fusion_attention(q, k, v, 4, "BNSD")[0])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input_layout": "BNDS"}, "input_layout should be BSH/SBH/BNSD/BSND/TND"),
        ({"head_num": 3}, "head_num=3 but query has 4 heads"),
        ({"head_num": 0}, "head_num must > 0"),
        ({"atten_mask": torch.zeros(2, 1, 6, 6)}, "atten_mask must be bool or uint8"),
        ({"atten_mask": torch.zeros(2, 1, 1, 6, dtype=torch.bool)}, "none of BNSS/B1SS/11SS/SS"),
        ({"keep_prob": 0.0}, "keep_prob value must be in range"),
        ({"padding_mask": torch.zeros(1)}, "padding_mask is not supported"),
        ({"sparse_mode": 7}, r"sparse_mode value must be in range of \[0,6\]"),
        ({"softmax_layout": "TND"}, "softmax_layout=TND only supported"),
        ({"key": torch.zeros(2, 4, 6, 8, dtype=torch.float16)}, "share one dtype"),
        ({"query": torch.zeros(2, 4, 6, 7)}, "Dq must equal Dk"),
    ],
    ids=lambda x: x if isinstance(x, str) else next(iter(x)),
)
def test_fusion_attention_rejects_documented_misuse(fake_torch_npu, change, message):
    q, k, v = _qkv()
    kwargs = {"query": q, "key": k, "value": v, "head_num": 4, "input_layout": "BNSD", **change}
    with pytest.raises(RuntimeError, match=message):
        fake_torch_npu.npu_fusion_attention(**kwargs)


def test_rms_norm_formula_tuple_and_rstd_shape(fake_torch_npu):
    x, w = torch.randn(24, 1, 128), torch.randn(128)  # the doc's example shapes
    y, rstd = fake_torch_npu.npu_rms_norm(x, w, epsilon=1e-5)
    torch.testing.assert_close(y, x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w)
    assert rstd.shape == (24, 1, 1) and rstd.dtype == torch.float32
    y16, rstd16 = fake_torch_npu.npu_rms_norm(x.to(torch.bfloat16), w.float())  # bf16 x with fp32 gamma is listed
    assert y16.dtype == torch.bfloat16 and rstd16.dtype == torch.float32
    assert fake_torch_npu.npu_rms_norm(torch.randn(2, 3, 4, 8), torch.ones(4, 8))[1].shape == (2, 3, 1, 1)
    with pytest.raises(RuntimeError, match="not a supported pair"):
        fake_torch_npu.npu_rms_norm(x, w.to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="trailing slice"):
        fake_torch_npu.npu_rms_norm(x, torch.ones(64))


def _doc_rotate_interleaved(
    x,
):  # the doc's rotate_interleaved: rearrange(stack((-x2, x1), -1), "... d two -> ... (d two)")
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).reshape(x.shape)


def test_rotary_half_interleave_and_rotate_matrix(fake_torch_npu):
    x = torch.randn(2, 2, 5, 128)
    r1, r2 = torch.rand(1, 2, 1, 128), torch.rand(1, 2, 1, 128)  # the doc's 4-D example shapes
    x1, x2 = x.chunk(2, dim=-1)
    half = x * r1 + torch.cat((-x2, x1), dim=-1) * r2
    torch.testing.assert_close(fake_torch_npu.npu_rotary_mul(x, r1, r2), half)
    interleaved = fake_torch_npu.npu_rotary_mul(x, r1, r2, "interleave")
    torch.testing.assert_close(interleaved, x * r1 + _doc_rotate_interleaved(x) * r2)
    matrix = torch.zeros(128, 128)  # the doc's get_half_matrix
    matrix[:64, 64:], matrix[64:, :64] = torch.eye(64), -torch.eye(64)
    torch.testing.assert_close(fake_torch_npu.npu_rotary_mul(x, r1, r2, "half", matrix), half)


def test_rotary_casts_cos_sin_to_the_input_dtype(fake_torch_npu):
    x = torch.randn(1, 2, 5, 16).to(torch.bfloat16)
    cos, sin = torch.rand(1, 1, 5, 16), torch.rand(1, 1, 5, 16)
    mixed = fake_torch_npu.npu_rotary_mul(x, cos, sin)
    assert torch.equal(mixed, fake_torch_npu.npu_rotary_mul(x, cos.to(x.dtype), sin.to(x.dtype)))


@pytest.mark.parametrize(
    ("r_shape", "mode", "message"),
    [
        ((1, 4, 5, 16), "half", "not a documented half broadcast"),  # 1NSD is none of 11SD/B1SD/BNSD/...
        ((2, 1, 5, 16), "interleave", "not a documented interleave broadcast"),  # B1SD is half-only
        ((1, 1, 5, 8), "half", "last dim"),
        ((1, 1, 5, 16), "rotate_half", "should be half or interleave"),
    ],
)
def test_rotary_rejects_documented_misuse(fake_torch_npu, r_shape, mode, message):
    x = torch.randn(2, 4, 5, 16)
    with pytest.raises(RuntimeError, match=message):
        fake_torch_npu.npu_rotary_mul(x, torch.rand(r_shape), torch.rand(r_shape), mode)


def test_swiglu_gates_with_the_first_half(fake_torch_npu):
    x = torch.randn(2, 32, 6, 6)  # the doc's example
    a, b = x.chunk(2, dim=-1)
    torch.testing.assert_close(fake_torch_npu.npu_swiglu(x, dim=-1), a * torch.sigmoid(a) * b)
    assert fake_torch_npu.npu_swiglu(x, dim=1).shape == (2, 16, 6, 6)
    with pytest.raises(RuntimeError, match="not divisible by 2"):
        fake_torch_npu.npu_swiglu(torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="non-contiguous"):
        fake_torch_npu.npu_swiglu(torch.randn(6, 4).t())


@pytest.mark.parametrize(
    ("visible", "count"),
    [(None, 8), ("", 0), ("0,1", 2), ("2", 1), ("1,0", 0), ("0,1,9", 2), ("0,x,3", 1), ("0,,1", 1), ("a", 0)],
)
def test_visible_devices_parsed_like_torch_npu(fake_torch_npu, monkeypatch, visible, count):
    if visible is None:
        monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", visible)
    assert torch.npu.device_count() == count  # with 8 simulated devices
    assert torch.npu.is_available() == (count > 0)


def test_device_module_is_torch_npu(fake_torch_npu, monkeypatch):
    assert torch.npu is fake_torch_npu.npu
    torch.npu.set_device("npu:1")
    assert torch.npu.current_device() == 1
    torch.npu.set_device(-1)  # negative: no-op
    assert torch.npu.current_device() == 1
    torch.npu.synchronize()
    assert torch.npu.memory_allocated() == torch.npu.max_memory_allocated() == 0
    with pytest.raises(RuntimeError, match="invalid NPU device id 8"):
        torch.npu.set_device(8)
    with pytest.raises(ValueError, match="Expected a npu device"):
        torch.npu.set_device("cuda:0")
    monkeypatch.setenv("FAKE_TORCH_NPU_MODE", "no_device")
    assert not torch.npu.is_available() and torch.npu.device_count() == 0
    with pytest.raises(RuntimeError, match="no NPU is visible"):
        torch.npu.synchronize()


def test_no_cann_mode_fails_import_like_the_faq(fake_torch_npu_path, monkeypatch):
    monkeypatch.setenv("FAKE_TORCH_NPU_MODE", "no_cann")
    with pytest.raises(ImportError, match=re.escape("libhccl.so: cannot open shared object file: No such file")):
        importlib.import_module("torch_npu")
    assert not hasattr(torch, "npu")


def test_fixture_leaves_no_torch_npu_behind():
    """Runs after the tests above (file order): their fixture teardown removed the fake and torch.npu."""
    assert "torch_npu" not in sys.modules and not hasattr(torch, "npu")


def test_add_rms_norm_returns_norm_rstd_and_sum_and_has_no_backward(fake_torch_npu):
    gen = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(2, 3, 8, generator=gen, requires_grad=True) for _ in range(2))
    gamma = torch.randn(8, generator=gen)
    y, rstd, x = fake_torch_npu.npu_add_rms_norm(x1, x2, gamma, epsilon=1e-5)
    expected, _ = fake_torch_npu.npu_rms_norm(x1 + x2, gamma, epsilon=1e-5)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(x, x1 + x2)
    assert rstd.shape == (2, 3, 1) and rstd.dtype == torch.float32
    with pytest.raises(RuntimeError, match="not implemented"):
        y.sum().backward()
