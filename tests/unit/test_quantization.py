"""Int8 inference (issue 26): the quantized_matmul op, the quantized model, `dimoo quantize`, loading, refusals.

Nothing here depends on the CPU's ISA or thread count: the integer path is checked for exact equality with
integer math, and float results only within the tolerance table's rows.
"""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import dimoo_npu
from dimoo_npu.checkpoint import find_shards
from dimoo_npu.cli import main
from dimoo_npu.files.safetensors_io import read_header
from dimoo_npu.numerics.backends import parse_targets
from dimoo_npu.numerics.check import run_check
from dimoo_npu.numerics.tolerances import tolerance
from dimoo_npu.ops import reference, resolve_ops, torch_impl
from dimoo_npu.quantization import SCHEMES, QuantizedLinear, fuse_for_sampling, is_quantized
from dimoo_npu.utils.errors import CheckpointError, InputError
from tests.conftest import CHECKPOINT


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    config = dimoo_npu.load_model(CHECKPOINT, device="meta").config
    ids = torch.randint(0, config.embedding_size, (2, 24), generator=generator)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 17:] = False
    return ids, mask


@pytest.fixture(scope="module")
def fp32_logits(inputs):
    with torch.no_grad():
        return dimoo_npu.load_model(CHECKPOINT)(*inputs)


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    """The fixture checkpoint (with a tokenizer file beside it) quantized by `dimoo quantize`, per scheme."""
    source = tmp_path_factory.mktemp("source") / "ckpt"
    shutil.copytree(CHECKPOINT, source)
    (source / "tokenizer.json").write_text("{}")
    folders = {}
    for scheme in SCHEMES:
        folders[scheme] = tmp_path_factory.mktemp(scheme) / "int8"
        assert (
            main(["quantize", "--checkpoint", str(source), "--scheme", scheme, "--output", str(folders[scheme])]) == 0
        )
    return source, folders


# --- the op -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_int_mm", [True, False], ids=["int_mm", "fp32-slices"])
@pytest.mark.parametrize(
    ("m", "k", "n"), [(1, 5, 7), (16, 8, 8), (17, 16, 24), (33, 72, 40), (3, 130, 9), (5, 2 * 1040 + 3, 6)]
)
def test_int8_matmul_is_integer_math_exactly(m, k, n, use_int_mm):
    """Both paths, whatever this CPU would pick: below, on and above torch._int_mm's strictest shape rule (padded),
    inner sizes over one exact fp32 slice, and the int8 extremes (sums past fp32's exact integers)."""
    generator = torch.Generator().manual_seed(m * k * n)
    a = torch.randint(-127, 128, (m, k), generator=generator, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    a[0], b[0] = -127, 127  # the largest sum of products a row can have: 2**24 is passed at k = 1041
    a[-1, ::2], b[-1, ::2] = 127, 127  # and an odd one just off a power of two
    got = torch_impl.int8_matmul(a, b, use_int_mm)
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got.long(), a.long() @ b.long().t())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_matmul_kernel_is_the_integer_product_scaled(scheme):
    """The CPU kernel = (integer product) * token scale * channel scale, from the shared rounding rule."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 40, generator=generator)
    weight, scale = reference.quantize_rows(torch.randn(24, 40, generator=generator))
    got = torch_impl.quantized_matmul(x, weight, scale[:, 0], scheme)
    if scheme == "w8a8":
        q, token_scale = reference.quantize_rows(x)
        exact = (q.double() @ weight.double().t()) * token_scale.double() * scale[:, 0].double()
    else:
        exact = x.double() @ (weight.double() * scale.double()).t()
    assert got.shape == (3, 5, 24) and got.dtype == x.dtype
    assert torch.allclose(got.double(), exact, rtol=1e-5, atol=1e-5)


def test_quantize_rows_bounds_and_zero_rows():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [-3.0, 3.0, 1e-9]])
    q, scale = reference.quantize_rows(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q[0].tolist() == [0, 0, 0] and scale[0].item() == 1.0  # no division by zero
    assert q.abs().max().item() == 127 and q[1].tolist() == [64, -127, 32]  # round half to even: 63.5 -> 64
    assert torch.allclose(q.float() * scale, x, atol=float(scale.max()) / 2)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_matmul_is_close_to_fp32(scheme):
    """Against the unquantized fp32 product: within the int8 row of the tolerance table (per layer there)."""
    generator = torch.Generator().manual_seed(2)
    x, w = torch.randn(4, 64, 256, generator=generator), torch.randn(128, 256, generator=generator) / 16
    weight, scale = reference.quantize_rows(w)
    expected = F.linear(x, w)
    row = tolerance("int8", scheme)
    for fn in (reference.quantized_matmul, torch_impl.quantized_matmul):
        got = fn(x, weight, scale[:, 0], scheme)
        assert float((got - expected).abs().max()) <= row.atol + row.rtol * float(expected.abs().max())
        assert _cosine(got, expected) >= row.min_cosine


def test_no_int8_kernel_is_a_clear_error(fake_torch_npu):
    with pytest.raises(
        InputError, match=r"w8a8 has no int8 kernel on cpu yet \(op quantized_matmul=npu\); supported: cpu, cuda, npu"
    ):
        dimoo_npu.load_model(CHECKPOINT, ops=resolve_ops("cpu", {"quantized_matmul": "npu"}), quantize="w8a8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusal of a torch that cannot load the cuda int8 kernel")
def test_cuda_int8_is_refused_with_the_reason_where_torch_cannot_load_it():
    with pytest.raises(InputError, match=r"w8a16 on cuda needs torch._int_mm from a CUDA build .*: (torch .* is not "
                       r"a CUDA build|no CUDA device is visible)\. Fix: "):  # fmt: skip
        dimoo_npu.ops.require_quantized_matmul(resolve_ops("cuda"), "cuda", "w8a16")


# --- the model ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_tiny_model_logits_close_to_fp32_and_every_block_matmul_int8(scheme, inputs, fp32_logits):
    model = dimoo_npu.load_model(CHECKPOINT, quantize=scheme)
    for block in model.transformer.blocks.values():
        linears = [m for m in block.children() if isinstance(m, (torch.nn.Linear, QuantizedLinear))]
        assert linears and all(isinstance(m, QuantizedLinear) and m.weight.dtype == torch.int8 for m in linears)
    assert type(model.transformer.ff_out) is torch.nn.Linear and model.transformer.ff_out.weight.dtype == torch.float32
    assert model.config.quantization_config["scheme"] == scheme
    with torch.no_grad():
        unfused = model(*inputs)
        fused = fuse_for_sampling(model)(*inputs)
    assert _cosine(unfused, fp32_logits) >= 0.995
    assert isinstance(model.transformer.blocks["0"].qkv_weight, QuantizedLinear)  # F.linear on it is int8 too
    assert torch.allclose(fused, unfused, rtol=1e-5, atol=1e-5)  # stacked rows: the same per-channel scales


def test_fused_int8_weights_stay_out_of_the_state_dict():
    model = fuse_for_sampling(dimoo_npu.load_model(CHECKPOINT, quantize="w8a8"))
    names = set(model.state_dict())
    assert not any("qkv_weight" in name or "gate_up_weight" in name for name in names)
    assert "model.transformer.blocks.0.q_proj.weight_scale" in names


def test_quantized_linear_refuses_a_bias_in_f_linear():
    layer = QuantizedLinear(8, 4, "w8a8", resolve_ops("cpu"))
    with pytest.raises(TypeError):
        F.linear(torch.randn(2, 8), layer, torch.zeros(4))


def test_use_ops_switches_the_int8_layers(inputs):
    model = dimoo_npu.load_model(CHECKPOINT, quantize="w8a8")
    with torch.no_grad():
        kernel = model(*inputs)
        reference_run = model.use_ops(resolve_ops("cpu", "reference"))(*inputs)
    assert model.transformer.blocks["0"].q_proj.ops.names["quantized_matmul"] == "reference"
    assert not torch.equal(kernel, reference_run)
    assert _cosine(kernel, reference_run) >= 0.99999


# --- dimoo quantize and loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_then_load_round_trip(scheme, quantized_dir, inputs):
    source, folders = quantized_dir
    folder = folders[scheme]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["scheme"] == scheme and config["source"] == str(source.resolve())
    assert "model.transformer.ff_out" in config["modules_to_not_convert"]
    assert (folder / "tokenizer.json").is_file() and (folder / "vqvae" / "config.json").is_file()
    stored = {e.name: e.dtype for shard in find_shards(folder) for e in read_header(shard)}
    assert stored["model.transformer.blocks.1.ff_out.weight"] == torch.int8
    assert stored["model.transformer.blocks.1.ff_out.weight_scale"] == torch.float32
    source_dtypes = {e.name: e.dtype for shard in find_shards(source) for e in read_header(shard)}
    for kept in ("model.transformer.ff_out.weight", "model.transformer.wte.weight", "model.transformer.ln_f.weight"):
        assert stored[kept] == source_dtypes[kept]  # kept in the source's dtype
    loaded = dimoo_npu.load_model(folder)
    at_load = dimoo_npu.load_model(source, quantize=scheme)
    assert is_quantized(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), at_load(*inputs))
    meta = dimoo_npu.load_model(folder, device="meta")
    assert meta.transformer.blocks["0"].q_proj.weight.dtype == torch.int8


def test_quantize_refuses_bad_input(quantized_dir, tmp_path, caplog):
    source, folders = quantized_dir
    with caplog.at_level(logging.ERROR, logger="dimoo"):
        assert main(["quantize", "--checkpoint", str(source), "--scheme", "w4a4", "--output", str(tmp_path / "a")]) == 2
        assert "unknown quantization scheme 'w4a4': choose one of w8a8, w8a16" in caplog.text
        again = ["quantize", "--checkpoint", str(folders["w8a8"]), "--scheme", "w8a16", "--output", str(tmp_path / "b")]
        assert main(again) == 2
        assert "already quantized (w8a8)" in caplog.text and str(source.resolve()) in caplog.text
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    assert main(["quantize", "--checkpoint", str(source), "--scheme", "w8a8", "--output", str(taken)]) == 2
    assert (taken / "mine.txt").read_text() == "keep me" and sorted(p.name for p in taken.iterdir()) == ["mine.txt"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_loading_refuses_bad_input(quantized_dir, tmp_path):
    source, folders = quantized_dir
    with pytest.raises(InputError, match="unknown quantization scheme 'int4'"):
        dimoo_npu.load_model(CHECKPOINT, quantize="int4")
    with pytest.raises(InputError, match=r"already quantized \(w8a16\): load it without --quantize"):
        dimoo_npu.load_model(folders["w8a16"], quantize="w8a8")
    lost = tmp_path / "lost-config"  # int8 weights, but config.json says nothing of it
    shutil.copytree(folders["w8a8"], lost)
    raw = json.loads((lost / "config.json").read_text())
    del raw["quantization_config"]
    (lost / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="weight_scale|stored as torch.int8"):
        dimoo_npu.load_model(lost)
    float_weights = tmp_path / "float-weights"  # says int8, holds floats
    shutil.copytree(source, float_weights)
    raw = json.loads((float_weights / "config.json").read_text())
    raw["quantization_config"] = json.loads((folders["w8a8"] / "config.json").read_text())["quantization_config"]
    (float_weights / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="lacks|stored as torch.float32 where config.json's quantization_config"):
        dimoo_npu.load_model(float_weights)


def test_training_and_export_hf_refuse_an_int8_checkpoint(quantized_dir, tmp_path):
    from dimoo_npu.train.checkpoint import export_hf
    from dimoo_npu.train.layout import model_config_of

    source, folders = quantized_dir
    train = SimpleNamespace(model=SimpleNamespace(init_from=str(folders["w8a8"]), preset=None, config=None))
    with pytest.raises(
        InputError,
        match=rf"int8 \(w8a8\) inference checkpoint; training .* needs its unquantized source {source.resolve()}",
    ):
        model_config_of(train)
    with pytest.raises(InputError, match=rf"export-hf .* needs its unquantized source {source.resolve()}"):
        export_hf(folders["w8a8"], tmp_path / "out")


# --- dimoo check and dimoo plan -----------------------------------------------------------------------------------


def test_check_compares_int8_with_fp32_by_the_int8_rows(quantized_dir):
    source, folders = quantized_dir
    report = run_check(source, parse_targets("cpu-ref,cpu"), quantize="w8a8", length=24)
    assert report.passed and report.tolerance == tolerance("int8", "w8a8")
    assert "w8a8" in report.comparisons[0].note
    worst = max(d.max_abs for d in report.comparisons[0].diffs)
    assert worst > 0  # the reference really ran unquantized
    from_folder = run_check(folders["w8a16"], parse_targets("cpu-ref,cpu"), length=24)
    assert from_folder.passed and from_folder.tolerance == tolerance("int8", "w8a16")
    with pytest.raises(InputError, match="an int8 check compares with fp32"):
        run_check(source, parse_targets("cpu-ref,cpu"), "bfloat16", quantize="w8a8")


def _scale_lost(x, weight, weight_scale, scheme):
    return F.linear(x, weight.float()).to(x.dtype) * weight_scale.mean()  # one scale for every channel


def _token_scale_lost(x, weight, weight_scale, scheme):
    q, _ = reference.quantize_rows(x)
    return reference.quantized_matmul(q.to(x.dtype) / 127, weight, weight_scale, "w8a16")  # every token at 1/127


@pytest.mark.parametrize("mutant", [_scale_lost, _token_scale_lost])
def test_int8_check_catches_a_broken_kernel(mutant, monkeypatch):
    monkeypatch.setattr(torch_impl, "quantized_matmul", mutant)
    report = run_check(CHECKPOINT, parse_targets("cpu-ref,cpu"), quantize="w8a8", length=24)
    assert not report.passed


def test_plan_counts_int8_bytes():
    from dimoo_npu.modeling.presets import preset_config
    from dimoo_npu.planner.sample_plan import SampleSettings, weight_bytes

    model = preset_config("lumina-dimoo-8b")
    bf16 = weight_bytes(model, SampleSettings())
    w8a8 = weight_bytes(model, SampleSettings(quantize="w8a8"))
    d, h, layers = model.d_model, model.mlp_hidden_size, model.n_layers
    matmuls = layers * (4 * d * d + 3 * d * h)
    assert bf16 - w8a8 == matmuls - layers * (5 * d + 2 * h) * 4  # 2 bytes -> 1 byte, plus fp32 scales
    assert 9.0e9 < w8a8 < 9.4e9  # the estimate: int8 blocks 7.0 GB + bf16 embedding and head 2.2 GB
    assert weight_bytes(model, SampleSettings(quantize="w8a16")) == w8a8 + 2 * d * h * 2


def test_rehearsal_loads_int8_in_less_than_the_bf16_weights(tmp_path):
    """scripts/rehearse_8b.py --quantize on its small shape: the 8B memory figure's code path."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "rehearse_8b.py"
    spec = importlib.util.spec_from_file_location("rehearse_8b", script)
    rehearse_8b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rehearse_8b)
    figures = rehearse_8b.write_checkpoint(tmp_path / "ckpt", "small")
    for scheme in SCHEMES:
        load = rehearse_8b.run_step(f"load-{scheme}", tmp_path / "ckpt", 1, "float32", fresh_process=False)
        assert load["quantize"] == scheme
        assert load["weights_bytes"] < figures["weights_bytes"]  # int8 blocks, bf16 embedding and head


def test_keep_leaves_more_layers_in_float_and_loads_back(tmp_path, inputs, fp32_logits):
    out = tmp_path / "kept"
    argv = ["quantize", "--checkpoint", str(CHECKPOINT), "--scheme", "w8a8", "--output", str(out)]
    assert main([*argv, "--keep", "*.attn_out", "--keep", "*.blocks.1.v_proj"]) == 0
    model = fuse_for_sampling(dimoo_npu.load_model(out))
    blocks = model.transformer.blocks
    assert type(blocks["0"].attn_out) is torch.nn.Linear and isinstance(blocks["0"].ff_out, QuantizedLinear)
    assert blocks["1"].qkv_weight is None and isinstance(blocks["0"].qkv_weight, QuantizedLinear)  # a float part
    with torch.no_grad():
        assert _cosine(model(*inputs), fp32_logits) >= 0.995
