"""Checkpoints named ``owner/name`` load from a Hugging Face cache built here (refs/main, snapshots of symlinks
into blobs/), with the network made unusable; an absent one is one error naming the download command."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from dimoo_npu.checkpoint import load_model
from dimoo_npu.files.hub_cache import resolve_checkpoint
from dimoo_npu.utils import envs
from dimoo_npu.utils.errors import CheckpointError
from tests.conftest import CHECKPOINT
from tests.public_checkpoint import PUBLIC_TOKENIZER, TOKENIZER_FILES

REPO = "Alpha-VLLM/Lumina-DiMOO"
COMMIT = "5f0c3e6b" * 5


def build_cache(root: Path) -> Path:
    """``root`` laid out as `hf download` leaves it: blobs/ by content hash, snapshots/<commit>/ of relative
    symlinks into blobs/, refs/main holding the commit. Returns the snapshot folder."""
    repo = root / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    files = {path.relative_to(CHECKPOINT): path for path in CHECKPOINT.rglob("*") if path.is_file()}
    files.update({Path(name): PUBLIC_TOKENIZER / name for name in TOKENIZER_FILES})
    for relative, source in sorted(files.items()):
        blob = repo / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, blob)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf") / "hub"
    build_cache(root)
    return root


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: any connection attempt fails the test; the HF variables point nowhere by default."""

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint name must resolve without the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def in_cache(cache, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT


def test_name_resolves_to_the_snapshot(in_cache):
    assert resolve_checkpoint(REPO) == in_cache
    assert (in_cache / "model-00001-of-00002.safetensors").is_symlink()


def test_load_model_reads_the_cached_weights(in_cache, tiny_model):
    model = load_model(REPO)
    expected = tiny_model.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())


def test_pretokenize_encoder_reads_the_cached_checkpoint(in_cache):
    from dimoo_npu.train.encode import EncoderSettings, RecordEncoder

    encoder = RecordEncoder(EncoderSettings(checkpoint=REPO))
    assert len(encoder.text) == 134548 and encoder.tokens["uncondition"] == 126351


@pytest.mark.parametrize("call", ["resolve_checkpoint", "load_model"])
def test_absent_name_names_the_download(call, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError) as err:
        {"resolve_checkpoint": resolve_checkpoint, "load_model": load_model}[call](REPO)
    message = str(err.value)
    assert f"`huggingface-cli download {REPO}`" in message and f"`hf download {REPO}`" in message
    assert str(tmp_path / "empty") in message and "\n" not in message


def test_partial_download_is_named(cache, tmp_path, monkeypatch):
    partial = tmp_path / "hub"
    shutil.copytree(cache, partial, symlinks=True)
    (partial / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT / "config.json").unlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(partial))
    with pytest.raises(
        CheckpointError, match=f"has no config.json .* download it again with `huggingface-cli download {REPO}`"
    ):
        resolve_checkpoint(REPO)


@pytest.mark.parametrize("escape", ["../../../outside", "absolute", "snapshot link", "file link", "nested/../x"])
def test_a_ref_or_snapshot_that_leaves_the_cache_is_refused(cache, tmp_path, monkeypatch, escape):
    """Issue 24: refs/main must name a snapshot inside the repo's snapshots/, which links nowhere outside the cache
    (a checkpoint that loads without error from anywhere else would run weights nobody chose)."""
    hub = tmp_path / "hub"
    shutil.copytree(cache, hub, symlinks=True)
    repo = hub / f"models--{REPO.replace('/', '--')}"
    outside = tmp_path / "outside"
    shutil.copytree(CHECKPOINT, outside)  # a loadable checkpoint, so only the check can refuse it
    ref = repo / "refs" / "main"
    if escape == "absolute":
        ref.write_text(str(outside))
    elif escape == "snapshot link":
        (repo / "snapshots" / "other").symlink_to(outside, target_is_directory=True)
        ref.write_text("other")
    elif escape == "file link":
        config = repo / "snapshots" / COMMIT / "config.json"
        config.unlink()
        config.symlink_to(outside / "config.json")
    else:
        ref.write_text(escape if escape.startswith("..") else escape.replace("x", os.path.relpath(outside, repo)))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    with pytest.raises(CheckpointError, match="not a snapshot of|, outside "):
        resolve_checkpoint(REPO)


def test_paths_stay_paths(in_cache, tmp_path, monkeypatch):
    """An existing path wins over a cached repo of that name; what is no repo id is returned as given."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / REPO).mkdir(parents=True)
    assert resolve_checkpoint(REPO) == Path(REPO)
    for text in ["ckpt", "runs/a/b", "/abs/Lumina-DiMOO", "./Alpha-VLLM", "../x/y", "a b/c"]:
        assert resolve_checkpoint(text) == Path(text)
    assert resolve_checkpoint(CHECKPOINT) == CHECKPOINT


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"HF_HUB_CACHE": "{t}/a", "HF_HOME": "{t}/b"}, "{t}/a"),
        ({"HUGGINGFACE_HUB_CACHE": "{t}/old", "HF_HOME": "{t}/b"}, "{t}/old"),
        ({"HF_HOME": "{t}/b", "XDG_CACHE_HOME": "{t}/x"}, "{t}/b/hub"),
        ({"XDG_CACHE_HOME": "{t}/x"}, "{t}/x/huggingface/hub"),
        ({"HOME": "{t}/home"}, "{t}/home/.cache/huggingface/hub"),
    ],
)
def test_cache_folder_as_huggingface_hub_finds_it(variables, expected, tmp_path, monkeypatch):
    for name, value in variables.items():
        monkeypatch.setenv(name, value.format(t=tmp_path))
    assert envs.hf_hub_cache() == Path(expected.format(t=tmp_path))


def test_pipeline_and_cli_take_a_cached_name(in_cache, tmp_path, caplog):
    from dimoo_npu.cli import main
    from dimoo_npu.pipeline import DiMOOPipeline, generation_defaults

    assert DiMOOPipeline.from_pretrained(REPO, lazy=True).text_tokenizer.eos_token_id == 126081
    assert generation_defaults(REPO) == {}
    output = tmp_path / "cat.png"
    argv = ["--device", "cpu", "--timesteps", "2", "--prompt", "a cat", "--width", "16", "--height", "16"]
    assert main(["t2i", "--checkpoint", REPO, *argv, "--output", str(output)]) == 0 and output.is_file()
    assert main(["t2i", "--checkpoint", "Alpha-VLLM/Absent", *argv, "--output", str(tmp_path / "x.png")]) == 2
    assert "`huggingface-cli download Alpha-VLLM/Absent`" in caplog.text
