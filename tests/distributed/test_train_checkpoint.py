"""DCP checkpoints across layouts: saved by 2 gloo ranks at tp=2, resumed there exactly, loaded at tp=1."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dimoo_npu.train.checkpoint import LATEST, export_hf
from dimoo_npu.train.trainer import Trainer
from tests.unit.train_support import tiny_run_config, write_synthetic_shards

WORKER = Path(__file__).with_name("train_checkpoint_worker.py")
STEPS = 4


@pytest.fixture(scope="module")
def tp2_runs(run_distributed, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("train_tp2")
    write_synthetic_shards(out / "shards")
    return out, run_distributed(WORKER, 2, out, [])


def test_resume_at_tp2_reproduces_the_uninterrupted_run(tp2_runs):
    _, ranks = tp2_runs
    assert ranks[0]["full"] == ranks[1]["full"], "every rank reports the same global loss"
    assert ranks[0]["resumed"] == ranks[0]["full"]


def test_checkpoint_saved_at_tp2_loads_at_tp1_with_the_same_next_losses(tp2_runs, tmp_path):
    out, ranks = tp2_runs
    saved = out / "full" / "run" / "checkpoints"
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    shutil.copytree(saved / "step-00000002", run / "step-00000002")
    (run / LATEST).write_text("step-00000002")
    layout = ["tensor_model_parallel_size=1", f"train_iters={STEPS}", f"lr_decay_iters={STEPS}", "save_interval=0"]
    trainer = Trainer(tiny_run_config(tmp_path, *layout, shards=out / "shards"))
    assert trainer.step == 2
    # step 3 checks the weights, step 4 also the Adam moments (it follows an update that used them)
    assert trainer.train() == pytest.approx(ranks[0]["full"][2:], rel=1e-5)

    gathered = export_hf(saved / "step-00000004", tmp_path / "hf4", dtype=torch.float32)  # tp=2 shards, whole
    from dimoo_npu import load_model

    reference = load_model(gathered).state_dict()
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-6, msg=name)
