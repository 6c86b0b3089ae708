"""msModelSlim W8A8-dynamic exports (issue 27): loaded directly, equal to our own w8a8; other schemes and
exports whose description and weights disagree are refused before anything loads.

The fixture tests/fixtures/msmodelslim-w8a8 was made by msmodelslim 26.1.0 itself (scripts/make_msmodelslim_fixture.py)
from the tiny fixture with its vocabulary cut to 512 rows.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dimoo_npu
from dimoo_npu.numerics.compare import compare_layer
from dimoo_npu.numerics.tolerances import tolerance
from dimoo_npu.quantization import QuantizationSpec, QuantizedLinear, quantize_model
from dimoo_npu.utils.errors import CheckpointError, InputError

ROOT = Path(__file__).resolve().parents[2]
EXPORT = ROOT / "tests" / "fixtures" / "msmodelslim-w8a8"
DESCRIPTION = "quant_model_description_w8a8_dynamic.json"
WEIGHTS = "quant_model_weight_w8a8_dynamic.safetensors"


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_msmodelslim_fixture", ROOT / "scripts" / "make_msmodelslim_fixture.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_loads_as_our_w8a8_of_the_same_weights():
    slim = dimoo_npu.load_model(EXPORT)
    ours = quantize_model(_script().small_vocab_model(), QuantizationSpec("w8a8"))
    assert slim.config.quantization_config["scheme"] == "w8a8"
    linears = [m for m in slim.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 7 * slim.config.n_layers  # every block matmul int8, as msModelSlim described them
    slim_state, our_state = slim.state_dict(), ours.state_dict()
    assert slim_state.keys() == our_state.keys()
    for name, tensor in slim_state.items():  # both round weights symmetric per output channel: the same integers
        if tensor.dtype == torch.int8:
            assert torch.equal(tensor, our_state[name]), name
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 19:] = False
    with torch.no_grad():
        diff = compare_layer("logits", ours(ids, mask), slim(ids, mask), tolerance("int8", "w8a8"))
    assert diff.passed, diff


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "export"
    shutil.copytree(EXPORT, folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


def _edit_description(folder: Path, change) -> None:
    path = folder / DESCRIPTION
    description = json.loads(path.read_text())
    change(description)
    path.write_text(json.dumps(description))


def _edit_weights(folder: Path, change) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS))


@pytest.fixture
def no_load(monkeypatch):
    """Fail if any weight is read into a model: refusals must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr("dimoo_npu.checkpoint.load_export_state", refuse)


@pytest.mark.parametrize(
    "scheme, named",
    [
        ("W4A8_DYNAMIC", "4-bit weights"),
        ("W8A8S", "sparse W8A8"),
        ("W8A8SC", "sparse compressed"),
        ("W8A8", "static W8A8"),
        ("W8A16", "weight-only int8 with per-channel offsets"),
        ("W2A2", "a scheme this package does not know"),
    ],
)
def test_other_schemes_are_refused_by_name(tmp_path, no_load, scheme, named):
    folder = _copy(tmp_path)
    _edit_description(folder, lambda d: d.update(model_quant_type=scheme))
    with pytest.raises(InputError, match=rf"msModelSlim scheme '{scheme}' \({named}.*runs W8A8_DYNAMIC exports only"):
        dimoo_npu.load_model(folder)


def _drop_described(d):
    del d["model.transformer.blocks.1.up_proj.weight_offset"]


def _float_weight(t):
    t["model.transformer.blocks.0.q_proj.weight"] = t["model.transformer.blocks.0.q_proj.weight"].float()


def _flat_scale(t):
    t["model.transformer.blocks.0.k_proj.weight_scale"] = t["model.transformer.blocks.0.k_proj.weight_scale"][:, 0]


def _lost_tensor(t):
    del t["model.transformer.blocks.1.ff_out.weight_scale"]


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (
            (_drop_described, None),
            CheckpointError,
            r"disagree: .*present but not described \['model.transformer.blocks.1",
        ),
        ((None, _lost_tensor), CheckpointError, r"disagree: described but absent \['model.transformer.blocks.1.ff_out"),
        (
            (None, _float_weight),
            CheckpointError,
            r"q_proj.weight is described W8A8_DYNAMIC but stored as torch.float32",
        ),
        ((None, _flat_scale), CheckpointError, r"k_proj.weight is described W8A8_DYNAMIC .* float \(N, 1\)"),
        ((lambda d: d.update({"model.transformer.blocks.0.q_proj.weight": "W4A8_DYNAMIC"}), None), InputError, "mixes"),
        ((None, lambda t: t["model.transformer.blocks.0.v_proj.weight_offset"].fill_(3.0)), InputError, "asymmetric"),
    ],
    ids=["undescribed", "absent", "float-weight", "flat-scale", "mixed-type", "offset"],
)
def test_description_and_weights_that_disagree_are_refused_before_load(tmp_path, no_load, edit, error, message):
    folder = _copy(tmp_path)
    description_change, weights_change = edit
    if description_change:
        _edit_description(folder, description_change)
    if weights_change:
        _edit_weights(folder, weights_change)
    with pytest.raises(error, match=message):
        dimoo_npu.load_model(folder)


def test_export_is_not_quantized_twice_and_meta_reads_no_weights(no_load):
    with pytest.raises(InputError, match="msModelSlim int8 export .* load it without --quantize"):
        dimoo_npu.load_model(EXPORT, quantize="w8a8")
    meta = dimoo_npu.load_model(EXPORT, device="meta")
    assert meta.transformer.blocks["0"].q_proj.weight.dtype == torch.int8


# --- writing the layout: `dimoo quantize --format msmodelslim` ----------------------------------------------------


def test_our_export_is_msmodelslims_own_layout_tensor_for_tensor(tmp_path):
    """Our w8a8 of the fixture's source, written as msModelSlim, equals what msmodelslim 26.1.0 wrote: the same
    description, the same tensor names, dtypes, shapes and values."""
    from dimoo_npu.files.msmodelslim import write_export

    model = quantize_model(_script().small_vocab_model(), QuantizationSpec("w8a8"))
    write_export(model.state_dict(), model.config, tmp_path)
    assert json.loads((tmp_path / DESCRIPTION).read_text()) == json.loads((EXPORT / DESCRIPTION).read_text())
    ours, theirs = load_file(str(tmp_path / WEIGHTS)), load_file(str(EXPORT / WEIGHTS))
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


def test_quantize_format_msmodelslim_round_trip(tmp_path, caplog):
    from dimoo_npu.cli import main
    from tests.conftest import CHECKPOINT

    out = tmp_path / "slim"
    argv = ["quantize", "--checkpoint", str(CHECKPOINT), "--scheme", "w8a8", "--output", str(out)]
    assert main([*argv, "--format", "msmodelslim"]) == 0
    assert {DESCRIPTION, WEIGHTS, "config.json"} <= {p.name for p in out.iterdir()}
    assert main([*argv[:-1], str(tmp_path / "ours")]) == 0
    slim, ours = dimoo_npu.load_model(out), dimoo_npu.load_model(tmp_path / "ours")
    assert all(torch.equal(t, ours.state_dict()[name]) for name, t in slim.state_dict().items())
    assert main([*argv[:4], "w8a16", "--output", str(tmp_path / "w8a16"), "--format", "msmodelslim"]) == 2
    assert "--format msmodelslim writes W8A8_DYNAMIC only" in caplog.text
    assert not (tmp_path / "w8a16").exists()


def test_a_static_layer_inside_a_dynamic_export_is_refused_by_its_type(tmp_path, no_load):
    folder = _copy(tmp_path)
    name = "model.transformer.blocks.0.q_proj"

    def static_q(d):
        d.update({f"{name}.weight": "W8A8", f"{name}.input_scale": "W8A8", "version": "1.0.0"})

    _edit_description(folder, static_q)
    _edit_weights(folder, lambda t: t.update({f"{name}.input_scale": torch.ones(1)}))
    with pytest.raises(InputError, match=r"mixes in msModelSlim type\(s\) \['W8A8'\]"):
        dimoo_npu.load_model(folder)


def test_a_linear_the_export_left_float_stays_float(tmp_path):
    folder = _copy(tmp_path)
    name = "model.transformer.blocks.1.attn_out"

    def described_float(d):
        d[f"{name}.weight"] = "FLOAT"
        del d[f"{name}.weight_scale"], d[f"{name}.weight_offset"]

    def stored_float(t):
        t[f"{name}.weight"] = t[f"{name}.weight"].float() * t.pop(f"{name}.weight_scale")
        del t[f"{name}.weight_offset"]

    _edit_description(folder, described_float)
    _edit_weights(folder, stored_float)
    model, whole = dimoo_npu.load_model(folder), dimoo_npu.load_model(EXPORT)
    assert type(model.transformer.blocks["1"].attn_out) is torch.nn.Linear
    assert isinstance(model.transformer.blocks["1"].q_proj, QuantizedLinear)
    assert name in model.config.quantization_config["modules_to_not_convert"]
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the same dequantised weights, only not rounded to int8 activations there
        diff = compare_layer("logits", whole(ids, None), model(ids, None), tolerance("int8", "w8a8"))
    assert diff.passed, diff
