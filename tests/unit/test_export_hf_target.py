"""export-hf never mixes a new checkpoint into an existing folder: refused without --overwrite, swapped with it."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

import dimoo_npu
from dimoo_npu.cli import main
from dimoo_npu.train.checkpoint import export_hf
from dimoo_npu.train.trainer import run_training
from dimoo_npu.utils.errors import DimooError
from tests.unit.train_support import tiny_run_config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    run_training(tiny_run_config(tmp, "train_iters=1", "save_interval=0"))
    return tmp / "run" / "checkpoints"


def old_model_folder(path):
    """A model folder of another (sharded) layout: its shards and index must not survive next to new files."""
    path.mkdir()
    (path / "config.json").write_text('{"old": true}')
    (path / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    (path / "model.safetensors.index.json").write_text("{}")
    return path


def test_a_non_empty_target_is_refused_and_left_as_it_was(checkpoints, tmp_path):
    target = old_model_folder(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(DimooError, match="not empty.*--overwrite"):
        export_hf(checkpoints, target, torch.float32)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert main(["export-hf", str(checkpoints), str(target), "--dtype", "float32"]) == 2
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_overwrite_swaps_in_a_whole_new_folder(checkpoints, tmp_path):
    target = old_model_folder(tmp_path / "model")
    assert main(["export-hf", str(checkpoints), str(target), "--dtype", "float32", "--overwrite"]) == 0
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert dimoo_npu.load_model(target).config.n_layers == 2
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "no staging or retired folder left beside it"


def test_an_empty_target_folder_is_fine(checkpoints, tmp_path):
    (tmp_path / "empty").mkdir()
    assert dimoo_npu.load_model(export_hf(checkpoints, tmp_path / "empty", torch.float32)).config.n_layers == 2


def test_a_full_disk_mid_export_leaves_the_old_folder_and_no_staging(checkpoints, tmp_path, monkeypatch):
    target = old_model_folder(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def disk_full(state, config, folder):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("dimoo_npu.checkpoint.save_pretrained", disk_full)
    assert main(["export-hf", str(checkpoints), str(target), "--overwrite"]) == 2
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
