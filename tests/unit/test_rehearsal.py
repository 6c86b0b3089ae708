"""scripts/rehearse_8b.py on its small shape: the 8B rehearsal's code (write, load, partial load, forward, check,
understanding steps)."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest

import dimoo_npu
from dimoo_npu.files.safetensors_io import read_header
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.sampling.text import masked_bounds
from dimoo_npu.settings.generation_settings import DEFAULTS

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


def test_understand_step_uses_the_public_settings_on_the_8b_shape(rehearse_8b):
    settings = rehearse_8b.UNDERSTAND_SETTINGS["8b"]
    public = DEFAULTS["understand"]
    assert (
        {k: settings[k] for k in ("gen_length", "block_length", "steps")}
        == {
            "gen_length": 1024,
            "block_length": 256,
            "steps": 128,
        }
        == {k: public[k] for k in ("gen_length", "block_length", "steps")}
    )
    assert settings["image_side"] == public["image_budget"] == 1024
    config = DiMOOConfig.from_dict(rehearse_8b.public_config("8b"))
    ids = rehearse_8b.understanding_input(config, settings["image_side"], settings["gen_length"])
    assert ids.numel() == 18 + 64 * 65 + 2 + 1024 + 2  # ~4,180 prompt tokens and the answer's BOA + MASKs + EOA
    # the whole answer: 4 blocks of 32 steps, exact every step against one storing and 31 cached steps per block
    assert rehearse_8b.answer_ratio(2.0, 2.0, 0.5, 4, 32) == pytest.approx(128 * 2.0 / (4 * 2.0 + 124 * 0.5))


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
    figures = rehearse_8b.rehearse(tmp_path, "small", layers=1, keep=False, fresh_processes=False, understand=True)
    assert figures["load"]["weights_bytes"] == figures["weights_bytes"]
    forward = figures["forward"]
    assert forward["tokens"] == 4182 and forward["logits_shape"] == [1, 64 * 64, 8192] and forward["logits_finite"]
    assert forward["weights_read_bytes"] < figures["weights_bytes"]  # block 1 was not read
    check = figures["check"]
    assert check["exit_code"] == 0 and check["passed"] and list(check["max_abs_by_layer"]) == ["block.0", "logits"]
    understand, repeats = figures["understand"], rehearse_8b.UNDERSTAND_REPEATS
    assert understand["tokens"] == 18 + 16 * 17 + 2 + 64 + 2 and understand["layers"] == 1
    assert understand["projected_layers"] == 2  # the checkpoint's blocks, not the ones loaded
    for kind in ("exact", "store", "cached"):
        step = understand[kind]
        assert len(step["seconds"]) == repeats and all(len(blocks) == 1 for blocks in step["block_seconds"])
        assert 0 < step["per_layer_seconds"] and 0 < step["rest_seconds"] < max(step["seconds"])
        assert step["projected_seconds"] == pytest.approx(
            2 * step["per_layer_seconds"] + step["rest_seconds"], abs=2e-3
        )
    # the cached steps timed are the block's middle ones: their median head width is a cached step's mean width
    assert statistics.median(understand["cached"]["head_widths"]) == statistics.mean(masked_bounds([16], 8)[1:])
    projected = [understand[kind]["projected_seconds"] for kind in ("exact", "store", "cached")]
    assert understand["exact_over_dual_projected"] == round(rehearse_8b.answer_ratio(*projected, 4, 8), 3)
    assert list(tmp_path.iterdir()) == []  # the checkpoint is deleted without --keep
