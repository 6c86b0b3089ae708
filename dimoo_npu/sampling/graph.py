"""A model made ready for sampling: the fused inference layout, and graph mode when asked.

Graph mode (``--compile`` or ``DIMOO_COMPILE=1``) runs the model's forward under ``torch.compile(fullgraph=True,
dynamic=False)`` with the backend the device's adapter names (inductor on CPU and CUDA, torchair on Ascend). The
samplers keep shapes static across the steps of a request group, so each group compiles a few graphs once: a
plain image step asks the head for every grid cell (not only the masked ones), a cached step recomputes a width
fixed per group, and the understanding steps are static already. Without graph mode nothing changes.
"""

from __future__ import annotations

import torch

from dimoo_npu.adapters import BACKENDS
from dimoo_npu.model import DiMOOModel
from dimoo_npu.quantization import fuse_for_sampling
from dimoo_npu.utils import envs

RECOMPILE_LIMIT = 64


def prepare_for_sampling(model: DiMOOModel, compile: bool | None = None) -> DiMOOModel:
    """Fuse the projections (see `fuse_projections`, int8 too) and, when ``compile`` (None: ``DIMOO_COMPILE``),
    compile; int8 models too (their fused `QuantizedLinear`s trace as one graph with the rest)."""
    fuse_for_sampling(model)
    if envs.compile_enabled() if compile is None else compile:
        compile_forward(model)
    return model


def compile_forward(model: DiMOOModel, backend=None) -> DiMOOModel:
    """Graph mode for the model's forward, in place; the samplers then keep their shapes static.

    ``backend``: None for the device's own (the adapter's ``compile_backend``); tests pass ``"aot_eager"`` to trace
    the same whole graph without inductor's minutes of code generation on a small CPU.
    """
    if backend is None:
        backend = BACKENDS[next(model.parameters()).device.type]().compile_backend()
    # Each request group compiles its few graphs (one per kind of step and shape): allow many groups per process.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    model.compile(fullgraph=True, dynamic=False, backend=backend)
    model.static_shapes = True
    return model


def static_shapes(model: torch.nn.Module) -> bool:
    """Whether the samplers must keep the forward's shapes fixed across steps (a compiled model)."""
    return bool(getattr(model, "static_shapes", False))
