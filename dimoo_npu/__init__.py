"""dimoo_npu: Lumina-DiMOO on Ascend NPUs, CUDA and CPU. Imports no vendor module at import time."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())


def load_model(path, device="cpu", dtype=None, ops=None, max_layers=None, quantize=None):
    """Load a DiMOO checkpoint folder; see `dimoo_npu.checkpoint.load_model`."""
    from dimoo_npu.checkpoint import load_model as _load_model

    return _load_model(path, device=device, dtype=dtype, ops=ops, max_layers=max_layers, quantize=quantize)


__all__ = ["__version__", "load_model"]
