"""The fake torch_npu's dispatcher registrations: operators in the ``npu`` namespace, made once per process.

The real torch_npu registers its operators with the dispatcher from its C++ library (schemas: op-plugin
op_plugin/config/op_plugin_functions.yaml) and their shape functions from op_plugin/python/meta/_meta_registrations.py
(``Library("npu", "IMPL", "Meta")``); its ``__init__`` then sets ``torch_npu.<op> = torch.ops.npu.<op>`` for every
one. So torch.compile records each call as one ``torch.ops.npu.<op>`` node, shaped by its Meta function, which
torchair converts to a GE operator. A registration cannot be undone (the real one lives in a .so), and tests drop
and re-import the fake ``torch_npu`` package (tests/conftest.py), so the registrations live here, outside it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LIBRARY = torch.library.Library("npu", "FRAGMENT")  # kept for the process: dropping it would unregister the ops


def define(schema: str, kernel: Callable, meta: Callable) -> torch._ops.OpOverloadPacket:
    """``torch.ops.npu.<name>`` with this schema, ``kernel`` for CPU tensors and ``meta`` for tracing; once."""
    name = schema.split("(", 1)[0]
    if not hasattr(torch.ops.npu, name):
        _LIBRARY.define(schema)
        _LIBRARY.impl(name, kernel, "CPU")
        _LIBRARY.impl(name, meta, "Meta")
    return getattr(torch.ops.npu, name)
