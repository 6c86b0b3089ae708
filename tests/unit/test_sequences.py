"""Sequence builders against the fixtures' inputs, buckets and crops, masks, prompts and the word tokenizer."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from PIL import Image

from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.tokens import image_prep, prompts, sequences
from dimoo_npu.tokens.lengths import LengthLimit
from dimoo_npu.tokens.text_tokenizer import build_word_tokenizer, load_text_tokenizer
from dimoo_npu.utils.errors import CheckpointError, InputError


@pytest.fixture(scope="module")
def tokens(checkpoint_dir):
    return DiMOOConfig.from_json(checkpoint_dir).special_tokens


@pytest.fixture(scope="module")
def schedules(fixture_dir):
    return json.loads((fixture_dir / "schedules.json").read_text())


def span(ids: torch.Tensor, first: int, last: int) -> tuple[int, int]:
    """Indices of the first ``first`` id and the first ``last`` id after it."""
    start = int((ids == first).nonzero()[0, 0])
    return start, start + int((ids[start:] == last).nonzero()[0, 0])


def grid_codes(ids: torch.Tensor, tokens, rows: int, cols: int) -> torch.Tensor:
    """(rows, cols) code indices from rows-with-newline ids."""
    return ids.reshape(rows, cols + 1)[:, :cols] - tokens["image_offset"]


@pytest.mark.parametrize(("case", "grid"), [("t2i_cfg", (8, 8)), ("t2i_wide_cfg", (4, 7)), ("t2i_many_steps", (6, 6))])
def test_text_to_image_layout(case, grid, golden, cases, tokens):
    prompt, code_start = golden[f"{case}.prompt"][0], cases["cases"][case]["code_start"]
    built = sequences.generation_prompt(
        prompt[: code_start - 2], golden[f"{case}.uncond"][0], sequences.masked_cells(grid, tokens), tokens
    )
    assert torch.equal(built.prompt, prompt)
    assert built.code_start == code_start and built.grid == grid


def test_inpaint_layout(golden, cases, tokens):
    prompt, code_start = golden["inpaint.prompt"][0], cases["cases"]["inpaint"]["code_start"]
    cells = prompt[code_start:-2].reshape(6, 7)[:, :6]
    mask = cells == tokens["mask"]
    codes = torch.where(mask, torch.zeros_like(cells), cells - tokens["image_offset"])
    built = sequences.generation_prompt(
        prompt[: code_start - 2], None, sequences.paint_cells(codes, mask, tokens), tokens
    )
    assert torch.equal(built.prompt, prompt) and int(mask.sum()) == 12


def test_image_to_image_layout(golden, cases, tokens):
    prompt, text = golden["i2i.prompt"][0], golden["i2i.uncond_image"][0]
    uncond_text = golden["i2i.uncond_text"][0]
    boi, eoi = span(prompt, tokens["boi"], tokens["eoi"])
    source = grid_codes(prompt[boi + 1 : eoi], tokens, 6, 6)
    uncond_prompt = torch.cat([uncond_text[: int((uncond_text == tokens["boi"]).nonzero()[0, 0])], uncond_text[-1:]])
    built = sequences.image_to_image(text, uncond_prompt, [source], (6, 6), tokens)
    assert torch.equal(built.prompt, prompt)
    assert torch.equal(built.uncond, uncond_text) and torch.equal(built.uncond_image, text)
    assert built.code_start == cases["cases"]["i2i"]["code_start"]
    assert built.lengths() == [len(prompt), len(uncond_text) + 46, len(text) + 46]


@pytest.mark.parametrize("case", ["mmu", "mmu_cfg"])
def test_understanding_layout(case, golden, cases, tokens):
    prompt, settings = golden[f"{case}.prompt"][0], cases["cases"][case]
    boi, eoi = span(prompt, tokens["boi"], tokens["eoi"])
    rows = int((prompt[boi:eoi] == tokens["newline"]).sum())
    codes = grid_codes(prompt[boi + 1 : eoi], tokens, rows, (eoi - boi - 1) // rows - 1)
    question = torch.cat([prompt[:boi], prompt[eoi + 1 : eoi + 2]])
    ids, code_start = sequences.understanding(question, codes, settings["gen_length"], tokens)
    assert torch.equal(ids, prompt) and code_start == settings["code_start"]


def test_two_source_images_keep_their_order(tokens):
    first, second = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long)
    built = sequences.image_to_image(torch.tensor([5, 6, 7]), torch.tensor([5, 9, 7]), [first, second], (1, 1), tokens)
    off, nl, boi, eoi = tokens["image_offset"], tokens["newline"], tokens["boi"], tokens["eoi"]
    images = [boi, off, off, nl, eoi, boi, off + 1, off + 1, nl, eoi]
    assert built.prompt[: 3 + len(images)].tolist() == [5, 6, *images, 7]
    assert built.uncond.tolist() == [5, 9, *images, 7]


def test_cut_answer(tokens):
    ids = torch.tensor([11, 12, tokens["eos"], 13])
    assert sequences.cut_answer(ids, tokens).tolist() == [11, 12]
    assert sequences.cut_answer(torch.tensor([11, tokens["answer_pad"]]), tokens).tolist() == [11]
    assert sequences.cut_answer(torch.tensor([11, 12]), tokens).tolist() == [11, 12]


def test_length_limit_warns_once_past_the_training_length_and_refuses_past_the_cap(caplog):
    limit = LengthLimit(trained=10, cap=12)
    with caplog.at_level(logging.WARNING):
        limit.check(10, "the request")
        assert not caplog.records
        limit.check(11, "the request")
        limit.check(12, "another request")
    (warning,) = caplog.records
    assert "needs 11 tokens, longer than the 10 the checkpoint names as its max_sequence_length" in warning.message
    with pytest.raises(InputError, match="needs 13 tokens, more than the cap of 12: .* --max-length 13"):
        limit.check(13, "the request")


@pytest.mark.parametrize("budget", ["512", "1024"])
def test_crop_size_lists(budget, schedules):
    assert [list(size) for size in image_prep.crop_size_list(int(budget))] == schedules["crop_size_lists"][budget]


def test_var_center_crop(schedules):
    for case in schedules["var_center_crop"]:
        image = Image.new("RGB", tuple(case["input_wh"]))
        assert list(image_prep.fit_image(image, case["target"]).size) == case["output_wh"]


def test_center_crop_keeps_the_centre():
    image = Image.new("L", (96, 32))
    image.paste(255, (32, 0, 64, 32))  # white middle third
    cropped = image_prep.fit_image(image, 32)  # bucket 32x32: the middle
    assert cropped.size == (32, 32) and image_prep.pixels(cropped).min() == 1.0


def test_native_fit_crops_to_multiples_of_16():
    assert image_prep.fit_image(Image.new("RGB", (100, 70)), None).size == (96, 64)
    with pytest.raises(InputError, match="smaller than 16x16"):
        image_prep.fit_image(Image.new("RGB", (10, 70)), None)


def test_user_mask_is_area_downsampled_strictly_above_half():
    mask = Image.new("L", (64, 32))  # grid 2 x 4
    mask.paste(255, (0, 0, 16, 16))  # cell (0, 0) fully
    mask.paste(255, (16, 0, 24, 16))  # cell (0, 1) exactly half: not masked
    mask.paste(255, (32, 16, 44, 32))  # cell (1, 2) three quarters
    cells = image_prep.image_cell_mask(mask, (2, 4))
    assert cells.tolist() == [[True, False, False, False], [False, False, True, False]]


def test_box_masks_and_bad_ratios():
    inside = image_prep.box_cell_mask(64, 64, (4, 4), 0.5, 0.5, outside=False)
    assert inside.tolist() == [[False] * 4, [False, True, True, False], [False, True, True, False], [False] * 4]
    assert torch.equal(image_prep.box_cell_mask(64, 64, (4, 4), 0.5, 0.5, outside=True), ~inside)
    with pytest.raises(InputError, match="outside \\(0, 1\\]"):
        image_prep.box_cell_mask(64, 64, (4, 4), 0.0, 0.5, outside=False)


def test_mask_checks(tokens):
    with pytest.raises(InputError, match="draw the mask at the image's size"):
        image_prep.check_mask_size(Image.new("L", (32, 32)), Image.new("RGB", (64, 32)))
    with pytest.raises(InputError, match="covers no image cell"):
        sequences.paint_cells(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.bool), tokens)


def test_load_image_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        image_prep.load_image(tmp_path / "missing.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="cannot read image"):
        image_prep.load_image(broken)


def test_edit_prompts():
    assert prompts.edit_prompt("canny_pred", None).user == "Generate a canny edge map according to the image."
    assert prompts.edit_prompt("canny_pred", None).system == prompts.SYSTEM_TEXTS["dense_prediction"]
    assert prompts.edit_prompt("depth_control", "a house").system == prompts.SYSTEM_TEXTS["control_generation"]
    assert prompts.edit_prompt("edit_add", "add a dog").system == prompts.SYSTEM_TEXTS["image_editing"]
    assert prompts.edit_prompt("image_ref_transfer", None).needs_reference
    assert "left view" in prompts.edit_prompt("multi_view_left", None).user
    assert prompts.chat_text("S", "U") == "<system>S</system><user>U</user>"
    assert prompts.uncond_text("S") == "<system>S</system><user><uncondition></user>"
    for bad, message in [("sketch", "unknown edit type"), ("multi_view", "multi_view_left")]:
        with pytest.raises(InputError, match=message):
            prompts.check_edit_type(bad)
    with pytest.raises(InputError, match="needs a text prompt"):
        prompts.edit_prompt("edit", "  ")


def test_word_tokenizer(tmp_path, checkpoint_dir, tokens):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    shutil.copy(checkpoint_dir / "config.json", folder / "config.json")
    with pytest.raises(CheckpointError, match="no text tokenizer"):
        load_text_tokenizer(folder)
    build_word_tokenizer(["a red cat"], folder)
    tokenizer = load_text_tokenizer(folder)
    ids = tokenizer(prompts.uncond_text(prompts.SYSTEM_TEXTS["image_generation"]))["input_ids"]
    assert tokens["uncondition"] in ids
    words = tokenizer("A red cat")["input_ids"]
    special = {value for key, value in tokens.items() if key not in ("codebook_size", "vocab")}
    assert len(set(words)) == 3 and not set(words) & special and max(words) < min(special)
    assert tokenizer.decode(words) == "a red cat"
    assert tokenizer("</answer>")["input_ids"] == [tokens["eoa"]]
