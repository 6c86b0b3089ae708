"""Image-to-image (editing, control, dense prediction, subject, style transfer, multi-view): source images
inside the prompt, a grid of MASK cells of the last source's size to sample."""

from __future__ import annotations

import logging

from PIL import Image

from dimoo_npu.tasks.encoder import PromptEncoder
from dimoo_npu.tokens import prompts, sequences
from dimoo_npu.tokens.image_prep import grid_size
from dimoo_npu.utils.errors import InputError

logger = logging.getLogger(__name__)


def prepare(
    encoder: PromptEncoder,
    image: Image.Image,
    prompt: str | None,
    edit_type: str,
    reference: Image.Image | None = None,
    image_budget: int | None = 512,
) -> sequences.ImagePrompt:
    """Style transfer reads ``image`` then ``reference`` and, as the public code, makes an image of the
    reference's bucket. ``image_budget`` None keeps the size (cropped to multiples of 16)."""
    texts = prompts.edit_prompt(edit_type, prompt)
    if prompt and texts.user != prompt:
        logger.warning(
            "edit type %s uses its fixed instruction %r; the given prompt is not used", edit_type, texts.user
        )
    if texts.needs_reference and reference is None:
        raise InputError(f"edit type {edit_type} needs a style reference image: pass --ref-image")
    sources = [encoder.fit(image, image_budget)]
    if texts.needs_reference:
        sources.append(encoder.fit(reference, image_budget))
    text, uncond = encoder.chat(texts.system, texts.user)
    request = sequences.image_to_image(
        text, uncond, [encoder.image(source) for source in sources], grid_size(sources[-1]), encoder.tokens
    )
    return encoder.fits(request, f"editing a {sources[-1].width}x{sources[-1].height} image")
