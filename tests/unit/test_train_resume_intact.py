"""Resume takes the newest intact checkpoint (every file its DCP metadata names, at its recorded size, and a
readable trainer state), warning about the broken one; crafted metadata never runs code."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest

from dimoo_npu.train.checkpoint import LATEST, Checkpointer
from dimoo_npu.train.trainer import Trainer, run_training
from dimoo_npu.utils.errors import CheckpointError
from tests.unit.train_support import tiny_run_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A run with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("resume")
    run_training(tiny_run_config(tmp, "train_iters=4", "save_interval=2"))
    return tmp


@pytest.fixture
def run(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    return tmp_path


def tear(step: Path, how: str) -> str:
    if how == "truncated tensor file":
        data = sorted(step.glob("*.distcp"))[0]
        os.truncate(data, data.stat().st_size // 2)
        return data.name
    if how == "missing tensor file":
        data = sorted(step.glob("*.distcp"))[0]
        data.unlink()
        return data.name
    if how == "torn trainer state":
        (step / "trainer_state.json").write_text('{"step": 4, "consumed')
        return "trainer_state.json"
    (step / ".metadata").write_bytes((step / ".metadata").read_bytes()[:20])
    return ".metadata"


@pytest.mark.parametrize("how", ["truncated tensor file", "missing tensor file", "torn trainer state", "torn metadata"])
def test_resume_skips_a_broken_latest_checkpoint_with_a_warning(how, run, caplog):
    checkpoints = run / "run" / "checkpoints"
    assert (checkpoints / LATEST).read_text() == "step-00000004"
    broken = tear(checkpoints / "step-00000004", how)
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(tiny_run_config(run, "train_iters=4", "save_interval=2"))
    assert trainer.step == 2
    assert "step-00000004" in caplog.text and broken in caplog.text and "resuming from step-00000002" in caplog.text
    assert trainer.train() and trainer.step == 4
    trainer.close()


def test_no_intact_checkpoint_is_a_clear_error(run):
    checkpoints = run / "run" / "checkpoints"
    for step in ("step-00000002", "step-00000004"):
        tear(checkpoints / step, "truncated tensor file")
    with pytest.raises(CheckpointError, match="no intact checkpoint in .*choose a new output_dir"):
        Checkpointer(checkpoints).latest()


def test_stale_latest_temp_files_are_removed(run):
    checkpoints = run / "run" / "checkpoints"
    (checkpoints / ".latest.tmp-12345").write_text("step-00000")
    Checkpointer(checkpoints)
    assert not (checkpoints / ".latest.tmp-12345").exists()


class _Exploit:
    def __reduce__(self):
        return os.system, ("touch PWNED",)


def test_metadata_naming_a_global_outside_the_allowlist_is_refused_before_it_runs(run, monkeypatch):
    monkeypatch.chdir(run)
    step = run / "run" / "checkpoints" / "step-00000004"
    (step / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError, match="refers to posix.system.*refusing to load it"):
        Trainer(tiny_run_config(run, "train_iters=4")).close()
    assert not (run / "PWNED").exists()
    json.loads((step / "trainer_state.json").read_text())  # untouched


@pytest.mark.parametrize("wrapped", [False, True], ids=["raised", "wrapped by DCP"])
def test_ctrl_c_during_a_save_leaves_no_temporary_folder(wrapped, tmp_path, monkeypatch):
    import torch
    from torch.distributed.checkpoint.api import CheckpointException

    def interrupted(state, checkpoint_id, **kwargs):
        Path(checkpoint_id).mkdir()
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half")
        raise CheckpointException("save failed", {0: (KeyboardInterrupt(), None)}) if wrapped else KeyboardInterrupt

    monkeypatch.setattr("torch.distributed.checkpoint.save", interrupted)
    part = torch.nn.Linear(2, 2)
    with pytest.raises(KeyboardInterrupt):
        Checkpointer(tmp_path).save(2, [part], torch.optim.AdamW(part.parameters()), {}, None)
    assert list(tmp_path.iterdir()) == []
