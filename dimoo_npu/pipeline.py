"""`DiMOOPipeline`: text and images in, images and answers out, for every DiMOO task, batched.

Three steps, each usable alone: prepare (a request becomes token ids, `dimoo_npu.tasks`; checked to fit before
the transformer is used), sample (`dimoo_npu.sampling`; requests are grouped by output grid and sampler
settings in `plan_batches`, the one place batches are formed, ``batch_size`` per forward), decode (VQ codes to
images, answer ids to text). The transformer can be loaded lazily so that an 8B model is only read once every
request is known to be valid. Each sample gets its own seeded generator, so an image does not depend on what
else is in its batch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from dimoo_npu.files.hub_cache import resolve_checkpoint
from dimoo_npu.settings import requests as req
from dimoo_npu.settings.generation_settings import DEFAULTS, ImageSettings, TextSettings
from dimoo_npu.settings.requests import generation_defaults  # noqa: F401 (re-exported: callers read a checkpoint's defaults)
from dimoo_npu.tasks import PromptEncoder, edit, paint, prepare_request, text_to_image, understand
from dimoo_npu.tokens.image_tokenizer import ImageTokenizer
from dimoo_npu.tokens.lengths import LengthLimit
from dimoo_npu.tokens.sequences import Ids, ImagePrompt
from dimoo_npu.tokens.text_tokenizer import load_text_tokenizer
from dimoo_npu.utils.errors import ConfigError, InputError

logger = logging.getLogger(__name__)


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


def plan_batches(keys: Sequence[Hashable], batch_size: int) -> list[list[int]]:
    """Indices grouped by key (output grid and sampler settings: one sampler call each), ``batch_size`` at most
    per batch; groups in order of first appearance, so only the last batch of a group can run short."""
    if batch_size < 1:
        raise InputError(f"batch size {batch_size} must be at least 1")
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def _per_request(settings, count: int) -> list:
    """One settings object for every request, or one per request."""
    if isinstance(settings, (ImageSettings, TextSettings)):
        return [settings] * count
    if len(settings) != count:
        raise InputError(f"{len(settings)} settings for {count} requests: give one, or one per request")
    return list(settings)


class DiMOOPipeline:
    """A DiMOO model with its text and image tokenizers. ``model`` may be a zero-argument loader (lazy).

    ``max_length`` caps sequence lengths (default: `dimoo_npu.tokens.lengths.length_cap`); longer than the checkpoint's
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
        self.encoder = PromptEncoder(text_tokenizer, image_tokenizer, self.tokens, self.limit)
        self.progress = False  # per-step progress bars of the samplers

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        lazy: bool = False,
        max_length: int | None = None,
        compile: bool | None = None,
        quantize: str | None = None,
        lora: str | os.PathLike | None = None,
    ) -> DiMOOPipeline:
        """Tokenizers now; the transformer now, or on first use when ``lazy``, in the fused sampling layout and,
        with ``compile`` (None: ``DIMOO_COMPILE``), in graph mode; ``quantize``: see `load_model`. ``lora``: an
        adapter folder merged at load, checked against the checkpoint now (even when ``lazy``)."""
        from dimoo_npu.checkpoint import load_model, resolve_target
        from dimoo_npu.modeling.config import DiMOOConfig
        from dimoo_npu.sampling.graph import prepare_for_sampling

        folder = resolve_checkpoint(path)
        config = DiMOOConfig.from_json(folder)
        target = resolve_target(device)
        text_tokenizer = load_text_tokenizer(folder)
        image_tokenizer = ImageTokenizer.from_pretrained(folder, device=target)

        if lora is not None:  # a mismatched adapter is refused before any request is sampled
            load_model(folder, device="meta", quantize=quantize, lora=lora)

        def loader():
            model = load_model(folder, device=target, dtype=dtype, quantize=quantize, lora=lora)
            return prepare_for_sampling(model.eval(), compile=compile)

        return cls(loader if lazy else loader(), text_tokenizer, image_tokenizer, config, target, max_length)

    @property
    def model(self):
        if callable(self._model) and not isinstance(self._model, torch.nn.Module):
            self._model = self._model()
            self._model.max_length = self.limit.cap
        return self._model

    # ---- prepare (no transformer needed) ----

    def encode_text(self, text: str) -> Ids:
        """Token ids of ``text`` (a warning names the words the tokenizer does not know)."""
        return self.encoder.text(text)

    def resolve(self, request: req.Request, where: str = "the request", count: int = 1) -> req.Request:
        """Defaults from the checkpoint's generation_defaults, else the public ones; then checked, sizes against
        the length cap (``count`` samples: seeds seed .. seed + count - 1)."""
        return req.check(req.resolve(request, self.config.generation_defaults), where, self.limit.cap, count)

    def prepare(self, request: req.Request) -> ImagePrompt | Ids:
        """A resolved request's sampler input (`dimoo_npu.tasks`), checked to fit the length cap."""
        return prepare_request(self.encoder, request)

    # ---- sample ----

    def iter_grids(
        self,
        prompts: Sequence[ImagePrompt],
        settings: ImageSettings | Sequence[ImageSettings],
        seeds: Sequence[int],
        batch_size: int = 4,
    ) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
        """Sample every prompt, ``batch_size`` per forward after grouping by grid and settings: per batch, the
        prompts' indices and their (rows, cols) code grids."""
        from dimoo_npu.sampling import sample_image

        every = [s.check() for s in _per_request(settings, len(prompts))]
        if len(seeds) != len(prompts):
            raise InputError(f"{len(seeds)} seeds for {len(prompts)} requests: give one seed per request")
        keys = [(p.grid, dataclasses.astuple(s)) for p, s in zip(prompts, every, strict=True)]
        for chunk in plan_batches(keys, batch_size):
            batch, chosen = [prompts[i] for i in chunk], every[chunk[0]]
            ids = sample_image(
                self.model,
                [p.prompt.to(self.device) for p in batch],
                uncond_ids=self._prefixes(batch, "uncond", chosen.cfg_scale),
                uncond_image_ids=self._prefixes(batch, "uncond_image", chosen.cfg_img),
                generator=[self._generator(seeds[i]) for i in chunk],
                progress=self.progress,
                **chosen.sampler_kwargs(),
            )  # (B, rows*cols) absolute ids
            codes = (ids.cpu() - self.tokens["image_offset"]).reshape(len(batch), *batch[0].grid)  # (B, rows, cols)
            yield chunk, list(codes)

    def sample_grids(
        self,
        prompts: Sequence[ImagePrompt],
        settings: ImageSettings | Sequence[ImageSettings],
        seeds: Sequence[int],
        batch_size: int = 4,
    ) -> list[torch.Tensor]:
        """`iter_grids` collected: (rows, cols) code grids in the prompts' order."""
        grids: list[torch.Tensor | None] = [None] * len(prompts)
        for chunk, codes in self.iter_grids(prompts, settings, seeds, batch_size):
            for index, grid in zip(chunk, codes, strict=True):
                grids[index] = grid
        return grids  # type: ignore[return-value]

    def _prefixes(self, batch: Sequence[ImagePrompt], name: str, scale: float) -> list | None:
        """The prompts' uncond prefixes of one branch; passed even at scale 0 (editing keeps the public
        code's guidance formula when only one scale is set), refused when a set scale has no branch."""
        prefixes = [getattr(p, name) for p in batch]
        if any(p is None for p in prefixes):
            if scale > 0:
                flag = "--cfg-img" if name == "uncond_image" else "--cfg-scale"
                raise InputError(f"{flag} is set but this task has no such guidance branch: set it to 0")
            return None
        return [p.to(self.device) for p in prefixes]

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def iter_answers(
        self,
        prompts: Sequence[Ids],
        settings: TextSettings | Sequence[TextSettings],
        seeds: Sequence[int],
        batch_size: int = 4,
    ) -> Iterator[tuple[list[int], list[str]]]:
        """Sample understanding prompts, ``batch_size`` per forward after grouping by settings: per batch, the
        prompts' indices and their answers."""
        from dimoo_npu.sampling import sample_text

        every = [s.check() for s in _per_request(settings, len(prompts))]
        for chunk in plan_batches([dataclasses.astuple(s) for s in every], batch_size):
            batch = [prompts[i].to(self.device) for i in chunk]
            outputs = sample_text(
                self.model,
                batch,
                generator=[self._generator(seeds[i]) for i in chunk],
                progress=self.progress,
                **every[chunk[0]].sampler_kwargs(),
            )
            yield (
                chunk,
                [understand.decode_answer(self.encoder, ids, out) for ids, out in zip(batch, outputs, strict=True)],
            )

    # ---- decode ----

    def decode_images(self, grids: Sequence[torch.Tensor]) -> list[Image.Image]:
        """(rows, cols) code grids -> images through the VQ decoder."""
        return [self.image_tokenizer.decode_images(grid[None])[0] for grid in grids]

    def generate_images(
        self,
        prompts: Sequence[ImagePrompt],
        settings: ImageSettings | Sequence[ImageSettings],
        seeds: Sequence[int],
        batch_size: int = 4,
    ) -> list[Image.Image]:
        """`sample_grids`, decoded to images."""
        return self.decode_images(self.sample_grids(prompts, settings, seeds, batch_size))

    def answer(
        self,
        prompts: Sequence[Ids],
        settings: TextSettings | Sequence[TextSettings],
        seeds: Sequence[int],
        batch_size: int = 4,
    ) -> list[str]:
        """`iter_answers` collected, in the prompts' order."""
        answers: list[str] = [""] * len(prompts)
        for chunk, texts in self.iter_answers(prompts, settings, seeds, batch_size):
            for index, text in zip(chunk, texts, strict=True):
                answers[index] = text
        return answers

    # ---- one call per task ----

    def _defaults(self, kind: type[req.Request], settings, **given) -> req.Request:
        """A task method's unset sizes and settings from the one defaults table
        (`dimoo_npu.settings.requests.resolve`)."""
        names = {f.name for f in dataclasses.fields(kind)}
        chosen = {} if settings is None else {k: v for k, v in dataclasses.asdict(settings).items() if k in names}
        return req.resolve(kind(**chosen, **given), self.config.generation_defaults)

    def text_to_image(
        self,
        prompts: str | Sequence[str],
        *,
        width: int | None = None,
        height: int | None = None,
        settings: ImageSettings | None = None,
        seed: int = 0,
        batch_size: int = 4,
    ) -> list[Image.Image]:
        """Unset sizes and settings: the checkpoint's generation_defaults, else the public ones (1024 x 1024)."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        request = self._defaults(req.TextToImageRequest, settings, width=width, height=height)
        prepared = [text_to_image.prepare(self.encoder, text, request.width, request.height) for text in texts]
        return self.generate_images(prepared, request.image_settings(), _seeds(seed, len(texts)), batch_size)

    def edit(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str | None],
        edit_type: str = "edit",
        *,
        references: Sequence[Image.Image | None] | None = None,
        image_budget: int | None = DEFAULTS["edit"]["image_budget"],
        settings: ImageSettings | None = None,
        seed: int = 0,
        batch_size: int = 4,
    ) -> list[Image.Image]:
        """``image_budget`` None keeps the inputs' size (cropped to multiples of 16)."""
        references = references or [None] * len(images)
        prepared = [
            edit.prepare(self.encoder, image, text, edit_type, ref, image_budget)
            for image, text, ref in zip(images, prompts, references, strict=True)
        ]
        request = self._defaults(req.EditRequest, settings)
        return self.generate_images(prepared, request.image_settings(), _seeds(seed, len(prepared)), batch_size)

    def inpaint(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        *,
        masks: Sequence[Image.Image | None] | None = None,
        mask_h_ratio: float = DEFAULTS["inpaint"]["mask_h_ratio"],
        mask_w_ratio: float = DEFAULTS["inpaint"]["mask_w_ratio"],
        outside: bool = False,
        image_budget: int | None = None,
        settings: ImageSettings | None = None,
        seed: int = 0,
        batch_size: int = 4,
    ) -> list[Image.Image]:
        """Regenerate inside the centred box (outside it when ``outside``), or the white region of a mask."""
        masks = masks or [None] * len(images)
        box = (mask_h_ratio, mask_w_ratio)
        prepared = [
            paint.prepare(self.encoder, image, text, mask=mask, box=box, outside=outside, image_budget=image_budget)
            for image, text, mask in zip(images, prompts, masks, strict=True)
        ]
        request = self._defaults(req.OutpaintRequest if outside else req.InpaintRequest, settings)
        return self.generate_images(prepared, request.image_settings(), _seeds(seed, len(prepared)), batch_size)

    def outpaint(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        *,
        mask_h_ratio: float = DEFAULTS["outpaint"]["mask_h_ratio"],
        mask_w_ratio: float = DEFAULTS["outpaint"]["mask_w_ratio"],
        **kwargs,
    ) -> list[Image.Image]:
        """Outpainting: regenerate outside the centred box (or the white region of a user mask)."""
        return self.inpaint(
            images, prompts, mask_h_ratio=mask_h_ratio, mask_w_ratio=mask_w_ratio, outside=True, **kwargs
        )

    def understand(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        *,
        settings: TextSettings | None = None,
        image_budget: int | None = DEFAULTS["understand"]["image_budget"],
        seed: int = 0,
        batch_size: int = 4,
    ) -> list[str]:
        """``image_budget`` None keeps the image's size (cropped to multiples of 16)."""
        chosen = self._defaults(req.UnderstandRequest, settings).text_settings().check()
        prepared = [
            understand.prepare(self.encoder, image, question, chosen.gen_length, image_budget)
            for image, question in zip(images, questions, strict=True)
        ]
        return self.answer(prepared, chosen, _seeds(seed, len(prepared)), batch_size)


def _seeds(seed: int, count: int) -> list[int]:
    """Request i gets seed + i, so a request's output does not depend on how the requests are batched."""
    return [seed + index for index in range(count)]
