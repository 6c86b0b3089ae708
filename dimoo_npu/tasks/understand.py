"""Understanding: the question with the image inside, then ``gen_length`` MASK answer positions; and the
answer text read back from the sampled ids."""

from __future__ import annotations

import torch
from PIL import Image

from dimoo_npu.tasks.encoder import PromptEncoder
from dimoo_npu.tokens import prompts, sequences


def prepare(
    encoder: PromptEncoder, image: Image.Image, question: str, gen_length: int, image_budget: int | None = 1024
) -> sequences.Ids:
    """Question + image + BOA, gen_length MASK, EOA. ``image_budget`` None keeps the size."""
    image = encoder.fit(image, image_budget)
    text = encoder.text(prompts.chat_text(prompts.SYSTEM_TEXTS["understanding"], question))
    ids, _ = sequences.understanding(text, encoder.image(image), gen_length, encoder.tokens)
    encoder.limit.check(
        len(ids), f"a question on a {image.width}x{image.height} image with a {gen_length}-token answer"
    )
    return ids


# An empty answer is a failure, never a silent success (issue 18: the bundled model printed an empty line).
EMPTY_ANSWER = (
    "the answer decoded to nothing (only padding or special tokens): ask a question of the kind the model was "
    "trained on, or raise --gen-length / --steps"
)


def decode_answer(encoder: PromptEncoder, prompt: torch.Tensor, output: torch.Tensor) -> str:
    """The answer's text: from after the last BOA, cut at the first EOS / end-of-answer / padding."""
    code_start = int((prompt == encoder.tokens["boa"]).nonzero()[-1, 0]) + 1
    ids = sequences.cut_answer(output[code_start:-1].cpu(), encoder.tokens)
    text = encoder.text_tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    return text.split("</answer>")[0].strip()
