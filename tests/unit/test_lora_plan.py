"""`dimoo train CONFIG --plan` counts a LoRA run: the frozen base once in bf16, fp32 adapters, their gradients and
AdamW states; the 8B at rank 64 fits one 910B and one H100, which its full fine-tune does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dimoo_npu.cli import main
from dimoo_npu.modeling.presets import preset_config

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "train" / "dimoo_8b_ascend.yaml")
ONE_DEVICE = [
    "tensor_model_parallel_size=1",
    "pipeline_model_parallel_size=1",
    "sequence_parallel=false",
    "global_batch_size=1",
]
GIB = 1 << 30


@pytest.fixture
def plan(monkeypatch, capsys, tmp_path):
    """The JSON plan of the 8B config on one device; returns (exit code, stdout, plan)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "1")

    def run(accelerator: str, *overrides: str) -> tuple[int, str, dict]:
        code = main(["train", CONFIG, *ONE_DEVICE, *overrides, "--plan", "--accelerator", accelerator, "--json", "p"])
        return code, capsys.readouterr().out, json.loads((tmp_path / "p").read_text())

    return run


def adapter_elements(rank: int) -> int:
    """rank x (in + out) for every projection of every block."""
    model = preset_config("lumina-dimoo-8b")
    d, h = model.d_model, model.mlp_hidden_size
    return model.n_layers * rank * (4 * (d + d) + 2 * (d + h) + (h + d))


@pytest.mark.parametrize("accelerator", ["910b", "h100"])
def test_the_8b_at_rank_64_fits_one_device_and_its_full_fine_tune_does_not(plan, accelerator):
    code, out, lora = plan(accelerator, "lora.rank=64")
    assert code == 0 and lora["fits"] and "LoRA rank 64 on 7 projections" in out, out
    memory = lora["ranks"][0]["memory"]
    trained = adapter_elements(64)
    assert memory["LoRA adapters fp32"] == 4 * trained and memory["LoRA grads fp32"] == 4 * trained
    assert memory["LoRA AdamW m, v fp32"] == 8 * trained
    code, _, full = plan(accelerator)
    assert code == 1 and not full["fits"]
    base = full["ranks"][0]["memory"]["weights fp32"]
    assert memory["frozen base bf16"] == base / 2, "the base is held once, in bf16, with no fp32 master copy"
    assert lora["ranks"][0]["total"] < 40 * GIB < full["ranks"][0]["total"] / 3


def test_fsdp2_shards_the_frozen_base_and_the_adapters(plan, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    code, _, sharded = plan("910b", "lora.rank=64", "global_batch_size=4")
    assert code == 0 and sharded["layout"]["dp"] == 4
    memory = sharded["ranks"][0]["memory"]
    assert memory["LoRA AdamW m, v fp32"] <= 8 * adapter_elements(64) / 4 * 1.01
    assert "frozen base bf16 (owned shard)" in memory and "weights gathered for compute" in memory
