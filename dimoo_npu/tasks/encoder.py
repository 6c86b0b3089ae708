"""What every task's prepare step needs: text and image tokenizers, the special tokens and the length cap."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from dimoo_npu import prompts, sequences
from dimoo_npu.image_tokenizer import ImageTokenizer
from dimoo_npu.lengths import LengthLimit
from dimoo_npu.text_tokenizer import warn_unknown_words


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

    def image(self, image: Image.Image) -> torch.Tensor:
        """(rows, cols) code indices of an image whose sides are multiples of 16."""
        return self.image_tokenizer.encode_image(image)

    def fits(self, request: sequences.ImagePrompt, what: str) -> sequences.ImagePrompt:
        """Refuse a request whose longest sequence is past the cap (warn past the checkpoint's length)."""
        self.limit.check(max(request.lengths()), what)
        return request
