"""Prepare: a generation request becomes the token ids a sampler takes, one module per task.

`encoder.PromptEncoder` holds what every task needs (tokenizers, special tokens, the length cap); each task module
has ``prepare(encoder, ...)``; `prepare_request` reads a resolved request's files and calls its task. No
transformer is needed here, so every request is prepared and checked before the model loads.
"""

from __future__ import annotations

from dimoo_npu.settings import requests
from dimoo_npu.tasks import edit, paint, text_to_image, understand
from dimoo_npu.tasks.encoder import PromptEncoder
from dimoo_npu.tokens.image_prep import load_image
from dimoo_npu.tokens.sequences import Ids, ImagePrompt

__all__ = ["PromptEncoder", "check_files", "prepare_request"]


def check_files(request: requests.Request) -> None:
    """The request's input images open (sizes, modes, decompression limits): before any tokenizer or model."""
    for name in ("image", "ref_image", "mask"):
        path = getattr(request, name, None)
        if path:
            load_image(path)


def prepare_request(encoder: PromptEncoder, request: requests.Request) -> ImagePrompt | Ids:
    """The sampler's input of one resolved request (`dimoo_npu.settings.requests.resolve`)."""
    budget = getattr(request, "image_budget", None) or None  # 0: keep the size
    if isinstance(request, requests.TextToImageRequest):
        return text_to_image.prepare(encoder, request.prompt, request.width, request.height)
    if isinstance(request, requests.UnderstandRequest):
        return understand.prepare(encoder, load_image(request.image), request.question, request.gen_length, budget)
    image = load_image(request.image)
    if isinstance(request, requests.EditRequest):
        reference = load_image(request.ref_image) if request.ref_image else None
        return edit.prepare(encoder, image, request.prompt, request.edit_type, reference, budget)
    mask = load_image(request.mask, mode="L") if request.mask else None
    box = (request.mask_h_ratio, request.mask_w_ratio)
    outside = isinstance(request, requests.OutpaintRequest)
    return paint.prepare(encoder, image, request.prompt, mask=mask, box=box, outside=outside, image_budget=budget)
