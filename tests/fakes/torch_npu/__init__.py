"""A fake ``torch_npu`` for tests: the documented API, computed on CPU tensors.

Put ``tests/fakes`` on sys.path (the ``fake_torch_npu`` fixture in tests/conftest.py does) and ``import torch_npu``.
What it reproduces of the real import (Ascend/pytorch torch_npu/__init__.py, _init/registry/backend.py):
- ``torch.npu`` becomes this package's ``npu`` module, as ``torch._register_device_module("npu", ...)`` does. The
  privateuse1 backend is NOT renamed to "npu" (that cannot be undone within a process), so tensors stay on CPU
  and ``torch.device("npu")`` keeps failing; code under test must not need NPU tensors.
- ``FAKE_TORCH_NPU_MODE`` picks a failure to simulate:
  ``no_cann``: the import fails like torch_npu without CANN (Ascend/pytorch docs/zh/installation_guide/faq.md, Q2);
  ``no_device``: the import works, the driver reports no device (``torch.npu.is_available()`` is False);
  ``accelerator_conflict``: the import fails like torch_npu next to a CUDA build of torch (``_check_device_conflict``).
  The real conflict check is not run by default, so the fake also imports beside a CUDA build of torch.
"""

from __future__ import annotations

import os
import sys

import torch

__version__ = "2.13.0+fake"

_MODE = os.environ.get("FAKE_TORCH_NPU_MODE", "")

if _MODE == "no_cann":
    raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")
if _MODE == "accelerator_conflict":
    raise RuntimeError(
        "Two accelerators cannot be used at the same time in PyTorch: npu and cuda. You can install the cpu version "
        "of PyTorch to use your npu device, or use the cuda device with 'export TORCH_DEVICE_BACKEND_AUTOLOAD=0'."
    )

from torch_npu import npu  # noqa: E402
from torch_npu._attention import npu_fusion_attention  # noqa: E402
from torch_npu._ops import npu_add_rms_norm, npu_rms_norm, npu_rotary_mul, npu_swiglu  # noqa: E402
from torch_npu._quant import OPS  # noqa: E402

# As the real __init__ does for every op: torch_npu.<op> is torch.ops.npu.<op> (only the faked int8 ops are).
npu_dynamic_quant = OPS["npu_dynamic_quant"]
npu_quant_matmul = OPS["npu_quant_matmul"]
npu_weight_quant_batchmatmul = OPS["npu_weight_quant_batchmatmul"]


def _expose_as_torch_npu() -> None:
    """``torch.npu`` and ``sys.modules["torch.npu"]``, refusing to replace another module like torch does."""
    existing = getattr(torch, "npu", None)
    if existing is not None and existing is not npu:
        raise RuntimeError(f"The runtime module of 'npu' has already been registered with '{existing}'")
    torch.npu = npu
    sys.modules["torch.npu"] = npu


_expose_as_torch_npu()

__all__ = [
    "__version__",
    "npu",
    "npu_add_rms_norm",
    "npu_dynamic_quant",
    "npu_fusion_attention",
    "npu_quant_matmul",
    "npu_rms_norm",
    "npu_rotary_mul",
    "npu_swiglu",
    "npu_weight_quant_batchmatmul",
]
