"""Text-to-image: the chat prompt, then a grid of MASK cells to sample."""

from __future__ import annotations

from dimoo_npu.settings.requests import IMAGE_FRAME, PIXELS_PER_CELL, check_image_size, square_cells
from dimoo_npu.tasks.encoder import PromptEncoder
from dimoo_npu.tokens import prompts, sequences


def prepare(encoder: PromptEncoder, prompt: str, width: int, height: int) -> sequences.ImagePrompt:
    check_image_size(width, height)
    text, uncond = encoder.chat(prompts.SYSTEM_TEXTS["image_generation"], prompt)
    grid = (height // PIXELS_PER_CELL, width // PIXELS_PER_CELL)
    request = sequences.generation_prompt(text, uncond, sequences.masked_cells(grid, encoder.tokens), encoder.tokens)
    side = largest_square(max(request.code_start - 2, len(request.uncond)), encoder.limit.cap)
    hint = f" (the largest square that fits this prompt is {side}x{side})" if side else ""
    return encoder.fits(request, f"a {width}x{height} image{hint}")


def largest_square(prefix_tokens: int, max_length: int) -> int:
    """Side in pixels of the largest square image that fits after a prompt of ``prefix_tokens`` (0: none)."""
    return square_cells(max_length - prefix_tokens - IMAGE_FRAME) * PIXELS_PER_CELL
