"""Graph mode: the adapters' compile backends, DIMOO_COMPILE, and a compiled smoke against one golden case.

The smoke compiles with the fake torchair backend (tests/fakes/torchair: AOTAutograd, then the graph runs eagerly),
the path an Ascend machine takes, minus GE. Inductor's code generation takes minutes on this 2-core CI, so
inductor against the full golden set runs outside the suite: ``python scripts/golden_check.py --compile``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import dimoo_npu
from dimoo_npu.adapters import CpuBackend, CudaBackend, NpuBackend
from dimoo_npu.model import fuse_projections
from dimoo_npu.numerics.golden import greedy_sampling_case
from dimoo_npu.sampling import graph
from tests.conftest import CHECKPOINT


def test_cpu_and_cuda_compile_with_inductor():
    assert CpuBackend().compile_backend() == "inductor"
    assert CudaBackend().compile_backend() == "inductor"


def test_dimoo_compile_turns_graph_mode_on(monkeypatch, tiny_model):
    compiled = []
    monkeypatch.setattr(graph, "compile_forward", compiled.append)
    model = dimoo_npu.load_model(CHECKPOINT)
    monkeypatch.delenv("DIMOO_COMPILE", raising=False)
    graph.prepare_for_sampling(model)
    assert compiled == []
    monkeypatch.setenv("DIMOO_COMPILE", "1")
    graph.prepare_for_sampling(model)
    assert compiled == [model]
    assert model.transformer.blocks["0"].qkv_weight is not None, "sampling always gets the fused layout"


def test_npu_compiles_with_torchair_imported_after_torch_npu(fake_torch_npu):
    backend = NpuBackend().compile_backend()
    torchair = importlib.import_module("torchair")
    assert torchair.TORCH_NPU_IMPORTED_FIRST
    assert backend.func is torchair._npu_backend and isinstance(backend.keywords["compiler_config"], object)


def test_compiled_greedy_tokens_equal_the_golden_with_static_shapes(fake_torch_npu, golden, cases):
    """fullgraph=True (a graph break fails), and one graph per kind of step: plain, ML-Cache store, cached."""
    torch._dynamo.reset()
    torchair = importlib.import_module("torchair")
    torchair.GRAPHS.clear()
    model = fuse_projections(dimoo_npu.load_model(CHECKPOINT))
    graph.compile_forward(model, backend=NpuBackend().compile_backend())
    case = cases["cases"]["t2i_wide_cfg_cache"]  # ML-Cache on: plain, store and cached steps
    out, expected = greedy_sampling_case(model, golden, "t2i_wide_cfg_cache", case)
    assert torch.equal(out, expected)
    assert len(torchair.GRAPHS) == 3, f"{len(torchair.GRAPHS)} graphs for {case['timesteps']} steps"
    torch._dynamo.reset()


@pytest.mark.parametrize("flag", ["0", ""])
def test_dimoo_compile_off_values(monkeypatch, flag):
    monkeypatch.setenv("DIMOO_COMPILE", flag)
    assert not dimoo_npu.utils.envs.compile_enabled()
