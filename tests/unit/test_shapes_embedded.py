"""The embedded model's groundwork: its own token layout, checkpoint skeleton, training manifest, eval command."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from dimoo_npu.files.outputs import read_png_text
from dimoo_npu.shapes import dataset, embedded, vq_train, world

TINY_VQ = vq_train.VQTrainConfig(
    block_out_channels=(8, 8, 8, 8, 8), latent_channels=4, num_vq_embeddings=16, norm_num_groups=4
)


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    """A skeleton with a random tiny VQ and a random 1-layer transformer (pictures are noise)."""
    from dimoo_npu.checkpoint import save_pretrained
    from dimoo_npu.model import DiMOOModel
    from dimoo_npu.modeling.config import DiMOOConfig

    folder = tmp_path_factory.mktemp("shapes-random")
    torch.manual_seed(0)
    vq_train.save_vq(vq_train.build_vq_model(TINY_VQ), folder / "vq")
    raw = embedded.model_config(16, d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=64)
    embedded.build_skeleton(folder, folder / "vq", raw)
    config = DiMOOConfig.from_dict(raw)
    save_pretrained(DiMOOModel(config).state_dict(), config, folder)
    return folder


def test_token_layout_is_words_then_specials_then_codebook(random_checkpoint):
    from dimoo_npu.modeling.config import DiMOOConfig
    from dimoo_npu.tokens.text_tokenizer import load_text_tokenizer

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
    mix = dataset.DataMix(t2i=40, inpaint=20, outpaint=6, mmu=30, caption=8, edit=3, two_object_share=0.3, seed=1)
    path = dataset.write_manifest(tmp_path, mix, progress=False)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert Counter(r["task"] for r in records) == {"t2i": 40, "inpaint": 26, "mmu": 38, "edit": 3 * len(world.EDITS)}
    assert len({r["id"] for r in records}) == len(records)
    heldout = {(o.shape, o.colour, o.size) + o.canonical.centre for o in world.split_objects("heldout")}
    answers = {*world.PALETTE, *world.SHAPES, *world.SIZES, *world.POSITIONS}
    for record in records:
        for image in (record.get("target_image"), record.get("image")):
            if image:
                assert Path(image).parent == Path("images") and (tmp_path / image).is_file()  # manifest-relative
                assert not _shows(Path(image).stem) & heldout
        if record["task"] == "mmu" and record["answer"] not in answers:
            assert record["prompt"] in world.CAPTION_QUESTIONS
            assert world.parse_caption(record["answer"])[0]["shape"] in world.SHAPES
        if record["task"] == "inpaint":
            assert record["mask"].endswith(".png")
    assert any("+" in r["target_image"] for r in records if r["task"] == "t2i")  # two-object scenes
    assert any("outpaint" in r["mask"] for r in records if r["task"] == "inpaint")
    assert any(r["target_image"].endswith("empty.png") for r in records if r["task"] == "edit")  # removal
    assert dataset.write_manifest(tmp_path / "again", mix, progress=False).read_text() == path.read_text()


def _shows(stem: str) -> set[tuple]:
    """(shape, colour, size, canonical y, x) of every object a scene key names."""
    shown = set()
    for part in stem.split("+"):
        if part == "empty":
            continue
        shape, colour, size, y, x = part.split("-")
        row, col = (next(i for i, third in enumerate(world.PLACEMENTS) if int(v) in third) for v in (y, x))
        shown.add((shape, colour, size, world.GRID_CENTRES[row], world.GRID_CENTRES[col]))
    return shown


def test_generation_defaults_carry_every_trained_setting_and_fit_a_caption(random_checkpoint):
    from dimoo_npu.tokens.text_tokenizer import load_text_tokenizer

    defaults = embedded.GENERATION_DEFAULTS
    assert defaults["cfg_img"] == 0.0 and defaults["cfg_scale"] == 0.0 and defaults["temperature"] == 0.0
    tokenizer = load_text_tokenizer(random_checkpoint)
    longest = "a large purple triangle in the bottom middle and a large orange square in the bottom right"
    assert len(tokenizer(longest + "</answer>").input_ids) <= defaults["gen_length"]
    for kind in world.EDITS:  # every instruction word is known
        edit = world.sample_edit(kind, random.Random(0))
        assert tokenizer.unk_token_id not in tokenizer(edit.instruction).input_ids


def test_unknown_words_map_to_unk_with_one_warning(random_checkpoint, caplog):
    from dimoo_npu.tokens.text_tokenizer import load_text_tokenizer, warn_unknown_words

    tokenizer = load_text_tokenizer(random_checkpoint)
    with caplog.at_level("WARNING"):
        for _ in range(2):  # a batch of prompts with the same word: still one warning
            warn_unknown_words(tokenizer, "<user>make the circle magenta</user>")
        warn_unknown_words(tokenizer, "make the circle blue")
    assert tokenizer("make the circle magenta").input_ids[-1] == tokenizer.unk_token_id
    warnings = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(warnings) == 1 and "'magenta'" in warnings[0] and "user" not in warnings[0]


def test_an_empty_answer_fails_with_exit_1(random_checkpoint, tmp_path, monkeypatch, caplog):
    from dimoo_npu import cli
    from dimoo_npu.pipeline import DiMOOPipeline

    image = tmp_path / "a.png"
    world.render(world.Scene((world.ShapeObject("circle", "red", "large", 0, 0),))).save(image)

    def first_empty(self, requests, *args, **kwargs):  # every answer path goes through iter_answers
        yield list(range(len(requests))), ["", "red"][: len(requests)]

    monkeypatch.setattr(DiMOOPipeline, "iter_answers", first_empty)
    base = ["understand", "--checkpoint", str(random_checkpoint), "--gen-length", "4", "--block-length", "4"]
    assert cli.main([*base, "--steps", "4", "--image", str(image), "--question", "describe the image"]) == 1
    assert "decoded to nothing" in caplog.text
    batch = tmp_path / "q.jsonl"
    batch.write_text("".join(json.dumps({"image": str(image), "question": q}) + "\n" for q in ("a ?", "b ?")))
    out = tmp_path / "answers.jsonl"
    assert cli.main([*base, "--steps", "4", "--batch-file", str(batch), "--output", str(out)]) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert "error" in rows[0] and rows[1]["answer"] == "red" and "error" not in rows[1]


def test_eval_command_reports_every_task(random_checkpoint, tmp_path, capsys):
    from dimoo_npu import cli

    report_path = tmp_path / "report.json"
    argv = ["eval", "shapes", "--checkpoint", str(random_checkpoint), "--limit", "1", "--timesteps", "2"]
    assert cli.main([*argv, "--answer-steps", "2", "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    names = ["t2i", *(f"edit-{kind}" for kind in world.EDITS), "caption", "qa", "inpaint", "outpaint"]
    assert report["tasks"] == names and all(report[name]["count"] >= 1 for name in names)
    assert set(report["t2i"]["per_attribute"]) == {"shape", "colour", "size", "position"}
    assert set(report["edit-remove"]["per_attribute"]) == {"removed", "kept"}
    assert report["qa"]["count"] == len(world.QUESTIONS)
    assert json.loads(capsys.readouterr().out)["tasks"] == names
    assert cli.main([*argv, "--task", "qa", "--placements", "all", "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    shown = len(world.placements(world.split_objects("heldout")[0]))
    assert report["qa"]["count"] == shown * len(world.QUESTIONS) and report["tasks"] == ["qa"]
    pictures = tmp_path / "pictures"
    assert cli.main([*argv, "--task", "edit,t2i", "--output", str(report_path), "--images-dir", str(pictures)]) == 0
    assert json.loads(report_path.read_text())["tasks"] == ["t2i", *names[1:7]]
    assert cli.main([*argv, "--task", "t2i", "--output", str(report_path), "--images-dir", str(pictures)]) == 0
    saved = sorted(path.name for path in pictures.iterdir())
    assert saved[-2:] == ["t2i-000.png", "t2i-001.png"], "a second run adds pictures, never overwrites"
    assert "edit-remove-000.png" in saved and read_png_text(pictures / "t2i-001.png")["task"] == "t2i"
    assert cli.main(["eval", "shapes", "--checkpoint", str(random_checkpoint), "--task", "nope"]) == 2


def _train_embedded_script():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "train_embedded.py"
    spec = importlib.util.spec_from_file_location("train_embedded", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_retrain_installs_only_a_model_that_keeps_the_goals():
    script = _train_embedded_script()
    assert script.short_of_goal({"t2i": {"overall": 1.0}, "qa": {"overall": 0.95}}) == []
    assert script.short_of_goal({"t2i": {"overall": 0.93}, "qa": {"overall": 1.0}}) == ["t2i 0.930 < 0.95"]
    assert script.MAX_ASSET_BYTES <= 30_000_000
    small = dataset.scaled(dataset.DataMix(), 0.001)
    assert (small.t2i, small.edit, small.caption) == (4, 1, 2) and small.seed == dataset.DataMix().seed


def test_self_grpo_installs_only_the_goal_gains_with_no_task_down_more_than_two_items():
    script = _train_embedded_script()

    def report(recolour: float, two: float, turn: float) -> dict:
        caption = {"overall": 0.5, "count": 48, "breakdown": {"two_objects": {"overall": two, "count": 24}}}
        tasks = {"t2i": 1.0, "qa": 0.99, "edit-recolour": recolour, "edit-turn": turn}
        scores = {task: {"overall": value, "count": 48} for task, value in tasks.items()}
        return {"tasks": [*tasks, "caption"], "caption": caption, **scores}

    before = report(recolour=0.75, two=0.29, turn=0.92)
    assert script.self_grpo_misses(before, report(recolour=0.85, two=0.40, turn=0.92 - 2 / 48)) == []
    missed = script.self_grpo_misses(before, report(recolour=0.80, two=0.40, turn=0.92 - 3 / 48))
    assert len(missed) == 2 and missed[0].startswith("edit-recolour 0.750 -> 0.800")
    assert "edit-turn" in missed[1] and "more than 2 items" in missed[1]
    assert "caption/two_objects" in script.self_grpo_misses(before, report(0.9, 0.35, 0.92))[0]
