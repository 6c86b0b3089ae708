"""`DiMOOPipeline`: text and images in, images and answers out, for every DiMOO task, batched.

Requests are turned into token ids (`dimoo_npu.sequences`) and checked to fit before the transformer is
used; the transformer can be loaded lazily so that an 8B model is only read once every request is known
to be valid. Requests of one call are grouped by output grid and sampled together; each sample gets its
own seeded generator, so an image does not depend on what else is in its batch.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dimoo_npu import prompts, sequences
from dimoo_npu.errors import ConfigError, InputError
from dimoo_npu.generation_settings import ImageSettings, TextSettings
from dimoo_npu.hub_cache import resolve_checkpoint
from dimoo_npu.image_prep import PIXELS_PER_CELL, box_cell_mask, check_mask_size, fit_image, grid_size, image_cell_mask
from dimoo_npu.image_tokenizer import ImageTokenizer
from dimoo_npu.lengths import LengthLimit
from dimoo_npu.text_tokenizer import load_text_tokenizer

logger = logging.getLogger(__name__)

# The public inference scripts' sizes, used when a checkpoint's generation_defaults name none.
PUBLIC_IMAGE_SIZE = 1024  # inference_t2i.py --width/--height
PUBLIC_UNDERSTANDING_BUDGET = 1024  # inference_mmu.py crops to the 1024-pixel bucket list


def default_checkpoint() -> Path:
    """The checkpoint used when none is named: the small shapes-world model that ships in the package."""
    from dimoo_npu.shapes.embedded import EMBEDDED_CHECKPOINT

    if not (EMBEDDED_CHECKPOINT / "config.json").is_file():
        raise ConfigError(
            f"no checkpoint given and the bundled model is missing from {EMBEDDED_CHECKPOINT}: pass --checkpoint PATH "
            "(a DiMOO checkpoint folder with config.json, safetensors weights, tokenizer and vqvae/), or rebuild it "
            "with `python scripts/train_embedded.py`"
        )
    return EMBEDDED_CHECKPOINT


def generation_defaults(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Sampling defaults a checkpoint asks for (config.json ``generation_defaults``); empty when it names none.

    A small model cannot take the public defaults (1024 x 1024 images, 1024-token answers), so it says its own.
    """
    path = resolve_checkpoint(checkpoint) / "config.json"
    try:
        return dict(json.loads(path.read_text()).get("generation_defaults") or {})
    except (OSError, json.JSONDecodeError):
        return {}  # load_model reports an unreadable config with the fix


def check_image_size(width: int, height: int) -> None:
    """Generated sides must be positive multiples of 16 pixels (one image token per 16 x 16)."""
    for name, value in (("width", width), ("height", height)):
        if value < PIXELS_PER_CELL or value % PIXELS_PER_CELL:
            lower = max(PIXELS_PER_CELL, value // PIXELS_PER_CELL * PIXELS_PER_CELL)
            upper = lower + PIXELS_PER_CELL if value > lower else lower
            nearest = f"{lower} or {upper}" if upper != lower else f"{lower}"
            raise InputError(f"{name} {value} is not a multiple of 16 pixels: use {nearest}")


def largest_square(prefix_tokens: int, max_length: int) -> int:
    """Side in pixels of the largest square image that fits after a prompt of ``prefix_tokens`` (0: none)."""
    cells = 0
    while prefix_tokens + 4 + (cells + 1) * (cells + 2) <= max_length:  # BOA BOI rows-with-newline EOI EOA
        cells += 1
    return cells * PIXELS_PER_CELL


class DiMOOPipeline:
    """A DiMOO model with its text and image tokenizers. ``model`` may be a zero-argument loader (lazy).

    ``max_length`` caps sequence lengths (default: `dimoo_npu.lengths.length_cap`); longer than the checkpoint's
    max_sequence_length runs with one warning.
    """

    def __init__(
        self,
        model: torch.nn.Module | Callable[[], torch.nn.Module],
        text_tokenizer,
        image_tokenizer: ImageTokenizer,
        config,
        device: torch.device,
        max_length: int | None = None,
    ):
        self.limit = LengthLimit.for_model(config.max_sequence_length, max_length)
        self._model = model
        if isinstance(model, torch.nn.Module):
            model.max_length = self.limit.cap
        self.text_tokenizer = text_tokenizer
        self.image_tokenizer = image_tokenizer
        self.config = config
        self.device = torch.device(device)
        self.tokens = config.special_tokens
        self.progress = False  # per-step progress bars of the samplers

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        lazy: bool = False,
        max_length: int | None = None,
    ) -> DiMOOPipeline:
        """Tokenizers now; the transformer now, or on first use when ``lazy``."""
        from dimoo_npu.checkpoint import load_model, resolve_target
        from dimoo_npu.config import DiMOOConfig

        folder = resolve_checkpoint(path)
        config = DiMOOConfig.from_json(folder)
        target = resolve_target(device)
        text_tokenizer = load_text_tokenizer(folder)
        image_tokenizer = ImageTokenizer.from_pretrained(folder, device=target)

        def loader():
            return load_model(folder, device=target, dtype=dtype).eval()

        return cls(loader if lazy else loader(), text_tokenizer, image_tokenizer, config, target, max_length)

    @property
    def model(self):
        if callable(self._model) and not isinstance(self._model, torch.nn.Module):
            self._model = self._model()
            self._model.max_length = self.limit.cap
        return self._model

    # ---- token ids of each task (no transformer needed) ----

    def encode_text(self, text: str) -> torch.Tensor:
        return sequences.as_ids(self.text_tokenizer(text)["input_ids"])

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """(rows, cols) code indices of an image whose sides are multiples of 16."""
        return self.image_tokenizer.encode_image(image)

    def prepare_text_to_image(self, prompt: str, width: int, height: int) -> sequences.ImagePrompt:
        check_image_size(width, height)
        system = prompts.SYSTEM_TEXTS["image_generation"]
        grid = (height // PIXELS_PER_CELL, width // PIXELS_PER_CELL)
        request = sequences.text_to_image(
            self.encode_text(prompts.chat_text(system, prompt)),
            self.encode_text(prompts.uncond_text(system)),
            sequences.masked_cells(grid, self.tokens),
            self.tokens,
        )
        prefix = max(request.code_start - 2, len(request.uncond))
        side = largest_square(prefix, self.limit.cap)
        hint = f" (the largest square that fits this prompt is {side}x{side})" if side else ""
        return self._checked(request, f"a {width}x{height} image{hint}")

    def prepare_edit(
        self,
        image: Image.Image,
        prompt: str | None,
        edit_type: str,
        reference: Image.Image | None = None,
        image_budget: int | None = 512,
    ) -> sequences.ImagePrompt:
        """Image-to-image; style transfer reads ``image`` then ``reference`` and, as the public code, makes
        an image of the reference's bucket."""
        texts = prompts.edit_prompt(edit_type, prompt)
        if prompt and texts.user != prompt:
            logger.warning(
                "edit type %s uses its fixed instruction %r; the given prompt is not used", edit_type, texts.user
            )
        if texts.needs_reference and reference is None:
            raise InputError(f"edit type {edit_type} needs a style reference image: pass --ref-image")
        sources = [fit_image(image, image_budget)]
        if texts.needs_reference:
            sources.append(fit_image(reference, image_budget))
        request = sequences.image_to_image(
            self.encode_text(prompts.chat_text(texts.system, texts.user)),
            self.encode_text(prompts.uncond_text(texts.system)),
            [self.encode_image(source) for source in sources],
            grid_size(sources[-1]),
            self.tokens,
        )
        return self._checked(request, f"editing a {sources[-1].width}x{sources[-1].height} image")

    def prepare_paint(
        self,
        image: Image.Image,
        prompt: str,
        *,
        mask: Image.Image | None = None,
        box: tuple[float, float] = (0.5, 0.5),
        outside: bool = False,
        image_budget: int | None = None,
    ) -> sequences.ImagePrompt:
        """Inpainting (inside the centred box) or outpainting (``outside``); a user ``mask`` replaces the box."""
        if mask is not None:
            check_mask_size(mask, image)
            mask = fit_image(mask.convert("L"), image_budget)
        image = fit_image(image, image_budget)
        grid = grid_size(image)
        if mask is not None:
            cell_mask = image_cell_mask(mask, grid)
        else:
            cell_mask = box_cell_mask(image.height, image.width, grid, *box, outside=outside)
        system = prompts.SYSTEM_TEXTS["image_generation"]
        request = sequences.text_to_image(
            self.encode_text(prompts.chat_text(system, prompt)),
            self.encode_text(prompts.uncond_text(system)),
            sequences.paint_cells(self.encode_image(image), cell_mask, self.tokens),
            self.tokens,
        )
        return self._checked(request, f"painting a {image.width}x{image.height} image")

    def prepare_understanding(
        self, image: Image.Image, question: str, gen_length: int, image_budget: int | None = PUBLIC_UNDERSTANDING_BUDGET
    ) -> torch.Tensor:
        """Question + image + BOA, gen_length MASK, EOA."""
        image = fit_image(image, image_budget)
        text = self.encode_text(prompts.chat_text(prompts.SYSTEM_TEXTS["understanding"], question))
        ids, _ = sequences.understanding(text, self.encode_image(image), gen_length, self.tokens)
        what = f"a question on a {image.width}x{image.height} image with a {gen_length}-token answer"
        self.limit.check(len(ids), what)
        return ids

    def _checked(self, request: sequences.ImagePrompt, what: str) -> sequences.ImagePrompt:
        self.limit.check(max(request.lengths()), what)
        return request

    # ---- sampling ----

    def sample_codes(
        self,
        requests: Sequence[sequences.ImagePrompt],
        settings: ImageSettings,
        seeds: Sequence[int],
        batch_size: int = 4,
    ) -> list[torch.Tensor]:
        """Sample every request (grouped by grid, ``batch_size`` at a time): (rows, cols) code grids, in order."""
        from dimoo_npu.sampling import sample_image

        settings.check()
        if len(seeds) != len(requests):
            raise InputError(f"{len(seeds)} seeds for {len(requests)} requests: give one seed per request")
        grids: list[torch.Tensor | None] = [None] * len(requests)
        for chunk in _chunks_by_grid(requests, batch_size):
            batch = [requests[i] for i in chunk]
            ids = sample_image(
                self.model,
                [r.prompt.to(self.device) for r in batch],
                uncond_ids=self._prefixes(batch, "uncond", settings.cfg_scale),
                uncond_image_ids=self._prefixes(batch, "uncond_image", settings.cfg_img),
                generator=[self._generator(seeds[i]) for i in chunk],
                progress=self.progress,
                **settings.sampler_kwargs(),
            )  # (B, rows*cols) absolute ids
            codes = (ids.cpu() - self.tokens["image_offset"]).reshape(len(batch), *batch[0].grid)  # (B, rows, cols)
            for index, grid in zip(chunk, codes, strict=True):
                grids[index] = grid
        return grids  # type: ignore[return-value]

    def generate_images(
        self,
        requests: Sequence[sequences.ImagePrompt],
        settings: ImageSettings,
        seeds: Sequence[int],
        batch_size: int = 4,
    ) -> list[Image.Image]:
        """`sample_codes`, decoded to images."""
        codes = self.sample_codes(requests, settings, seeds, batch_size)
        return [self.image_tokenizer.decode_images(grid[None])[0] for grid in codes]

    def _prefixes(self, batch: Sequence[sequences.ImagePrompt], name: str, scale: float) -> list | None:
        """The requests' uncond prefixes of one branch; passed even at scale 0 (editing keeps the public
        code's guidance formula when only one scale is set), refused when a set scale has no branch."""
        prefixes = [getattr(r, name) for r in batch]
        if any(p is None for p in prefixes):
            if scale > 0:
                flag = "--cfg-img" if name == "uncond_image" else "--cfg-scale"
                raise InputError(f"{flag} is set but this task has no such guidance branch: set it to 0")
            return None
        return [p.to(self.device) for p in prefixes]

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def answer(
        self, requests: Sequence[torch.Tensor], settings: TextSettings, seeds: Sequence[int], batch_size: int = 4
    ) -> list[str]:
        """Sample the answers of understanding requests; each cut at its first EOS / end-of-answer / padding."""
        from dimoo_npu.sampling import sample_text

        settings.check()
        answers = []
        for start in range(0, len(requests), batch_size):
            batch = [ids.to(self.device) for ids in requests[start : start + batch_size]]
            outputs = sample_text(
                self.model,
                batch,
                generator=[self._generator(s) for s in seeds[start : start + batch_size]],
                progress=self.progress,
                **settings.sampler_kwargs(),
            )
            answers += [self._decode_answer(ids, out) for ids, out in zip(batch, outputs, strict=True)]
        return answers

    def _decode_answer(self, prompt: torch.Tensor, output: torch.Tensor) -> str:
        code_start = int((prompt == self.tokens["boa"]).nonzero()[-1, 0]) + 1
        ids = sequences.cut_answer(output[code_start:-1].cpu(), self.tokens)
        text = self.text_tokenizer.decode(ids.tolist(), skip_special_tokens=True)
        return text.split("</answer>")[0].strip()

    # ---- one-call conveniences ----

    def text_to_image(
        self,
        prompts_: str | Sequence[str],
        *,
        width: int | None = None,
        height: int | None = None,
        settings: ImageSettings | None = None,
        seed: int = 0,
        batch_size: int = 4,
    ) -> list[Image.Image]:
        """Sizes default to the checkpoint's generation_defaults, else the public 1024 x 1024."""
        width = width or self.config.generation_defaults.get("width", PUBLIC_IMAGE_SIZE)
        height = height or self.config.generation_defaults.get("height", PUBLIC_IMAGE_SIZE)
        texts = [prompts_] if isinstance(prompts_, str) else list(prompts_)
        requests = [self.prepare_text_to_image(text, width, height) for text in texts]
        return self.generate_images(requests, settings or ImageSettings(), _seeds(seed, len(texts)), batch_size)

    def edit(
        self,
        images: Sequence[Image.Image],
        prompts_: Sequence[str | None],
        edit_type: str = "edit",
        *,
        references: Sequence[Image.Image | None] | None = None,
        image_budget: int | None = 512,
        settings: ImageSettings | None = None,
        seed: int = 0,
        batch_size: int = 4,
    ) -> list[Image.Image]:
        references = references or [None] * len(images)
        requests = [
            self.prepare_edit(image, text, edit_type, ref, image_budget)
            for image, text, ref in zip(images, prompts_, references, strict=True)
        ]
        settings = settings or ImageSettings(cfg_scale=2.5, cfg_img=4.0)
        return self.generate_images(requests, settings, _seeds(seed, len(requests)), batch_size)

    def inpaint(
        self,
        images: Sequence[Image.Image],
        prompts_: Sequence[str],
        *,
        masks: Sequence[Image.Image | None] | None = None,
        mask_h_ratio: float = 0.5,
        mask_w_ratio: float = 0.5,
        outside: bool = False,
        image_budget: int | None = None,
        settings: ImageSettings | None = None,
        seed: int = 0,
        batch_size: int = 4,
    ) -> list[Image.Image]:
        masks = masks or [None] * len(images)
        requests = [
            self.prepare_paint(
                image, text, mask=mask, box=(mask_h_ratio, mask_w_ratio), outside=outside, image_budget=image_budget
            )
            for image, text, mask in zip(images, prompts_, masks, strict=True)
        ]
        return self.generate_images(requests, settings or ImageSettings(), _seeds(seed, len(requests)), batch_size)

    def outpaint(
        self,
        images: Sequence[Image.Image],
        prompts_: Sequence[str],
        *,
        mask_h_ratio: float = 1.0,
        mask_w_ratio: float = 0.2,
        **kwargs,
    ) -> list[Image.Image]:
        """Outpainting: regenerate outside the centred box (or the white region of a user mask)."""
        return self.inpaint(
            images, prompts_, mask_h_ratio=mask_h_ratio, mask_w_ratio=mask_w_ratio, outside=True, **kwargs
        )

    def understand(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        *,
        settings: TextSettings | None = None,
        image_budget: int | None = PUBLIC_UNDERSTANDING_BUDGET,
        seed: int = 0,
        batch_size: int = 4,
    ) -> list[str]:
        settings = (settings or TextSettings()).check()
        requests = [
            self.prepare_understanding(image, question, settings.gen_length, image_budget)
            for image, question in zip(images, questions, strict=True)
        ]
        return self.answer(requests, settings, _seeds(seed, len(requests)), batch_size)


def _seeds(seed: int, count: int) -> list[int]:
    """Request i gets seed + i, so a request's image does not depend on how the requests are batched."""
    return [seed + index for index in range(count)]


def _chunks_by_grid(requests: Sequence[sequences.ImagePrompt], batch_size: int) -> list[list[int]]:
    """Indices grouped by output grid (the sampler takes one grid per call), at most ``batch_size`` each."""
    if batch_size < 1:
        raise InputError(f"batch size {batch_size} must be at least 1")
    groups: dict[tuple[int, int], list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.grid, []).append(index)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
