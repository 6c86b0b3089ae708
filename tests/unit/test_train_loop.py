"""The training loop in one process: exact resume, a kill during save, metrics, HF export and import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dimoo_npu
from dimoo_npu.modeling.losses import masked_diffusion_loss
from dimoo_npu.train.checkpoint import LATEST, export_hf
from dimoo_npu.train.trainer import Trainer, run_training
from dimoo_npu.utils.errors import CheckpointError, ConfigError
from tests.unit.train_support import KILL_AT_STEP_4, tiny_run_config

REPO = Path(__file__).resolve().parents[2]
STEPS = 6


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[float]]:
    """An uninterrupted run of STEPS steps (checkpoint at the end only)."""
    tmp = tmp_path_factory.mktemp("reference")
    return tmp, run_training(tiny_run_config(tmp, f"train_iters={STEPS}", "save_interval=0", "plot=true"))


def test_metrics_line_per_step_and_curves(reference):
    tmp, losses = reference
    records = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == losses
    for record in records:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(record)
        assert record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1 and record["grad_norm"] > 0
    assert (tmp / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert losses[-1] < losses[0], "the tiny model learns"


def test_resume_reproduces_the_uninterrupted_loss_sequence(reference, tmp_path):
    _, expected = reference
    first = run_training(tiny_run_config(tmp_path, "train_iters=3", f"lr_decay_iters={STEPS}", "save_interval=0"))
    with (tmp_path / "run" / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")  # a step that ran after the save, then a crash
    second = run_training(tiny_run_config(tmp_path, f"train_iters={STEPS}"))
    assert first + second == expected  # bit for bit: same weights, optimizer state, lr, batches and masks
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), "metrics of steps trained again are not duplicated"


def test_a_process_killed_during_save_leaves_the_last_good_checkpoint(reference, tmp_path):
    _, expected = reference
    tiny_run_config(tmp_path)  # write the shards before the subprocess uses them
    result = subprocess.run([sys.executable, "-c", KILL_AT_STEP_4, str(tmp_path), "train_iters=6"], cwd=REPO,
                            capture_output=True, text=True, timeout=240,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert result.returncode == -9, result.stderr[-2000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / LATEST).read_text() == "step-00000002"
    assert (checkpoints / ".tmp-step-00000004" / ".metadata").is_file(), "killed with step 4 fully written"

    trainer = Trainer(tiny_run_config(tmp_path, "save_interval=2", f"train_iters={STEPS}"))
    assert trainer.step == 2 and not (checkpoints / ".tmp-step-00000004").exists()
    assert trainer.train() == expected[2:]


def test_export_to_hugging_face_layout_and_initialise_from_it(reference, tmp_path):
    run_dir, _ = reference
    trainer = Trainer(tiny_run_config(run_dir, f"train_iters={STEPS}"))  # resumes the finished run: no step left
    trained = {name: p.detach().clone() for name, p in trainer.model.state_dict().items()}
    folder = export_hf(run_dir / "run" / "checkpoints", tmp_path / "hf", dtype=torch.float32)
    model = dimoo_npu.load_model(folder)
    assert model.config.special_tokens == trainer.model_config.special_tokens
    assert all(torch.equal(model.state_dict()[name], value) for name, value in trained.items())
    assert dimoo_npu.load_model(export_hf(run_dir / "run" / "checkpoints", tmp_path / "bf16")).config.n_layers == 2

    defaults = {"width": 64, "height": 32, "timesteps": 8}  # a small model's own sampling defaults
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "generation_defaults": defaults}))
    fine_tune = Trainer(tiny_run_config(tmp_path, "model.config=null", f"model.init_from={folder}", "train_iters=1"))
    batch = fine_tune.batches.batch(0, fine_tune.config.gpt_args.global_batch_size)
    with torch.no_grad():
        plain = masked_diffusion_loss(model(batch.input_ids, batch.attention_mask), batch.labels)
    assert fine_tune.train()[0] == pytest.approx(float(plain), rel=1e-6)
    fine_tune.close()
    tuned = export_hf(tmp_path / "run" / "checkpoints", tmp_path / "tuned", dtype=torch.float32)
    assert json.loads((tuned / "config.json").read_text())["generation_defaults"] == defaults


def test_a_run_refuses_to_overwrite_checkpoints_mismatched_models_and_samples_that_cannot_fit(reference, tmp_path):
    run_dir, _ = reference
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        Trainer(tiny_run_config(run_dir, "resume=never"))
    with pytest.raises(ConfigError, match="longest pre-tokenized sample has .* tokens > data.seq_length 8"):
        Trainer(tiny_run_config(tmp_path, "data.seq_length=8"))
    wider = tiny_run_config(run_dir)
    wider.model.config = {**wider.model.config, "d_model": 64}
    with pytest.raises(CheckpointError, match="holds a model with another config"):
        Trainer(wider)


def test_bf16_computes_in_bf16_and_keeps_fp32_master_weights_and_optimizer_state(reference, tmp_path):
    _, fp32_losses = reference
    trainer = Trainer(tiny_run_config(tmp_path, "bf16=true", "train_iters=2"))
    losses = trainer.train()
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert {state["exp_avg"].dtype for state in trainer.optimizer.state.values()} == {torch.float32}
    assert losses != fp32_losses[:2] and losses == pytest.approx(fp32_losses[:2], rel=2e-2)
