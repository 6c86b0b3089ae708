"""A fake ``torchair`` for tests: the documented entry points, running the captured graph eagerly on CPU tensors.

Source: Ascend/torchair python/torchair/__init__.py and npu_fx_compiler.py (``get_npu_backend(*, compiler_config=None,
custom_decompositions={})`` returns ``functools.partial(_npu_backend, ...)``, a torch.compile backend that runs
AOTAutograd with torchair's compiler), configs/compiler_config.py (``CompilerConfig``: ``mode`` "max-autotune" = GE
graph, "reduce-overhead" = aclgraph; ``debug``; ``experimental_config``). torchair ships inside torch_npu and is
imported after it; the fake records whether torch_npu was already imported (``TORCH_NPU_IMPORTED_FIRST``).
Where the real backend hands each forward graph to GE, the fake runs it as is and appends it to ``GRAPHS``, so
tests can count the graphs a run compiled. GE mode needs an Ascend IR converter for every operator in the graph
(docs/zh/custom_op_graph/overview.md: a custom operator without one fails to enter the graph); torchair ships them
for aten and torch_npu's ``npu`` operators, so the fake refuses an operator from any other namespace (a model's own
``torch.library`` op), where the real backend would fail to convert it. aclgraph mode ("reduce-overhead") needs
only Meta functions.
"""

from __future__ import annotations

import functools
import sys
from types import SimpleNamespace

import torch

__version__ = "fake"

TORCH_NPU_IMPORTED_FIRST = "torch_npu" in sys.modules
GRAPHS: list[torch.fx.GraphModule] = []


class CompilerConfig:
    """The options object ``get_npu_backend`` takes; only the fields callers commonly set."""

    def __init__(self) -> None:
        self.mode = "max-autotune"  # GE graph mode; "reduce-overhead" captures aclgraphs instead
        self.debug = SimpleNamespace(run_eagerly=False)
        self.experimental_config = SimpleNamespace(keep_inference_input_mutations=True, frozen_parameter=False)


def _npu_backend(gm: torch.fx.GraphModule, example_inputs, compiler_config: CompilerConfig, decompositions: dict):
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

    if compiler_config.mode not in ("max-autotune", "reduce-overhead"):
        raise ValueError(f"Unsupported compiler_config.mode {compiler_config.mode!r}")

    def forward_compiler(graph: torch.fx.GraphModule, inputs):
        if compiler_config.mode == "max-autotune":
            _check_converters(graph)
        GRAPHS.append(graph)
        return make_boxed_func(graph.forward)

    return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler, decompositions=decompositions)


CONVERTED_NAMESPACES = ("aten", "prims", "npu")  # operators torchair has converters for (fake: by namespace)


def _check_converters(graph: torch.fx.GraphModule) -> None:
    for node in graph.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if node.target.namespace not in CONVERTED_NAMESPACES:
                raise RuntimeError(
                    f"Ascend IR converter for {node.target} is not implemented; register one with "
                    "torchair.register_fx_node_ge_converter (fake torchair)"
                )


def get_npu_backend(*, compiler_config: CompilerConfig | None = None, custom_decompositions: dict | None = None):
    """A torch.compile backend (torchair/npu_fx_compiler.py ``get_npu_backend``)."""
    config = CompilerConfig() if compiler_config is None else compiler_config
    return functools.partial(_npu_backend, compiler_config=config, decompositions=dict(custom_decompositions or {}))


__all__ = ["CompilerConfig", "GRAPHS", "TORCH_NPU_IMPORTED_FIRST", "get_npu_backend"]
