"""Loader options and defects of issue 12: device="meta", max_layers, one rope_theta default, non-integer ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import dimoo_npu
from dimoo_npu.files import safetensors_io
from dimoo_npu.model import DiMOOModel
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.utils.errors import CheckpointError, InputError
from tests.conftest import CHECKPOINT

IDS = torch.tensor([[5, 17, 126336, 126356, 126400, 126081]])


def _copied_names(monkeypatch) -> list[str]:
    """Names of the tensors whose bytes the reader copies from now on."""
    copied: list[str] = []
    real = safetensors_io._copy_entry

    def spy(mapped, entry, destination):
        copied.append(entry.name)
        real(mapped, entry, destination)

    monkeypatch.setattr(safetensors_io, "_copy_entry", spy)
    return copied


def test_meta_load_has_the_shapes_and_reads_no_data(tiny_model, monkeypatch):
    copied = _copied_names(monkeypatch)
    model = dimoo_npu.load_model(CHECKPOINT, device="meta", dtype=torch.bfloat16)
    assert copied == []
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    assert shapes == {name: tuple(p.shape) for name, p in tiny_model.state_dict().items()}


def test_meta_load_defaults_to_fp32_and_still_checks_the_headers(tmp_path):
    assert {p.dtype for p in dimoo_npu.load_model(CHECKPOINT, device="meta").parameters()} == {torch.float32}
    folder = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINT, folder, ignore=shutil.ignore_patterns("vqvae"))
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "mlp_hidden_size": 96}))
    with pytest.raises(CheckpointError, match="different models"):
        dimoo_npu.load_model(folder, device="meta")


def _one_layer_reference(tiny_model) -> DiMOOModel:
    """A model built with 1 layer from the fixture's weights, without `max_layers`."""
    config = DiMOOConfig.from_json(CHECKPOINT)
    config.n_layers = 1
    model = DiMOOModel(config)
    state = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("model.transformer.blocks.1.")}
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_max_layers_equals_a_model_built_with_those_layers(tiny_model, monkeypatch):
    copied = _copied_names(monkeypatch)
    model = dimoo_npu.load_model(CHECKPOINT, max_layers=1)
    assert list(model.transformer.blocks) == ["0"] and model.config.n_layers == 1
    assert copied and not any(".blocks.1." in name for name in copied)
    assert torch.equal(model(IDS), _one_layer_reference(tiny_model)(IDS))
    assert not torch.equal(model(IDS), tiny_model(IDS))


def test_max_layers_of_all_layers_is_the_full_model(tiny_model):
    assert torch.equal(dimoo_npu.load_model(CHECKPOINT, max_layers=2)(IDS), tiny_model(IDS))


@pytest.mark.parametrize("layers", [0, 3, -1])
def test_max_layers_out_of_range_is_named(layers):
    with pytest.raises(InputError, match=rf"max_layers {layers}.*between 1 and 2"):
        dimoo_npu.load_model(CHECKPOINT, max_layers=layers)


def test_max_layers_skips_shards_it_does_not_need(tmp_path, tiny_model, monkeypatch):
    """A shard that holds only later blocks is never opened."""
    from dimoo_npu.checkpoint import save_pretrained

    save_pretrained(tiny_model.state_dict(), tiny_model.config, tmp_path / "ckpt", max_shard_bytes=1 << 14)
    opened: list[str] = []
    real = safetensors_io.iter_tensors

    def spy(path, make_destination):
        opened.append(Path(path).name)
        return real(path, make_destination)

    monkeypatch.setattr("dimoo_npu.checkpoint.iter_tensors", spy)
    dimoo_npu.load_model(tmp_path / "ckpt", max_layers=1)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())["weight_map"]
    only_block_1 = set(index.values()) - {f for k, f in index.items() if ".blocks.1." not in k}
    assert only_block_1 and not only_block_1 & set(opened)


def test_rope_theta_has_one_default():
    raw = json.loads((CHECKPOINT / "config.json").read_text())
    del raw["rope_theta"]
    sizes = {k: raw[k] for k in ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "embedding_size")}
    assert DiMOOConfig.from_dict(raw).rope_theta == DiMOOConfig(**sizes).rope_theta == 10000.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.bool, torch.uint8, torch.int16])
def test_non_integer_or_narrow_ids_are_refused_at_the_input_check(tiny_model, dtype):
    with pytest.raises(InputError, match=rf"input_ids must be an integer tensor \(int64 or int32\).*got {dtype}"):
        tiny_model(IDS.clamp(max=200).to(dtype))


def test_int32_ids_equal_int64(tiny_model):
    assert torch.equal(tiny_model(IDS.int()), tiny_model(IDS))


def test_check_with_layers_compares_only_those_blocks(monkeypatch, capsys, tmp_path):
    from dimoo_npu.cli import main

    copied = _copied_names(monkeypatch)
    out = tmp_path / "check.json"
    assert main(["check", "--checkpoint", str(CHECKPOINT), "--layers", "1", "--length", "16", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [layer["layer"] for layer in report["backends"]["cpu"]["layers"]] == ["block.0", "logits"]
    assert report["inputs"]["layers"] == 1 and report["passed"]
    assert not any(".blocks.1." in name for name in copied)
    assert main(["check", "--checkpoint", str(CHECKPOINT), "--layers", "3"]) == 2
