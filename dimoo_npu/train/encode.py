"""One manifest record -> one training `Sample` (token ids, answer mask, condition-drop span).

Records are JSON objects: ``{"id", "task", "prompt", "image", "target_image", "answer", ...}``:

- ``t2i``: ``prompt`` and ``target_image``.
- ``edit``: ``prompt``, ``image`` (the source) and ``target_image`` (the edited image).
- ``inpaint``: ``prompt``, ``target_image``, optional ``image`` (the visible context; default the target) and the
  region to regenerate: ``mask`` (a mask image, white = regenerate) or a centred box ``mask_h_ratio`` /
  ``mask_w_ratio`` (default 0.5) with ``mode`` ``inpainting`` (inside, default) or ``outpainting`` (outside).
- ``mmu``: ``prompt`` (the question), ``image`` and ``answer`` (text).

Relative image paths are read relative to the manifest's folder (`with_paths_under`), as the README's layout has it.

Layouts follow SPEC "Sequences". Image answers mark their codes only (never the end-of-line tokens);
text answers are ``BOA answer </answer> padding... EOA`` with the answer, ``</answer>`` and the padding
marked, so the model learns to pad after it answers. The condition-drop span is the user text, found as
the difference between the tokenized conditional and unconditional prompts (no assumption about how the
tokenizer splits the template). Understanding samples are never dropped, as in the public recipe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dimoo_npu.files.hub_cache import resolve_checkpoint
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.settings.requests import image_tokens
from dimoo_npu.tokens.image_prep import box_cell_mask, fit_image, grid_size, image_cell_mask, load_image
from dimoo_npu.tokens.prompts import SYSTEM_TEXTS, UNCONDITION_TEXT, chat_text, uncond_text
from dimoo_npu.tokens.sequences import answer_image, as_ids, code_cells, image_block, insert_before_last
from dimoo_npu.train.shards import TASKS, Sample
from dimoo_npu.utils.errors import CheckpointError, InputError

SYSTEMS = {
    "t2i": SYSTEM_TEXTS["image_generation"],
    "edit": SYSTEM_TEXTS["image_editing"],
    "inpaint": SYSTEM_TEXTS["image_generation"],
    "mmu": SYSTEM_TEXTS["understanding"],
}
REQUIRED = {
    "t2i": ("target_image",),
    "edit": ("image", "target_image"),
    "inpaint": ("target_image",),
    "mmu": ("image", "answer"),
}


@dataclass(frozen=True)
class EncoderSettings:
    checkpoint: str  # folder with config.json, the text tokenizer and vqvae/
    max_length: int = 4096  # longer samples are rejected
    image_budget: int | None = 512  # crop images to this bucket size (None: keep size, crop to 16 px)
    answer_length: int = 256  # understanding answers are padded to this many tokens (longer: rejected)
    device: str = "cpu"  # where the VQ encoder runs


class RecordEncoder:
    """Tokenizes records with the checkpoint's text tokenizer and VQ model; bad records raise `InputError`."""

    def __init__(self, settings: EncoderSettings):
        from dimoo_npu.tokens.image_tokenizer import ImageTokenizer
        from dimoo_npu.tokens.text_tokenizer import load_text_tokenizer

        self.settings = settings
        folder = resolve_checkpoint(settings.checkpoint)
        self.tokens = DiMOOConfig.from_json(folder).special_tokens
        self.text = load_text_tokenizer(folder)
        self.images = ImageTokenizer.from_pretrained(folder, settings.device)
        uncondition = self.text.convert_tokens_to_ids(UNCONDITION_TEXT)
        if uncondition != self.tokens["uncondition"]:
            raise CheckpointError(
                f"the text tokenizer maps {UNCONDITION_TEXT} to {uncondition}, the checkpoint's special-token table to "
                f"{self.tokens['uncondition']}: condition drops would not match the unconditional prompt sampling "
                "uses; pair the checkpoint with its own tokenizer"
            )

    def encode(self, record: dict[str, Any]) -> Sample:
        task = check_record(record)
        prompt, drop_span = self._prompt(task, str(record["prompt"]))
        if task == "mmu":
            sample = self._understanding(prompt, record)
        else:
            sample = self._image_answer(task, prompt, drop_span, record)
        if len(sample) > self.settings.max_length:
            raise InputError(f"too long: {len(sample)} tokens > max_length {self.settings.max_length}")
        return sample

    def _ids(self, text: str) -> torch.Tensor:
        return as_ids(self.text(text).input_ids)

    def _prompt(self, task: str, user: str) -> tuple[torch.Tensor, tuple[int, int]]:
        conditional = self._ids(chat_text(SYSTEMS[task], user))
        if task == "mmu":
            return conditional, (0, 0)
        unconditional = self._ids(uncond_text(SYSTEMS[task]))
        start, end = user_span(conditional, unconditional)
        dropped = torch.cat([conditional[:start], as_ids([self.tokens["uncondition"]]), conditional[end:]])
        if not torch.equal(dropped, unconditional):  # the tokenizer merged user text into the template
            raise InputError(
                "the prompt's user text does not tokenize apart from the template, so a condition drop "
                "would not give the unconditional prompt: rephrase its first or last word"
            )
        return conditional, (start, end)

    def _image(self, path: str):
        """An image file cropped to its bucket (PIL); one whose grid alone is past max_length is rejected before
        the VQ encoder runs (with image_budget 0 an image keeps its size, up to Pillow's limit)."""
        image = fit_image(load_image(path), self.settings.image_budget)
        tokens = image_tokens(*grid_size(image))
        if tokens > self.settings.max_length:
            raise InputError(
                f"too long: the {image.width}x{image.height} image {os.path.basename(path)} alone needs {tokens} "
                f"tokens > max_length {self.settings.max_length}: use a smaller image or --image-budget"
            )
        return image

    def _image_answer(self, task: str, prompt: torch.Tensor, drop_span: tuple[int, int], record: dict) -> Sample:
        target_image = self._image(record["target_image"])
        target = self.images.encode_image(target_image)  # (rows, cols) code indices
        answer_cells, region = code_cells(target, self.tokens), torch.ones_like(target, dtype=torch.bool)
        if task == "edit":
            source = self.images.encode_image(self._image(record["image"]))
            prompt = insert_before_last(prompt, image_block(source, self.tokens))
        elif task == "inpaint":
            answer_cells, region = self._inpaint_cells(target_image, target, record)
        answer = answer_image(answer_cells, self.tokens)  # BOA BOI rows EOI EOA
        end_of_line = torch.zeros(target.shape[0], 1, dtype=torch.bool)
        cell_mask = torch.cat([region, end_of_line], dim=1).reshape(-1)  # (rows * (cols + 1),)
        frame = torch.zeros(2, dtype=torch.bool)
        loss_mask = torch.cat([torch.zeros_like(prompt, dtype=torch.bool), frame, cell_mask, frame])
        return Sample(torch.cat([prompt, answer]), loss_mask, drop_span, task)

    def _inpaint_cells(self, target_image, target: torch.Tensor, record: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) ids: target cells inside the region (to predict), context cells outside; and the region."""
        context = self.images.encode_image(self._image(record["image"])) if record.get("image") else target
        if context.shape != target.shape:
            raise InputError(
                f"inpaint image grid {tuple(context.shape)} differs from target {tuple(target.shape)}: "
                "give images of the same size"
            )
        if record.get("mask"):
            mask = fit_image(load_image(record["mask"], "L"), self.settings.image_budget)
            region = image_cell_mask(mask, tuple(target.shape))
        else:
            outside = record.get("mode", "inpainting") == "outpainting"
            ratios = float(record.get("mask_h_ratio", 0.5)), float(record.get("mask_w_ratio", 0.5))
            region = box_cell_mask(target_image.height, target_image.width, grid_size(target_image), *ratios, outside)
        if not region.any():
            raise InputError("the inpainting region covers no image cell: enlarge the mask or the box")
        return torch.where(region, code_cells(target, self.tokens), code_cells(context, self.tokens)), region

    def _understanding(self, prompt: torch.Tensor, record: dict) -> Sample:
        codes = self.images.encode_image(self._image(record["image"]))
        question = insert_before_last(prompt, image_block(codes, self.tokens))
        answer = self._ids(str(record["answer"]) + "</answer>")
        room = self.settings.answer_length
        if len(answer) > room:
            raise InputError(f"too long: the answer is {len(answer)} tokens > answer_length {room}")
        padding = torch.full((room - len(answer),), self.tokens["answer_pad"], dtype=torch.long)
        boa, eoa = as_ids([self.tokens["boa"]]), as_ids([self.tokens["eoa"]])
        tokens = torch.cat([question, boa, answer, padding, eoa])
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
        loss_mask[len(question) + 1 : -1] = True
        return Sample(tokens, loss_mask, (0, 0), "mmu")


IMAGE_KEYS = ("image", "target_image", "mask")


def with_paths_under(record: Any, folder: Path) -> Any:
    """``record`` with each relative image path joined to ``folder`` (the manifest's), so a data folder can move.

    Absolute paths stay as they are; values that are not strings are left for `check_record` to refuse.
    """
    if not isinstance(record, dict):
        return record
    relative = {key: record[key] for key in IMAGE_KEYS if isinstance(record.get(key), str) and record[key]}
    return {**record, **{key: str(folder / path) for key, path in relative.items() if not os.path.isabs(path)}}


def check_record(record: Any) -> str:
    """The record's task, or `InputError` naming what is missing."""
    if not isinstance(record, dict):
        raise InputError("record is not a JSON object")
    task = record.get("task")
    if task not in TASKS:
        raise InputError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise InputError("record has no prompt text")
    for key in REQUIRED[task]:
        if not record.get(key):
            raise InputError(f"a {task} record needs {key!r}")
        if key == "answer":
            continue
        if not isinstance(record[key], str):
            raise InputError(f"{key} must be a path (a string), not {record[key]!r}")
        if os.path.isdir(record[key]):
            raise InputError(f"{key} {record[key]} is a folder: name an image file")
        if not os.path.isfile(record[key]):
            raise InputError(f"missing image: {key} {record[key]} does not exist")
    return task


def user_span(conditional: torch.Tensor, unconditional: torch.Tensor) -> tuple[int, int]:
    """[start, end) of the user text in ``conditional``: where it differs from the unconditional prompt."""
    limit = min(len(conditional), len(unconditional))
    start = 0
    while start < limit and conditional[start] == unconditional[start]:
        start += 1
    end = 0
    while end < limit - start and conditional[-1 - end] == unconditional[-1 - end]:
        end += 1
    return start, len(conditional) - end
