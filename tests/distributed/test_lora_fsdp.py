"""LoRA under FSDP2 data parallel on 2 gloo ranks: exact resume, the single-process losses, one adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dimoo_npu.checkpoint import save_pretrained
from dimoo_npu.files.lora import read_adapter
from dimoo_npu.model import DiMOOModel
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.numerics.compare import compare_layer
from dimoo_npu.numerics.tolerances import tolerance
from dimoo_npu.train.config import load_config
from dimoo_npu.train.trainer import run_training
from tests.unit.train_support import TINY_CONFIG, tiny_run_config, write_synthetic_shards

pytest.importorskip("peft")

WORKER = Path(__file__).with_name("lora_worker.py")
STEPS = 4


@pytest.fixture(scope="module")
def dp2_runs(run_distributed, tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    out = tmp_path_factory.mktemp("lora_dp2")
    write_synthetic_shards(out / "shards")
    config = DiMOOConfig.from_dict({"model_type": "llada", **load_config(TINY_CONFIG).model.config})
    torch.manual_seed(7)
    save_pretrained(DiMOOModel(config).state_dict(), config, out / "base")
    return out, out / "base", run_distributed(WORKER, 2, out, ["--base", str(out / "base")])


def test_resume_under_fsdp2_reproduces_the_uninterrupted_run(dp2_runs):
    _, _, ranks = dp2_runs
    assert ranks[0]["full"] == ranks[1]["full"], "every rank reports the same global loss"
    assert ranks[0]["resumed"] == ranks[0]["full"]


def test_fsdp2_matches_one_process_and_writes_one_whole_adapter(dp2_runs, tmp_path):
    out, base, ranks = dp2_runs
    overrides = [f"model.init_from={base}", "lora.rank=4", "lora.alpha=8", f"train_iters={STEPS}", "save_interval=0"]
    losses = run_training(tiny_run_config(tmp_path, *overrides, f"lr_decay_iters={STEPS}", shards=out / "shards"))
    op = tolerance("op", torch.float32)  # only the order of the reductions differs
    assert ranks[0]["full"] == pytest.approx(losses, rel=op.rtol, abs=op.atol)
    sharded, single = read_adapter(out / "full" / "run" / "lora"), read_adapter(tmp_path / "run" / "lora")
    assert sharded.pairs.keys() == single.pairs.keys() and sharded.scales == single.scales
    for name, (a, b) in single.pairs.items():
        for got, expected in zip(sharded.pairs[name], (a, b), strict=True):
            diff = compare_layer(name, expected, got, tolerance("layer", torch.float32))
            assert diff.passed, diff
