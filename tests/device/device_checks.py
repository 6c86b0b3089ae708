"""Checks shared by the hardware suites (tests/device/cuda, tests/device/npu): ops and the tiny model on a device.

Tolerances: the ``op`` and ``golden`` rows of `dimoo_npu.numerics.tolerances.TOLERANCES`, as on CPU.
"""

from __future__ import annotations

import torch

import dimoo_npu
from dimoo_npu.numerics.golden import forward_errors, image_logits_within
from dimoo_npu.numerics.op_parity import DTYPES, op_cases, parity_failure
from dimoo_npu.numerics.tolerances import GOLDEN_LOSS_ATOL, tolerance
from dimoo_npu.ops import resolve_ops
from tests.conftest import CHECKPOINT


def op_parity_failures(impl: str, device: str) -> list[str]:
    ops = resolve_ops(device, impl)
    return [
        failure
        for case in op_cases()
        for dtype in DTYPES
        if (failure := parity_failure(getattr(ops, case.op), case, dtype, device))
    ]


def assert_model_matches_golden(device: str, dtype: torch.dtype, impl: str, golden: dict[str, torch.Tensor]) -> None:
    model = dimoo_npu.load_model(CHECKPOINT, device=device, dtype=dtype, ops=resolve_ops(device, impl))
    assert next(model.parameters()).device.type == device
    if dtype == torch.float32:
        errors = forward_errors(model, golden, torch.device(device))
        assert max(v for k, v in errors.items() if k != "loss") <= tolerance("golden", dtype).atol, errors
        assert errors["loss"] <= GOLDEN_LOSS_ATOL, errors
        return
    failed = [diff for diff in image_logits_within(model, golden, torch.device(device)) if not diff.passed]
    assert not failed, failed
