"""Pre-tokenizer: every task's layout, bad records reported and skipped, worker processes, resume without duplicates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.tokens.prompts import uncond_text
from dimoo_npu.tokens.text_tokenizer import build_word_tokenizer, load_text_tokenizer
from dimoo_npu.train.encode import SYSTEMS, EncoderSettings
from dimoo_npu.train.masking import drop_condition
from dimoo_npu.train.pretokenize import REJECTED, pretokenize
from dimoo_npu.train.shards import ShardDataset
from dimoo_npu.utils.errors import DimooError
from tests.conftest import CHECKPOINT

WORDS = ["a red square on grass", "make it blue", "what color is the square", "it is red", "fill the hole"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A checkpoint folder (fixture config + VQ, a word tokenizer), images and a manifest with bad records."""
    root = tmp_path_factory.mktemp("pretok")
    checkpoint = root / "checkpoint"
    checkpoint.mkdir()
    shutil.copy(CHECKPOINT / "config.json", checkpoint / "config.json")
    (checkpoint / "vqvae").symlink_to(CHECKPOINT / "vqvae")
    build_word_tokenizer(WORDS, checkpoint)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / f"{name}.png")
    (root / "broken.png").write_bytes(b"\x89PNG but not really")
    img = lambda name: str(root / name)  # noqa: E731
    records = [
        {"id": "t2i", "task": "t2i", "prompt": WORDS[0], "target_image": img("a.png")},
        {"id": "edit", "task": "edit", "prompt": WORDS[1], "image": img("a.png"), "target_image": img("b.png")},
        {"id": "inpaint", "task": "inpaint", "prompt": WORDS[4], "target_image": img("b.png"), "mask_h_ratio": 0.5},
        {"id": "mmu", "task": "mmu", "prompt": WORDS[2], "image": img("a.png"), "answer": WORDS[3]},
        {"id": "missing", "task": "t2i", "prompt": WORDS[0], "target_image": img("nowhere.png")},
        {"id": "broken", "task": "edit", "prompt": WORDS[1], "image": img("broken.png"), "target_image": img("a.png")},
        {"id": "long", "task": "mmu", "prompt": WORDS[2], "image": img("a.png"), "answer": " ".join(WORDS * 3)},
        {"id": "odd", "task": "video", "prompt": WORDS[0]},
    ]
    lines = [json.dumps(r) for r in records] + ["{this is not json"]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def settings(workspace) -> EncoderSettings:
    return EncoderSettings(str(workspace / "checkpoint"), max_length=400, image_budget=None, answer_length=12)


@pytest.fixture(scope="module")
def shards(workspace, settings) -> Path:
    """Written by two worker processes (spawned: each loads its own tokenizer and VQ model)."""
    output = workspace / "shards"
    summary = pretokenize(workspace / "manifest.jsonl", output, settings, chunk_size=3, workers=2)
    assert (summary.samples, summary.rejected, summary.chunks_done) == (4, 5, 3)
    return output


@pytest.fixture(scope="module")
def tokenizer(settings):
    return load_text_tokenizer(settings.checkpoint)


def by_id(folder: Path) -> dict:
    dataset = ShardDataset(folder)
    ids = [i for shard in dataset.shards for i in shard.ids]
    assert len(ids) == len(set(ids)), "no record is written twice"
    return {record_id: dataset[index] for index, record_id in enumerate(ids)}


def test_bad_records_are_reported_with_their_reason_and_skipped(shards):
    rejected = [json.loads(line) for line in (shards / REJECTED).read_text().splitlines()]
    reasons = {r["id"]: r["reason"] for r in rejected}
    assert [r["line"] for r in rejected] == [5, 6, 7, 8, 9]
    assert "missing image" in reasons["missing"] and "cannot read image" in reasons["broken"]
    assert "too long" in reasons["long"] and "not one of t2i, edit, inpaint, mmu" in reasons["odd"]
    assert reasons[None].startswith("invalid JSON")
    assert sorted(by_id(shards)) == ["edit", "inpaint", "mmu", "t2i"]


def test_each_task_has_its_layout_answer_mask_and_drop_span(shards, tokenizer):
    samples, tokens = by_id(shards), DiMOOConfig.from_json(CHECKPOINT).special_tokens
    decode = lambda ids: tokenizer.decode(ids.tolist())  # noqa: E731
    grid = 3 * 4  # 48 x 64 pixels
    t2i = samples["t2i"]
    assert decode(t2i.tokens[slice(*t2i.drop_span)]) == WORDS[0]
    assert int(t2i.loss_mask.sum()) == grid and bool((t2i.tokens[t2i.loss_mask] >= tokens["image_offset"]).all())
    assert t2i.tokens[-1] == tokens["eoa"] and t2i.tokens[t2i.answer_span[0] - 2] == tokens["boa"]
    unconditional = tokenizer(uncond_text(SYSTEMS["t2i"])).input_ids
    dropped = drop_condition(t2i, tokens["uncondition"]).tokens
    assert dropped[: len(unconditional)].tolist() == unconditional, "a drop gives the prompt CFG sampling uses"
    edit = samples["edit"]
    assert int((edit.tokens == tokens["boi"]).sum()) == 2 and int(edit.loss_mask.sum()) == grid
    assert decode(edit.tokens[slice(*edit.drop_span)]) == WORDS[1]
    inpaint = samples["inpaint"]
    assert 0 < int(inpaint.loss_mask.sum()) < grid, "only the centred box is predicted"
    assert not bool((inpaint.tokens == tokens["mask"]).any()), "shards hold answers in clear; masking is per step"
    mmu = samples["mmu"]
    answer = mmu.tokens[mmu.loss_mask]
    assert mmu.drop_span == (0, 0) and len(answer) == 12
    assert decode(answer[: len(WORDS[3].split())]) == WORDS[3]
    assert answer[len(WORDS[3].split())] == tokens["eoa"] and answer[-1] == tokens["answer_pad"]


def test_a_rerun_resumes_without_duplicates(workspace, settings, shards):
    resumed = workspace / "resumed"
    shutil.copytree(shards, resumed)
    (resumed / "shard-000001.safetensors").unlink()  # interrupted before chunk 1 was written
    (resumed / ".shard-000001.safetensors.tmp-1").write_bytes(b"partial")  # and mid-write of it
    kept = (resumed / "shard-000000.safetensors").stat().st_mtime_ns
    summary = pretokenize(workspace / "manifest.jsonl", resumed, settings, chunk_size=3)  # in this process
    assert (summary.chunks_skipped, summary.chunks_done, summary.samples) == (2, 1, 1)
    assert (resumed / "shard-000000.safetensors").stat().st_mtime_ns == kept
    first = by_id(shards)
    again = by_id(resumed)
    assert sorted(again) == sorted(first)
    assert all(torch.equal(again[key].tokens, first[key].tokens) for key in first), "same shards in and out of a pool"
    assert (resumed / REJECTED).read_text() == (shards / REJECTED).read_text()


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "change", ["another manifest", "the same manifest edited", "other settings", "another chunk size"]
)
def test_a_folder_made_by_another_run_is_refused_and_left_untouched(change, workspace, settings, shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    before = files_of(folder)
    manifest, chunk_size = workspace / "manifest.jsonl", 3
    if change == "another manifest":
        manifest = tmp_path / "other.jsonl"
        manifest.write_text("\n".join((workspace / "manifest.jsonl").read_text().splitlines()[:2]) + "\n")
    elif change == "the same manifest edited":
        manifest = tmp_path / "manifest.jsonl"
        shutil.copy(workspace / "manifest.jsonl", manifest)
        record = json.loads((folder / "pretokenize.json").read_text())
        record["manifest"] = str(manifest.resolve())
        (folder / "pretokenize.json").write_text(json.dumps(record))
        before = files_of(folder)
        with manifest.open("a") as handle:
            handle.write(json.dumps({"id": "new", "task": "t2i", "prompt": WORDS[0]}) + "\n")
    elif change == "other settings":
        settings = EncoderSettings(settings.checkpoint, max_length=300, image_budget=None, answer_length=12)
    else:
        chunk_size = 4
    with pytest.raises(DimooError, match="was made by another run .* choose an empty folder"):
        pretokenize(manifest, folder, settings, chunk_size=chunk_size)
    assert files_of(folder) == before


def test_a_non_empty_folder_not_made_by_pretokenize_is_refused(workspace, settings, tmp_path):
    (tmp_path / "shard-000000.safetensors").write_bytes(b"someone else's")
    with pytest.raises(DimooError, match="not made by dimoo pretokenize"):
        pretokenize(workspace / "manifest.jsonl", tmp_path, settings, chunk_size=3)
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.safetensors"]


def test_the_folder_records_what_made_it(workspace, shards):
    record = json.loads((shards / "pretokenize.json").read_text())
    assert record["manifest"] == str((workspace / "manifest.jsonl").resolve())
    assert record["settings"] == {"max_length": 400, "image_budget": None, "answer_length": 12, "chunk_size": 3}
    assert {"config.json", "tokenizer.json", "vqvae/diffusion_pytorch_model.safetensors"} <= set(record["files"])
    assert len(record["manifest_sha256"]) == 64


def test_a_bad_record_of_any_kind_is_rejected_and_the_run_goes_on(workspace, settings, tmp_path, monkeypatch):
    Image.new("RGB", (200, 200)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # huge.png is over twice this, a.png (48x64) is not
    good = {"id": "good", "task": "t2i", "prompt": WORDS[0], "target_image": str(workspace / "a.png")}
    bad = {
        "bomb": {**good, "target_image": str(tmp_path / "huge.png")},
        "number path": {**good, "target_image": 5},
        "list path": {**good, "target_image": ["a.png"]},
        "folder path": {**good, "target_image": str(workspace)},
        "device file": {**good, "target_image": "/dev/zero"},  # read only as given: never followed into a device
        "no shell expansion": {**good, "target_image": "$HOME/../" + str(workspace / "a.png")},
        "ratio text": {
            "task": "inpaint",
            "prompt": WORDS[4],
            "target_image": str(workspace / "a.png"),
            "mask_h_ratio": "half",
        },  # fmt: skip
    }
    manifest = tmp_path / "manifest.jsonl"
    lines = [json.dumps({**record, "id": name}) for name, record in bad.items()] + [json.dumps(good)]
    manifest.write_text("\n".join(lines) + "\n")
    summary = pretokenize(manifest, tmp_path / "out", settings, chunk_size=10)
    rejected = {r["id"]: r["reason"] for r in map(json.loads, (tmp_path / "out" / REJECTED).read_text().splitlines())}
    assert (summary.samples, summary.rejected) == (1, len(bad)) and sorted(rejected) == sorted(bad)
    assert "decompression bomb" in rejected["bomb"] and "is a folder: name an image file" in rejected["folder path"]
    assert "must be a path" in rejected["list path"] and "must be a path" in rejected["number path"]


def test_a_run_that_writes_no_sample_exits_non_zero(workspace, tmp_path, caplog):
    from dimoo_npu.cli import main

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"id": "x", "task": "video", "prompt": "x"}) + "\n")
    out = tmp_path / "out"
    argv = ["pretokenize", str(manifest), str(out), "--checkpoint", str(workspace / "checkpoint")]
    assert main(argv) == 2
    assert "no sample written: all 1 record(s) were rejected" in caplog.text and REJECTED in caplog.text


def test_limits_left_out_are_the_checkpoints_own(workspace, tmp_path):
    from dimoo_npu.cli import main

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(workspace / "checkpoint", checkpoint, symlinks=True)
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(max_sequence_length=300, generation_defaults={"image_budget": 64, "gen_length": 12})
    (checkpoint / "config.json").write_text(json.dumps(config))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"task": "t2i", "prompt": WORDS[0], "target_image": str(workspace / "a.png")}))
    assert main(["pretokenize", str(manifest), str(tmp_path / "out"), "--checkpoint", str(checkpoint)]) == 0
    record = json.loads((tmp_path / "out" / "pretokenize.json").read_text())
    assert record["settings"] == {"max_length": 300, "image_budget": 64, "answer_length": 12, "chunk_size": 1000}


def test_a_folder_given_as_manifest_is_named_as_such(settings, tmp_path):
    with pytest.raises(DimooError, match="manifest .* is a folder: name a file"):
        pretokenize(tmp_path, tmp_path / "out", settings)


def test_relative_image_paths_are_read_from_the_manifest_folder(workspace, settings, tmp_path, monkeypatch):
    """The README's layout (data/manifest.jsonl naming images/...) works from any working directory."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    shutil.copy(workspace / "a.png", data / "images" / "a.png")
    records = [
        {"id": "relative", "task": "t2i", "prompt": WORDS[0], "target_image": "images/a.png"},
        {"id": "absolute", "task": "t2i", "prompt": WORDS[0], "target_image": str(workspace / "b.png")},
        {"id": "not beside it", "task": "t2i", "prompt": WORDS[0], "target_image": "a.png"},
    ]
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.chdir(workspace)  # a.png exists here too: it must not be the one read
    summary = pretokenize(data / "manifest.jsonl", tmp_path / "shards", settings)
    assert (summary.samples, summary.rejected) == (2, 1)
    assert sorted(by_id(tmp_path / "shards")) == ["absolute", "relative"]
    rejected = json.loads((tmp_path / "shards" / REJECTED).read_text())
    assert rejected["id"] == "not beside it" and str(data / "a.png") in rejected["reason"]
