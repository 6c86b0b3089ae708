"""On a CUDA GPU: every op (torch and reference kernels) against the reference, and the tiny model vs the goldens."""

from __future__ import annotations

import pytest
import torch

from tests.device.device_checks import assert_model_matches_golden, op_parity_failures

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible (CUDA hardware test)")


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_ops_match_reference_on_cuda(impl):
    assert op_parity_failures(impl, "cuda") == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_tiny_model_on_cuda_matches_golden(golden, impl, dtype):
    assert_model_matches_golden("cuda", dtype, impl, golden)
