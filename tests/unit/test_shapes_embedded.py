"""The embedded model's groundwork: its own token layout, checkpoint skeleton, training manifest, eval command."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from dimoo_npu.shapes import dataset, embedded, vq_train, world

TINY_VQ = vq_train.VQTrainConfig(
    block_out_channels=(8, 8, 8, 8, 8), latent_channels=4, num_vq_embeddings=16, norm_num_groups=4
)


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    """A skeleton with a random tiny VQ and a random 1-layer transformer (pictures are noise)."""
    from dimoo_npu.checkpoint import save_pretrained
    from dimoo_npu.config import DiMOOConfig
    from dimoo_npu.model import DiMOOModel

    folder = tmp_path_factory.mktemp("shapes-random")
    torch.manual_seed(0)
    vq_train.save_vq(vq_train.build_vq_model(TINY_VQ), folder / "vq")
    raw = embedded.model_config(16, d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=64)
    embedded.build_skeleton(folder, folder / "vq", raw)
    config = DiMOOConfig.from_dict(raw)
    save_pretrained(DiMOOModel(config).state_dict(), config, folder)
    return folder


def test_token_layout_is_words_then_specials_then_codebook(random_checkpoint):
    from dimoo_npu.config import DiMOOConfig
    from dimoo_npu.text_tokenizer import load_text_tokenizer

    table = embedded.special_tokens(256)
    ids = [v for k, v in table.items() if k not in ("codebook_size", "vocab", "image_offset")]
    assert len(set(ids)) == len(ids) and max(ids) < table["image_offset"]
    assert table["vocab"] == table["image_offset"] + 256
    config = DiMOOConfig.from_json(random_checkpoint)
    assert config.special_tokens == embedded.special_tokens(16) and config.embedding_size == 144 + 16
    tokenizer = load_text_tokenizer(random_checkpoint)
    words = tokenizer("a large red circle in the top left").input_ids
    assert len(words) == 8 and max(words) < 128 and tokenizer.unk_token_id not in words
    assert tokenizer("<uncondition>").input_ids == [table["uncondition"]]
    assert tokenizer("</answer>").input_ids == [table["eoa"]]


def test_manifest_mix_uses_training_objects_only(tmp_path):
    mix = dataset.DataMix(t2i=40, inpaint=20, mmu=30, two_object_share=0.3, seed=1)
    path = dataset.write_manifest(tmp_path, mix, progress=False)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert Counter(r["task"] for r in records) == {"t2i": 40, "inpaint": 20, "mmu": 30}
    assert len({r["id"] for r in records}) == len(records)
    heldout_keys = {
        dataset.scene_key(world.Scene((placed,)))
        for obj in world.split_objects("heldout")
        for placed in world.placements(obj)
    }
    for record in records:
        image = record.get("target_image") or record["image"]
        assert Path(image).parent == tmp_path / "images" and Path(image).is_file()
        assert image.rsplit("/", 1)[1][:-4] not in heldout_keys
        if record["task"] == "mmu":
            assert record["answer"] in {*world.PALETTE, *world.SHAPES, *world.SIZES, *world.POSITIONS}
        if record["task"] == "inpaint":
            assert record["mask"].endswith(".png")
    assert any("+" in r["target_image"] for r in records if r["task"] == "t2i")  # two-object scenes
    again = dataset.write_manifest(tmp_path / "again", mix, progress=False).read_text()
    assert again.replace(str(tmp_path / "again"), str(tmp_path)) == path.read_text()


def test_eval_command_reports_every_attribute(random_checkpoint, tmp_path, capsys):
    from dimoo_npu import cli

    report_path = tmp_path / "report.json"
    argv = [
        "eval",
        "shapes",
        "--checkpoint",
        str(random_checkpoint),
        "--limit",
        "2",
        "--timesteps",
        "2",
        "--output",
        str(report_path),
    ]
    assert cli.main(argv) == 0
    report = json.loads(report_path.read_text())
    assert report["t2i"]["count"] == 2 and set(report["t2i"]["per_attribute"]) == {
        "shape",
        "colour",
        "size",
        "position",
    }
    assert report["understanding"]["count"] == 2 * len(world.QUESTIONS)
    assert json.loads(capsys.readouterr().out)["objects"] == 2
    assert cli.main([*argv, "--tasks", "mmu", "--placements", "all"]) == 0
    report = json.loads(report_path.read_text())
    shown = sum(len(world.placements(obj)) for obj in world.split_objects("heldout")[:2])
    assert report["understanding"]["count"] == shown * len(world.QUESTIONS) and "t2i" not in report
    assert cli.main(["eval", "shapes", "--checkpoint", str(random_checkpoint), "--tasks", "nope"]) == 2
