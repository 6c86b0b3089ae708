"""The model against the public reference code's goldens (tests/fixtures/tiny-dimoo, padded batch)."""

from __future__ import annotations

import filecmp

import pytest
import torch

import dimoo_npu
from dimoo_npu.modeling.losses import masked_diffusion_loss
from dimoo_npu.numerics.compare import compare_layer
from dimoo_npu.numerics.golden import forward_errors, golden_batch, image_logits_within
from dimoo_npu.numerics.tolerances import GOLDEN_LOSS_ATOL, tolerance
from dimoo_npu.ops import resolve_ops
from tests.conftest import CHECKPOINT, FIXTURES, SHARED_FIXTURES


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_fp32_logits_hidden_states_and_loss_match_golden(golden, impl):
    model = dimoo_npu.load_model(CHECKPOINT, ops=resolve_ops("cpu", impl))
    errors = forward_errors(model, golden, torch.device("cpu"))
    assert set(errors) == {"logits_image", "logits_text_top", "logits_full_pos0", "hidden.0", "hidden.1", "loss"}
    atol = tolerance("golden", torch.float32).atol
    too_far = {key: error for key, error in errors.items() if error > (GOLDEN_LOSS_ATOL if key == "loss" else atol)}
    assert not too_far, f"beyond the fp32 tolerance: {too_far}"


def test_padding_does_not_change_real_positions(tiny_model, golden):
    ids, lengths, mask = golden_batch(golden)
    short = int(lengths.min())
    row = int(lengths.argmin())
    with torch.no_grad():
        batched = tiny_model(ids, mask)[row, :short]
        alone = tiny_model(ids[row : row + 1, :short])[0]
    diff = compare_layer("logits", alone, batched, tolerance("layer", torch.float32))  # summation order differs
    assert diff.passed, diff


def test_loss_matches_golden(tiny_model, golden):
    ids, _, mask = golden_batch(golden)
    with torch.no_grad():
        loss = masked_diffusion_loss(tiny_model(ids, mask), golden["loss.labels"])
    assert loss.dim() == 0
    torch.testing.assert_close(loss, golden["loss.value"][0], atol=GOLDEN_LOSS_ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_logits_within_tolerance(golden, dtype):
    model = dimoo_npu.load_model(CHECKPOINT, dtype=dtype)
    assert model.transformer.wte.weight.dtype == dtype
    failed = [diff for diff in image_logits_within(model, golden, torch.device("cpu")) if not diff.passed]
    assert not failed, failed


@pytest.mark.skipif(not SHARED_FIXTURES.is_dir(), reason="no ../shared checkout beside this clone to compare against")
def test_fixture_copy_equals_shared():
    comparison = filecmp.dircmp(FIXTURES, SHARED_FIXTURES)
    stack, differing = [comparison], []
    while stack:
        node = stack.pop()
        differing += node.left_only + node.right_only + node.diff_files
        _, mismatch, errors = filecmp.cmpfiles(node.left, node.right, node.common_files, shallow=False)
        differing += mismatch + errors
        stack += node.subdirs.values()
    assert not differing, f"tests/fixtures/tiny-dimoo differs from ../shared: {differing}; copy it again"
