"""Token sequences of every task, built from token ids (see SPEC "Sequences").

An image of h x w cells is h rows of w ids, each row followed by end-of-line. Generation inputs are
``prompt + BOA BOI rows EOI EOA``; source images (``BOI rows EOI``) go before the prompt's last token;
understanding appends ``BOA + n MASK + EOA``. Every builder returns 1-D LongTensors; ids come from the
checkpoint's special-token table (``model.config.special_tokens``), never from constants here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from dimoo_npu.utils.errors import InputError

Ids = torch.Tensor  # 1-D LongTensor of token ids


@dataclass
class ImagePrompt:
    """One image-generation request in the form `dimoo_npu.sampling.sample_image` takes."""

    prompt: Ids  # whole input: prompt, BOA BOI, rows (MASK = to sample), EOI EOA
    uncond: Ids | None  # text-CFG prefix: the unconditional prompt (editing: with the source images)
    uncond_image: Ids | None  # image-CFG prefix (editing only): the text prompt without the images
    grid: tuple[int, int]  # (rows, cols) of the output image
    code_start: int  # index of the first image cell in ``prompt``

    def lengths(self) -> list[int]:
        """Lengths of every sequence the sampler will run (uncond prefixes plus the image part)."""
        image_part = len(self.prompt) - self.code_start + 2
        extra = [len(p) + image_part for p in (self.uncond, self.uncond_image) if p is not None]
        return [len(self.prompt), *extra]


def as_ids(values: Sequence[int] | torch.Tensor) -> Ids:
    return torch.as_tensor(values, dtype=torch.long).reshape(-1)


def image_rows(cells: torch.Tensor, tokens: Mapping[str, int]) -> Ids:
    """(h, w) absolute ids -> h*(w+1) ids: each row followed by end-of-line."""
    newline = torch.full((cells.shape[0], 1), tokens["newline"], dtype=torch.long)
    return torch.cat([cells.long(), newline], dim=1).reshape(-1)  # (h, w+1) -> (h*(w+1),)


def code_cells(codes: torch.Tensor, tokens: Mapping[str, int]) -> torch.Tensor:
    """(h, w) code indices -> (h, w) absolute token ids."""
    return codes.long() + tokens["image_offset"]


def image_block(codes: torch.Tensor, tokens: Mapping[str, int]) -> Ids:
    """A source image as the model reads it: BOI, rows of absolute ids with end-of-line, EOI."""
    rows = image_rows(code_cells(codes, tokens), tokens)
    return torch.cat([as_ids([tokens["boi"]]), rows, as_ids([tokens["eoi"]])])


def masked_cells(grid: tuple[int, int], tokens: Mapping[str, int]) -> torch.Tensor:
    """(h, w) of MASK: an image to generate from nothing."""
    return torch.full(grid, tokens["mask"], dtype=torch.long)


def paint_cells(codes: torch.Tensor, cell_mask: torch.Tensor, tokens: Mapping[str, int]) -> torch.Tensor:
    """(h, w): the source image's ids with MASK where ``cell_mask`` is True (inpainting / outpainting)."""
    if cell_mask.shape != codes.shape:
        raise InputError(f"cell mask {tuple(cell_mask.shape)} does not match the image grid {tuple(codes.shape)}")
    if not cell_mask.any():
        raise InputError(
            "the mask covers no image cell (a cell is regenerated when > 50% of it is masked): "
            "enlarge the masked region"
        )
    return torch.where(cell_mask, torch.full_like(codes, tokens["mask"]), code_cells(codes, tokens))


def insert_before_last(ids: Ids, *blocks: Ids) -> Ids:
    """``ids[:-1] + blocks + ids[-1:]``: where images go in a prompt (before its closing token)."""
    if len(ids) < 1:
        raise InputError("the prompt encodes to no tokens: check the text tokenizer")
    return torch.cat([ids[:-1], *blocks, ids[-1:]])


def answer_image(cells: torch.Tensor, tokens: Mapping[str, int]) -> Ids:
    """BOA BOI rows EOI EOA: the image part of a generation input."""
    head, tail = as_ids([tokens["boa"], tokens["boi"]]), as_ids([tokens["eoi"], tokens["eoa"]])
    return torch.cat([head, image_rows(cells, tokens), tail])


def generation_prompt(prompt: Ids, uncond: Ids | None, cells: torch.Tensor, tokens: Mapping[str, int]) -> ImagePrompt:
    """Text-to-image (``cells`` all MASK) or inpainting/outpainting (``cells`` from `paint_cells`)."""
    return ImagePrompt(
        prompt=torch.cat([prompt, answer_image(cells, tokens)]),
        uncond=uncond,
        uncond_image=None,
        grid=(int(cells.shape[0]), int(cells.shape[1])),
        code_start=len(prompt) + 2,
    )


def image_to_image(
    prompt: Ids, uncond: Ids, sources: Sequence[torch.Tensor], grid: tuple[int, int], tokens: Mapping[str, int]
) -> ImagePrompt:
    """Editing-style input: source images (code grids, in order) inside both the prompt and the uncond text."""
    blocks = [image_block(codes, tokens) for codes in sources]
    conditioned = insert_before_last(prompt, *blocks)
    return ImagePrompt(
        prompt=torch.cat([conditioned, answer_image(masked_cells(grid, tokens), tokens)]),
        uncond=insert_before_last(uncond, *blocks),
        uncond_image=prompt,
        grid=grid,
        code_start=len(conditioned) + 2,
    )


def understanding(prompt: Ids, codes: torch.Tensor, gen_length: int, tokens: Mapping[str, int]) -> tuple[Ids, int]:
    """Question with the image before its last token, then BOA + gen_length MASK + EOA; and code_start."""
    if gen_length < 1:
        raise InputError(f"answer length {gen_length} must be at least 1")
    question = insert_before_last(prompt, image_block(codes, tokens))
    answer = torch.cat([as_ids([tokens["boa"]]), torch.full((gen_length,), tokens["mask"]), as_ids([tokens["eoa"]])])
    return torch.cat([question, answer]), len(question) + 1


def cut_answer(ids: Ids, tokens: Mapping[str, int]) -> Ids:
    """Generated answer ids up to (not including) the first EOS, end-of-answer or answer padding."""
    stops = torch.isin(ids, as_ids([tokens["eos"], tokens["eoa"], tokens["answer_pad"]]))
    hits = stops.nonzero()
    return ids[: int(hits[0, 0])] if len(hits) else ids
