"""Draw one picture strip of every task the bundled shapes model does, for the README.

    python scripts/make_shapes_strip.py                       # docs/images/shapes_tasks.png from the bundled model
    python scripts/make_shapes_strip.py --checkpoint runs/shapes-embedded/export --output /tmp/strip.png

Each column is one task on a held-out example (the combinations `dimoo eval shapes` scores): the input on
top (for painting, the region to regenerate greyed), the model's output below, the prompt and answer under
them. Sampling follows the checkpoint's generation_defaults, as the CLI does.
"""

from __future__ import annotations

import argparse
import logging
import random
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
PANEL = 128
GAP = 8
TEXT_ROWS = 5  # lines of prompt / answer text under each column
LINE = 11  # pixels per text line (PIL's default bitmap font)
WRAP = 21  # characters per line at that font
logger = logging.getLogger("make_shapes_strip")


def greyed(image: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The input with the region to regenerate (mask white) shown grey."""
    shown = image.copy()
    shown[mask > 127] = (shown[mask > 127] // 3 + 140).astype(np.uint8)
    return Image.fromarray(shown)


def columns(pipeline, defaults: dict) -> list[tuple[str, Image.Image | None, Image.Image | None, str]]:
    """(title, input, output, text) per task, each on a held-out example."""
    from dimoo_npu.settings.generation_settings import ImageSettings, TextSettings
    from dimoo_npu.shapes import evaluate, world

    image_settings = ImageSettings(
        **{key: defaults[key] for key in ("timesteps", "temperature", "cfg_scale", "cfg_img") if key in defaults}
    )
    text_settings = TextSettings(**{key: defaults[key] for key in ("gen_length", "block_length", "steps")})
    budget = defaults.get("image_budget")
    made = []
    obj = world.split_objects("heldout")[0]
    prompt = world.canonical_caption(obj)
    (picture,) = pipeline.text_to_image(prompt, settings=image_settings)
    made.append(("text-to-image", None, picture, prompt))
    for kind in world.EDITS:
        edit = world.heldout_edits(kind)[1]
        source = world.render(edit.source)
        (picture,) = pipeline.edit([source], [edit.instruction], edit.edit_type, image_budget=budget,
                                   settings=image_settings)  # fmt: skip
        made.append((f"edit: {kind}", source, picture, edit.instruction))
    for kind in ("inpaint", "outpaint"):
        shown, mask = evaluate.paint_items(kind)[2]
        source = world.render_array(world.Scene((shown,)))
        prompt = world.canonical_caption(shown)
        (picture,) = pipeline.inpaint([Image.fromarray(source)], [prompt], masks=[Image.fromarray(mask)],
                                      image_budget=budget, settings=image_settings)  # fmt: skip
        made.append((kind, greyed(source, mask), picture, prompt))
    scene = evaluate.heldout_caption_scenes()[1]
    image = world.render(scene)
    asked = world.CAPTION_QUESTIONS[0]
    (answer,) = pipeline.understand([image], [asked], settings=text_settings, image_budget=budget)
    made.append(("caption", image, None, f"{asked}: {answer}"))
    asked = world.question(obj, "colour", random.Random(0))
    image = world.render(world.Scene((obj,)))
    (answer,) = pipeline.understand([image], [asked], settings=text_settings, image_budget=budget)
    made.append(("question", image, None, f"{asked} {answer}"))
    return made


def draw_strip(made: list[tuple[str, Image.Image | None, Image.Image | None, str]]) -> Image.Image:
    """Columns side by side: title, input, output, wrapped text."""
    height = LINE + 2 * PANEL + GAP + TEXT_ROWS * LINE + 2 * GAP
    strip = Image.new("RGB", (len(made) * (PANEL + GAP) + GAP, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for index, (title, source, output, text) in enumerate(made):
        left = GAP + index * (PANEL + GAP)
        draw.text((left, 2), title, fill=(0, 0, 0))
        for row, panel in enumerate((source, output)):
            top = LINE + 4 + row * (PANEL + GAP // 2)
            draw.rectangle((left - 1, top - 1, left + PANEL, top + PANEL), outline=(200, 200, 200))
            if panel is not None:
                strip.paste(panel.convert("RGB").resize((PANEL, PANEL)), (left, top))
        lines = textwrap.wrap(text, WRAP)[:TEXT_ROWS]
        for number, line in enumerate(lines):
            draw.text((left, LINE + 4 + 2 * PANEL + GAP + number * LINE), line, fill=(40, 40, 40))
    return strip


def main(argv: list[str] | None = None) -> int:
    from dimoo_npu.files.atomic import write_atomically
    from dimoo_npu.pipeline import DiMOOPipeline, generation_defaults
    from dimoo_npu.shapes.embedded import EMBEDDED_CHECKPOINT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(EMBEDDED_CHECKPOINT), help="model folder (default: the bundled)")
    parser.add_argument("--output", default=str(REPO / "docs" / "images" / "shapes_tasks.png"), help="PNG to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pipeline = DiMOOPipeline.from_pretrained(args.checkpoint, "cpu")
    strip = draw_strip(columns(pipeline, generation_defaults(args.checkpoint)))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(output, lambda tmp: strip.save(tmp, format="PNG", optimize=True))
    logger.info("wrote %s (%d x %d)", output, *strip.size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
