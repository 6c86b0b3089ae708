"""Inpainting and outpainting: the source image's codes with MASK cells inside (or outside) a centred box,
or where a user mask is white."""

from __future__ import annotations

from PIL import Image

from dimoo_npu.tasks.encoder import PromptEncoder
from dimoo_npu.tokens import prompts, sequences
from dimoo_npu.tokens.image_prep import box_cell_mask, check_mask_size, grid_size, image_cell_mask


def prepare(
    encoder: PromptEncoder,
    image: Image.Image,
    prompt: str,
    *,
    mask: Image.Image | None = None,
    box: tuple[float, float] = (0.5, 0.5),
    outside: bool = False,
    image_budget: int | None = None,
) -> sequences.ImagePrompt:
    """Inpainting (inside the box) or outpainting (``outside``); a user ``mask`` replaces the box."""
    if mask is not None:
        check_mask_size(mask, image)
        mask = encoder.fit(mask.convert("L"), image_budget)
    image = encoder.fit(image, image_budget)
    grid = grid_size(image)
    if mask is not None:
        cell_mask = image_cell_mask(mask, grid)
    else:
        cell_mask = box_cell_mask(image.height, image.width, grid, *box, outside=outside)
    text, uncond = encoder.chat(prompts.SYSTEM_TEXTS["image_generation"], prompt)
    cells = sequences.paint_cells(encoder.image(image), cell_mask, encoder.tokens)
    request = sequences.generation_prompt(text, uncond, cells, encoder.tokens)
    return encoder.fits(request, f"painting a {image.width}x{image.height} image")
