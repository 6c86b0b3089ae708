"""Checks shared by the hardware suites (tests/device/cuda, tests/device/npu): ops and the tiny model on a device.

Tolerances: ops, `dimoo_npu.ops.parity.TOLERANCES`; model fp32, the golden's 2e-4 (cases.json forward.atol_fp32);
model bf16, 6% of the largest golden logit and cosine >= 0.999, as justified in tests/golden/test_forward_golden.py.
"""

from __future__ import annotations

import torch

import dimoo_npu
from dimoo_npu.golden import forward_errors
from dimoo_npu.ops import resolve_ops
from dimoo_npu.ops.parity import DTYPES, op_cases, parity_failure
from tests.conftest import CHECKPOINT

ATOL_FP32 = 2e-4
BF16_REL_TOL = 0.06
BF16_MIN_COSINE = 0.999


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
        assert max(v for k, v in errors.items() if k != "loss") <= ATOL_FP32, errors
        assert errors["loss"] <= 1e-4, errors
        return
    ids, lengths = golden["forward.input_ids"], golden["forward.lengths"]
    mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
    with torch.no_grad():
        logits = model(ids.to(device), mask.to(device)).float().cpu()
    for row, n in enumerate(lengths.tolist()):
        got, ref = logits[row, :n, -8192:], golden["forward.logits_image"][row, :n]
        assert float((got - ref).abs().max()) <= BF16_REL_TOL * float(ref.abs().max())
        assert float(torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)) >= BF16_MIN_COSINE
