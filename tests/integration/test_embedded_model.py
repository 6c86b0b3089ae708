"""Smoke of the shipped default model: one picture that matches its prompt, one right answer."""

from __future__ import annotations

import numpy as np
import pytest

from dimoo_npu.shapes import world
from dimoo_npu.shapes.detect import detect_object
from dimoo_npu.shapes.embedded import ANSWER_SETTINGS, EMBEDDED_CHECKPOINT, T2I_SETTINGS

pytestmark = pytest.mark.skipif(
    not (EMBEDDED_CHECKPOINT / "model.safetensors").is_file(),
    reason="the embedded model is not installed (run scripts/train_embedded.py)",
)


@pytest.fixture(scope="module")
def pipeline():
    from dimoo_npu.pipeline import DiMOOPipeline

    return DiMOOPipeline.from_pretrained(EMBEDDED_CHECKPOINT, "cpu")


def test_draws_what_the_prompt_asks_for(pipeline):
    from dimoo_npu.generation_settings import ImageSettings

    obj = world.ShapeObject("circle", "red", "large", 0, 0)
    (image,) = pipeline.text_to_image(
        world.canonical_caption(obj), width=128, height=128, settings=ImageSettings(**T2I_SETTINGS)
    )
    found = detect_object(np.asarray(image.convert("RGB")))
    assert found is not None
    assert (found.shape, found.colour, found.size, found.position) == ("circle", "red", "large", "top left")


def test_answers_a_question_about_a_held_out_image(pipeline):
    from dimoo_npu.generation_settings import TextSettings

    # Colour, the attribute that generalised last (0.21 before objects moved inside their third, 1.00 now).
    obj = world.split_objects("heldout")[0]
    image = world.render(world.Scene((obj,)))
    asked = world.QUESTIONS["colour"][1].format(shape=obj.shape)  # "what color is the circle?"
    (answer,) = pipeline.understand([image], [asked], settings=TextSettings(**ANSWER_SETTINGS), image_budget=None)
    assert answer == obj.colour


def test_cli_defaults_come_from_the_bundled_checkpoint(tmp_path, capsys):
    from PIL import Image

    from dimoo_npu.cli import main

    # No --checkpoint and no size or step flags: the bundled model and its generation_defaults (128 x 128, 64 steps).
    assert main(["t2i", "--prompt", "a large red circle in the top left", "--out", str(tmp_path / "a.png")]) == 0
    assert Image.open(tmp_path / "a.png").size == (128, 128)
    # An explicit flag still wins over the checkpoint's default.
    assert main(["t2i", "--prompt", "a red circle", "--width", "64", "--output", str(tmp_path / "b.png")]) == 0
    assert Image.open(tmp_path / "b.png").size == (64, 128)
    capsys.readouterr()
    assert main(["understand", "--image", str(tmp_path / "a.png"), "--question", "where is the circle?"]) == 0
    assert capsys.readouterr().out.strip() == "top left"
