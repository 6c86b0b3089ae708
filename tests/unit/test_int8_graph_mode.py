"""Graph mode of int8 models (issue 27): one whole graph per forward, the int8 weights in it, eager's logits.

The default suite traces with AOTAutograd and runs the graph eagerly ("aot_eager": the same graph inductor would
compile, without its minutes of code generation on a small CPU); inductor itself runs in a slow test. The npu path
goes through the fake torch_npu and fake torchair: its int8 kernels must stay in the graph as the documented
``torch.ops.npu`` operators, which torchair converts to GE operators.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

import dimoo_npu
from dimoo_npu.adapters import CpuBackend, NpuBackend
from dimoo_npu.numerics.compare import compare_layer
from dimoo_npu.numerics.tolerances import tolerance
from dimoo_npu.ops import resolve_ops
from dimoo_npu.quantization import SCHEMES, QuantizedLinear, fuse_for_sampling
from dimoo_npu.sampling import graph
from tests.conftest import CHECKPOINT

KERNELS = {"w8a8": ("npu_dynamic_quant", "npu_quant_matmul"), "w8a16": ("npu_weight_quant_batchmatmul",)}


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 9:] = False  # a padded row
    return ids, mask


def _used_int8_weights(model) -> list[tuple[int, ...]]:
    """Shapes of the int8 weights the fused forward multiplies by: qkv, attn_out, gate_up, ff_out per block."""
    blocks = model.transformer.blocks.values()
    linears = [m for b in blocks for m in (b.qkv_weight, b.attn_out, b.gate_up_weight, b.ff_out)]
    assert all(isinstance(m, QuantizedLinear) for m in linears)
    return sorted(tuple(m.weight.shape) for m in linears)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_int8_graph_mode_is_one_graph_with_the_int8_weights_and_eagers_logits(monkeypatch, scheme):
    """`prepare_for_sampling(compile=True)`, the CLI's --compile: fullgraph=True, so a graph break fails."""
    torch._dynamo.reset()
    graphs = []

    def recording_aot_eager(gm, example_inputs):
        graphs.append(example_inputs)
        return lookup_backend("aot_eager")(gm, example_inputs)

    monkeypatch.setattr(CpuBackend, "compile_backend", lambda self: recording_aot_eager)
    ids, mask = _inputs()
    eager = fuse_for_sampling(dimoo_npu.load_model(CHECKPOINT, quantize=scheme))
    compiled = graph.prepare_for_sampling(dimoo_npu.load_model(CHECKPOINT, quantize=scheme), compile=True)
    with torch.no_grad():
        expected, got = eager(ids, mask), compiled(ids, mask)
    assert len(graphs) == 1, "one forward, one graph"
    int8_inputs = sorted(tuple(t.shape) for t in graphs[0] if t.dtype == torch.int8)
    assert int8_inputs == _used_int8_weights(compiled), "the compiler sees the int8 weights themselves"
    diff = compare_layer("logits", expected, got, tolerance("int8", scheme))
    assert diff.passed, diff
    torch._dynamo.reset()


@pytest.mark.slow  # inductor generates C++ for each graph: over a minute per scheme on 2 cores
@pytest.mark.parametrize("scheme", SCHEMES)
def test_int8_graph_mode_with_inductor_matches_eager(scheme):
    torch._dynamo.reset()
    ids, mask = _inputs()
    eager = fuse_for_sampling(dimoo_npu.load_model(CHECKPOINT, quantize=scheme))
    compiled = graph.prepare_for_sampling(dimoo_npu.load_model(CHECKPOINT, quantize=scheme), compile=True)
    with torch.no_grad():
        expected, got = eager(ids, mask), compiled(ids, mask)
    diff = compare_layer("logits", expected, got, tolerance("int8", scheme))
    assert diff.passed, diff
    torch._dynamo.reset()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_npu_int8_graph_keeps_the_documented_kernels(fake_torch_npu, scheme):
    """On the npu ops (fake, CPU tensors), under torchair's GE backend (fake): every int8 matmul of the forward is
    the documented torch_npu operator in the graph, nothing unconverted, and the logits are eager's."""
    torch._dynamo.reset()
    torchair = importlib.import_module("torchair")
    torchair.GRAPHS.clear()
    ids, mask = _inputs()
    model = dimoo_npu.load_model(CHECKPOINT, dtype=torch.bfloat16, quantize=scheme)
    model = fuse_for_sampling(model.use_ops(resolve_ops("cpu", "npu")))
    with torch.no_grad():
        expected = model(ids, mask).float()
        graph.compile_forward(model, backend=NpuBackend().compile_backend())
        got = model(ids, mask).float()
    (captured,) = torchair.GRAPHS
    targets = [node.target for node in captured.graph.nodes if node.op == "call_function"]
    matmuls = len(_used_int8_weights(model))
    for kernel in KERNELS[scheme]:
        assert targets.count(getattr(torch.ops.npu, kernel).default) == matmuls, kernel
    assert torch.ops.aten._int_mm.default not in targets
    diff = compare_layer("logits", expected, got, tolerance("int8", scheme))
    assert diff.passed, diff
    torch._dynamo.reset()


@torch.library.custom_op("dimoo_test::scaled", mutates_args=())
def _scaled(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_scaled.register_fake
def _(x):
    return torch.empty_like(x)


def test_fake_torchair_ge_mode_refuses_an_operator_it_cannot_convert(fake_torch_npu):
    """Why the int8 path stays made of aten and torch_npu operators: a custom op of our own would need an Ascend
    IR converter in GE mode (aclgraph mode, which needs only its Meta function, takes it)."""
    torchair = importlib.import_module("torchair")
    x = torch.ones(4)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="converter for dimoo_test.scaled.default is not implemented"):
        torch.compile(_scaled, backend=NpuBackend().compile_backend(), fullgraph=True)(x)
    config = torchair.CompilerConfig()
    config.mode = "reduce-overhead"
    torch._dynamo.reset()
    assert torch.equal(torch.compile(_scaled, backend=torchair.get_npu_backend(compiler_config=config))(x), x * 2)
    torch._dynamo.reset()
