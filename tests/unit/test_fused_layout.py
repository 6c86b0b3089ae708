"""The fused inference layout (`fuse_projections`): same tokens, public state dict, and npu kernels fed as is."""

from __future__ import annotations

import pytest
import torch

import dimoo_npu
from dimoo_npu.model import fuse_projections
from dimoo_npu.numerics.compare import compare_layer
from dimoo_npu.numerics.golden import greedy_sampling_case
from dimoo_npu.numerics.tolerances import tolerance
from dimoo_npu.ops import resolve_ops
from tests.conftest import CHECKPOINT


@pytest.fixture(scope="module")
def fused_model():
    return fuse_projections(dimoo_npu.load_model(CHECKPOINT))


def test_state_dict_keeps_the_checkpoint_names_and_values(tiny_model, fused_model):
    plain, fused = tiny_model.state_dict(), fused_model.state_dict()
    assert list(fused) == list(plain)
    assert all(torch.equal(fused[name], plain[name]) for name in plain)
    block = fused_model.transformer.blocks["0"]
    assert block.qkv_weight.shape[0] == 3 * block.q_proj.out_features
    assert block.k_proj.weight.data_ptr() == block.qkv_weight[block.q_proj.out_features :].data_ptr(), "a view"


def test_loading_a_state_dict_writes_through_to_the_fused_weights(tiny_model):
    model = fuse_projections(dimoo_npu.load_model(CHECKPOINT))
    state = {name: torch.zeros_like(t) if "up_proj" in name else t for name, t in tiny_model.state_dict().items()}
    model.load_state_dict(state)
    hidden = model.transformer.blocks["1"].ff_proj.out_features
    assert not model.transformer.blocks["1"].gate_up_weight[hidden:].any()


def test_forward_matches_the_plain_layout_within_the_fp32_layer_tolerance(tiny_model, fused_model, golden):
    """Not bit for bit: silu of the [gate; up] half takes another SIMD path than the plain gate (AVX-512's tail)."""
    ids = golden["forward.input_ids"]
    mask = torch.arange(ids.shape[1]) < golden["forward.lengths"][:, None]
    with torch.no_grad():
        diff = compare_layer("logits", tiny_model(ids, mask), fused_model(ids, mask), tolerance("layer", torch.float32))
    assert diff.passed, diff


@pytest.mark.parametrize("name", ["t2i_cfg", "t2i_wide_cfg_cache", "mmu_cfg"])
def test_fused_greedy_tokens_equal_the_golden(fused_model, golden, cases, name):
    out, expected = greedy_sampling_case(fused_model, golden, name, cases["cases"][name])
    assert torch.equal(out, expected)


def test_npu_kernels_get_the_fused_inputs_as_is(fake_torch_npu, golden, monkeypatch):
    """npu_swiglu gets the [gate; up] matmul output (no cat), add_rms_norm runs, one attention mask per forward."""
    from dimoo_npu.ops import npu as npu_ops

    model = fuse_projections(dimoo_npu.load_model(CHECKPOINT, ops=resolve_ops("cpu", "npu")))
    seen = {"swiglu": [], "add_rms_norm": 0, "masks": 0}
    swiglu, add_rms_norm, make_mask = (
        fake_torch_npu.npu_swiglu,
        fake_torch_npu.npu_add_rms_norm,
        npu_ops.attention_mask_for_npu,
    )
    monkeypatch.setattr(torch, "cat", _no_cat_of(torch.cat, model.config.mlp_hidden_size))
    monkeypatch.setattr(
        fake_torch_npu, "npu_swiglu", lambda x, dim=-1: seen["swiglu"].append(x.shape) or swiglu(x, dim)
    )

    def counted_add_rms_norm(*args, **kwargs):
        seen["add_rms_norm"] += 1
        return add_rms_norm(*args, **kwargs)

    def counted_mask(*args):
        seen["masks"] += 1
        return make_mask(*args)

    monkeypatch.setattr(fake_torch_npu, "npu_add_rms_norm", counted_add_rms_norm)
    monkeypatch.setattr(npu_ops, "attention_mask_for_npu", counted_mask)
    ids = golden["forward.input_ids"]
    mask = torch.arange(ids.shape[1]) < golden["forward.lengths"][:, None]
    model(ids, mask)
    layers = model.config.n_layers
    hidden = model.config.mlp_hidden_size
    assert seen == {"swiglu": [(*ids.shape, 2 * hidden)] * layers, "add_rms_norm": layers, "masks": 1}


def _no_cat_of(cat, width: int):
    """torch.cat that refuses to build an npu_swiglu input (gate and up of the MLP ``width`` joined on dim -1)."""

    def guarded(tensors, dim=0, **kwargs):
        if dim == -1 and len(tensors) == 2 and all(t.shape[-1] == width for t in tensors):
            raise AssertionError("gate and up were concatenated for npu_swiglu")
        return cat(tensors, dim, **kwargs)

    return guarded
