"""scripts/rehearse_8b.py on its small shape: the 8B rehearsal's code (write, load, partial load, forward, check)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

import dimoo_npu
from dimoo_npu.files.safetensors_io import read_header

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "rehearse_8b.py"


@pytest.fixture(scope="module")
def rehearse_8b():
    spec = importlib.util.spec_from_file_location("rehearse_8b", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_8b_config_is_llada_8b(rehearse_8b):
    config = rehearse_8b.public_config("8b")
    assert {k: config[k] for k in ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "embedding_size")} == {
        "d_model": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "mlp_hidden_size": 12288,
        "embedding_size": 134548,
    }
    assert config["rope_theta"] == 500000.0 and config["weight_tying"] is False
    params = sum(math.prod(shape) for shape in rehearse_8b.weight_shapes(config).values())
    assert 8.0e9 < params < 8.2e9


def test_written_checkpoint_is_public_layout_and_loads(rehearse_8b, tmp_path):
    figures = rehearse_8b.write_checkpoint(tmp_path / "ckpt", "small")
    folder = tmp_path / "ckpt"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert figures["shards"] == len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == figures["weights_bytes"]
    for shard in set(index["weight_map"].values()):
        assert all(entry.dtype.itemsize == 2 for entry in read_header(folder / shard))  # bf16, validated
    assert (folder / "vqvae" / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    model = dimoo_npu.load_model(folder)
    weights = [p for name, p in model.named_parameters() if "norm" not in name and "ln_f" not in name]
    assert all(0.007 < float(p.abs().mean()) < 0.03 for p in weights)  # small random values, not zeros


def test_rehearsal_steps_on_the_small_shape(rehearse_8b, tmp_path):
    figures = rehearse_8b.rehearse(tmp_path, "small", layers=1, keep=False, fresh_processes=False)
    assert figures["load"]["weights_bytes"] == figures["weights_bytes"]
    forward = figures["forward"]
    assert forward["tokens"] == 4182 and forward["logits_shape"] == [1, 64 * 64, 8192] and forward["logits_finite"]
    assert forward["weights_read_bytes"] < figures["weights_bytes"]  # block 1 was not read
    check = figures["check"]
    assert check["exit_code"] == 0 and check["passed"] and list(check["max_abs_by_layer"]) == ["block.0", "logits"]
    assert list(tmp_path.iterdir()) == []  # the checkpoint is deleted without --keep
