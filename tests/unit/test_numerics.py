"""Numerical checks: metrics and pass rule, tolerances, capture against the goldens, targets, slot, check, report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dimoo_npu.adapters import BackendUnavailableError, CudaBackend
from dimoo_npu.modeling.block_outputs import layer_names, run_with_capture
from dimoo_npu.numerics.backends import TARGETS, ModelSlot, parse_targets, require_available
from dimoo_npu.numerics.check import make_check_inputs, run_check
from dimoo_npu.numerics.compare import compare_layer, real_positions
from dimoo_npu.numerics.report import format_table, write_json, write_plot
from dimoo_npu.numerics.tolerances import TOLERANCES, Tolerance, tolerance_for
from dimoo_npu.ops import resolve_ops
from dimoo_npu.utils.errors import InputError

TOL = Tolerance(atol=1e-4, rtol=1e-4, min_cosine=0.99999)


def test_identical_layers_pass_with_zero_error():
    x = torch.randn(5, 7)
    diff = compare_layer("block.0", x, x.clone(), TOL)
    assert (diff.max_abs, diff.max_rel, diff.cosine, diff.passed) == (0.0, 0.0, 1.0, True)


def test_error_is_judged_against_the_layer_scale():
    ref = torch.zeros(4, 8)
    ref[0, 0] = 1000.0  # one huge activation sets the scale, as in real hidden states
    other = ref.clone()
    other[1, 1] = 0.05  # 5e-5 of the scale: within atol + rtol * 1000
    diff = compare_layer("block.3", ref, other, TOL)
    assert diff.passed and diff.max_abs == pytest.approx(0.05) and diff.max_rel == pytest.approx(5e-5)
    other[1, 1] = 0.5
    assert not compare_layer("block.3", ref, other, TOL).passed


def test_low_cosine_fails_even_within_abs_tolerance():
    ref = torch.tensor([1e-5, 0.0])
    other = torch.tensor([0.0, 1e-5])
    diff = compare_layer("logits", ref, other, TOL)
    assert diff.max_abs <= TOL.atol and diff.cosine < 0.5 and not diff.passed


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_fail_with_a_note(bad):
    ref = torch.ones(3)
    other = torch.tensor([1.0, bad, 1.0])
    diff = compare_layer("block.1", ref, other, TOL)
    assert not diff.passed and "non-finite" in diff.note
    both = compare_layer("block.1", other, other.clone(), TOL)  # nan == nan is not agreement
    assert not both.passed


def test_shape_mismatch_fails():
    diff = compare_layer("logits", torch.zeros(2, 3), torch.zeros(2, 4), TOL)
    assert not diff.passed and "shape" in diff.note


def test_tolerance_overrides_per_dtype():
    assert tolerance_for("float32") == TOLERANCES["layer"]["float32"]
    assert tolerance_for("bfloat16", atol="3e-2").atol == 3e-2
    per_dtype = tolerance_for("float32", atol="float32=5e-5,bfloat16=1e-1", rtol="0", min_cosine=0.9)
    assert (per_dtype.atol, per_dtype.rtol, per_dtype.min_cosine) == (5e-5, 0.0, 0.9)
    assert tolerance_for("float16", atol="bfloat16=1e-1").atol == TOLERANCES["layer"]["float16"].atol


@pytest.mark.parametrize(("spec", "needle"), [("int8=1e-3", "unknown dtype 'int8'"), ("lots", "not a number")])
def test_bad_tolerance_is_named(spec, needle):
    with pytest.raises(InputError, match=needle):
        tolerance_for("float32", atol=spec)


def test_capture_matches_the_golden_hidden_states(tiny_model, golden):
    ids, lengths = golden["forward.input_ids"], golden["forward.lengths"]
    mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]  # (B, L)
    outputs = run_with_capture(tiny_model, ids, mask)
    assert list(outputs) == layer_names(tiny_model.config.n_layers)
    for i in range(tiny_model.config.n_layers):
        torch.testing.assert_close(outputs[f"block.{i}"][mask], golden[f"forward.hidden.{i}"][mask], atol=2e-4, rtol=0)
    assert not any(block._forward_hooks for block in tiny_model.transformer.blocks.values())  # hooks removed


def test_real_positions_drop_padding():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    kept = real_positions({"x": torch.arange(6.0).view(2, 3, 1)}, mask)["x"]
    assert kept.flatten().tolist() == [0.0, 1.0, 2.0, 3.0]


def test_check_inputs_are_seeded_and_in_vocabulary(tiny_model):
    config = tiny_model.config
    ids, mask = make_check_inputs(config, batch=3, length=40, seed=7)
    again, _ = make_check_inputs(config, batch=3, length=40, seed=7)
    assert torch.equal(ids, again) and ids.shape == mask.shape == (3, 40)
    assert 0 <= int(ids.min()) and int(ids.max()) < config.embedding_size
    assert (ids == config.special_tokens["mask"]).any()
    assert mask[:-1].all() and not mask[-1, -10:].any()
    with pytest.raises(InputError, match="--length"):
        make_check_inputs(config, length=max(8192, config.max_sequence_length) + 1)


def test_targets_parse_and_name_unknown_ones():
    assert [t.name for t in parse_targets("cpu-ref, cpu ,onnxruntime")] == ["cpu-ref", "cpu", "onnxruntime"]
    with pytest.raises(InputError, match=r"unknown backend 'tpu'.*cpu-ref"):
        parse_targets("cpu-ref,tpu")
    with pytest.raises(InputError, match="twice"):
        parse_targets("cpu,cpu")
    with pytest.raises(InputError, match="at least two"):
        parse_targets("cpu")


def test_unavailable_target_gives_the_adapters_reason_and_fix():
    status = CudaBackend().availability()
    assert not status, "this test expects a machine without CUDA"
    with pytest.raises(BackendUnavailableError) as err:
        require_available([TARGETS["cpu-ref"], TARGETS["cuda"]])
    assert "'cuda'" in str(err.value) and status.reason in str(err.value) and status.fix in str(err.value)


def test_model_slot_keeps_one_model_and_switches_ops(checkpoint_dir):
    slot = ModelSlot(checkpoint_dir)
    reference = slot.get("cpu", torch.float32, "reference")
    assert reference.ops.names["attention"] == "reference"
    fast = slot.get("cpu", torch.float32, "torch")
    assert fast is reference and fast.ops.names["attention"] == "torch"  # same weights, ops switched
    half = slot.get("cpu", torch.bfloat16, "torch")
    assert half is not reference and next(half.parameters()).dtype == torch.bfloat16
    slot.release()
    assert slot._model is None


def test_check_passes_cpu_against_reference_and_fails_with_zero_tolerance(checkpoint_dir):
    targets = parse_targets("cpu-ref,cpu")
    report = run_check(checkpoint_dir, targets, length=24)
    assert report.passed and [d.layer for d in report.comparisons[0].diffs] == ["block.0", "block.1", "logits"]
    assert all(0 < d.max_abs < 1e-4 for d in report.comparisons[0].diffs)  # different kernels, tiny error
    strict = run_check(checkpoint_dir, targets, tolerance=Tolerance(0.0, 0.0, 1.0), length=24)
    assert not strict.passed and strict.comparisons[0].first_failure == "block.0"


def test_check_runs_in_bfloat16_with_its_tolerance(checkpoint_dir):
    report = run_check(checkpoint_dir, parse_targets("cpu-ref,cpu"), "bf16", length=16)
    assert report.dtype == "bfloat16" and report.tolerance == TOLERANCES["layer"]["bfloat16"]
    assert report.passed, format_table(report)


def test_report_table_json_and_plot(checkpoint_dir, tmp_path):
    report = run_check(checkpoint_dir, parse_targets("cpu-ref,cpu"), tolerance=Tolerance(0.0, 0.0, 1.0), length=16)
    table = format_table(report)
    assert "max abs" in table and "cosine" in table and "first failing layer: block.0" in table
    assert table.splitlines()[-1].startswith("FAIL: cpu from block.0")
    data = json.loads(write_json(report, tmp_path / "out" / "check.json").read_text())
    cpu = data["backends"]["cpu"]
    assert data["passed"] is False and cpu["first_failing_layer"] == "block.0" and len(cpu["layers"]) == 3
    assert all(math.isfinite(layer["max_abs"]) for layer in cpu["layers"])
    png = write_plot(report, tmp_path / "check.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["check.json", "check.png", "out"]  # no temp files left


def test_reference_ops_are_what_cpu_ref_uses():
    assert set(resolve_ops("cpu", TARGETS["cpu-ref"].ops).names.values()) == {"reference"}
