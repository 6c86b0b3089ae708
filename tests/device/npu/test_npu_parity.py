"""On an Ascend NPU (real torch_npu): the fused kernels against the reference, and the tiny model vs the goldens."""

from __future__ import annotations

import pytest
import torch

from dimoo_npu.adapters import NpuBackend
from tests.device.device_checks import assert_model_matches_golden, op_parity_failures

_STATUS = NpuBackend().availability()
pytestmark = pytest.mark.skipif(not _STATUS.ok, reason=f"no usable Ascend NPU (NPU hardware test): {_STATUS.reason}")


@pytest.mark.parametrize("impl", ["npu", "reference"])
def test_ops_match_reference_on_npu(impl):
    assert op_parity_failures(impl, "npu") == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", ["npu", "reference"])
def test_tiny_model_on_npu_matches_golden(golden, impl, dtype):
    assert_model_matches_golden("npu", dtype, impl, golden)
