"""What every task's prepare step needs: text and image tokenizers, the special tokens and the length cap."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from dimoo_npu.settings.requests import budget_tokens, image_tokens
from dimoo_npu.tokens import prompts, sequences
from dimoo_npu.tokens.image_prep import fit_image, grid_size
from dimoo_npu.tokens.image_tokenizer import ImageTokenizer
from dimoo_npu.tokens.lengths import LengthLimit
from dimoo_npu.tokens.text_tokenizer import warn_unknown_words
from dimoo_npu.utils.errors import InputError


@dataclass
class PromptEncoder:
    text_tokenizer: Any
    image_tokenizer: ImageTokenizer
    tokens: Mapping[str, int]
    limit: LengthLimit

    def text(self, text: str) -> sequences.Ids:
        warn_unknown_words(self.text_tokenizer, text)
        return sequences.as_ids(self.text_tokenizer(text)["input_ids"])

    def chat(self, system: str, user: str) -> tuple[sequences.Ids, sequences.Ids]:
        """The prompt in the chat template and its unconditional twin (the text-CFG branch)."""
        return self.text(prompts.chat_text(system, user)), self.text(prompts.uncond_text(system))

    def fit(self, image: Image.Image, budget: int | None) -> Image.Image:
        """`fit_image`, once the budget's picture is known to fit the cap (a large budget enlarges the image)."""
        if budget and budget_tokens(budget) > self.limit.cap:
            raise InputError(
                f"image budget {budget} makes a picture of about {budget_tokens(budget)} tokens, more than the length "
                f"cap of {self.limit.cap}: use a smaller image budget, or raise the cap with --max-length"
            )
        return fit_image(image, budget)

    def image(self, image: Image.Image) -> torch.Tensor:
        """(rows, cols) code indices of an image whose sides are multiples of 16; one past the cap is refused
        before the VQ encoder runs (a kept size, budget 0, can be as large as Pillow opens)."""
        tokens = image_tokens(*grid_size(image))
        if tokens > self.limit.cap:
            self.limit.check(tokens, f"a {image.width}x{image.height} input image")
        return self.image_tokenizer.encode_image(image)

    def fits(self, request: sequences.ImagePrompt, what: str) -> sequences.ImagePrompt:
        """Refuse a request whose longest sequence is past the cap (warn past the checkpoint's length)."""
        self.limit.check(max(request.lengths()), what)
        return request
