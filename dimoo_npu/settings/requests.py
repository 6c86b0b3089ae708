"""One request type per generation task: the single description of what a user may ask for.

The CLI flags of ``dimoo t2i | edit | inpaint | outpaint | understand``, the fields of a batch-file line and the
server's API schema are all derived from these dataclasses (their fields, annotations and ``help`` metadata).
A field the user did not give is ``None``; `resolve` fills it in layers: the public inference scripts' values
(`dimoo_npu.settings.generation_settings.DEFAULTS`, the one table), then the checkpoint's ``generation_defaults``, then
the user's.
`check` refuses a bad value with an `InputError` before any model loads. Torch-free, so help and schemas are fast.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from dimoo_npu.files.hub_cache import resolve_checkpoint
from dimoo_npu.settings.generation_settings import (
    DEFAULTS,
    FAST_UNDERSTANDING,
    KV_CACHE_MODES,
    ImageSettings,
    TextSettings,
)
from dimoo_npu.tokens.prompts import EDIT_TYPES, check_edit_type
from dimoo_npu.utils.errors import InputError
from dimoo_npu.utils.validate import (
    MAX_LENGTH_LIMIT,
    PIXELS_PER_CELL,
    check_finite,
    check_image_dimension,
    check_int,
    check_seeds,
    check_text,
    shown,
)

IMAGE_FRAME = 4  # BOA BOI ... EOI EOA around a generated image's rows
BUDGET_PATCH = 32  # image budgets are multiples of 32 pixels (the bucket lists' patch)
BUDGET_HELP = "crop input images to the closest aspect bucket of about N x N pixels (0: keep the size, cropped to 16s)"


def _field(help: str, required: bool = False) -> Any:
    """A request field: None until given or resolved; ``help`` feeds the CLI and the API schema."""
    return field(default=None, metadata={"help": help, "required": required})


@dataclass(frozen=True, kw_only=True)
class Request:
    """What every task shares: a seed (request i of a batch defaults to the base seed + i)."""

    task: ClassVar[str]
    seed: int | None = _field("random seed (default: --seed + the request's index)")


@dataclass(frozen=True, kw_only=True)
class ImageRequest(Request):
    """A task that samples an image: a prompt, an output PNG and the image sampler's settings."""

    prompt: str | None = _field("text prompt")
    output: str | None = _field("output PNG (default: <task>_<index>_seed<seed>.png under --output-dir)")
    timesteps: int | None = _field("sampling steps")
    temperature: float | None = _field("sampling temperature (0 = greedy)")
    cfg_scale: float | None = _field("text guidance scale (0 = off)")
    use_cache: bool | None = _field("ML-Cache: reuse confident positions between steps")
    cache_ratio: float | None = _field("ML-Cache: share of positions reused on cached steps, in [0, 1]")
    warmup_ratio: float | None = _field("ML-Cache: share of first steps always computed in full, in [0, 1]")
    refresh_interval: int | None = _field("ML-Cache: full refresh every N steps after warm-up")

    def image_settings(self) -> ImageSettings:
        """The sampler's settings of a resolved request (tasks without an image guidance branch: cfg_img 0)."""
        names = [f.name for f in dataclasses.fields(ImageSettings) if f.name != "cfg_img"]
        return ImageSettings(**{name: getattr(self, name) for name in names}, cfg_img=getattr(self, "cfg_img", 0.0))


@dataclass(frozen=True, kw_only=True)
class TextToImageRequest(ImageRequest):
    task: ClassVar[str] = "t2i"
    prompt: str | None = _field("text prompt", required=True)
    width: int | None = _field("image width, a multiple of 16 pixels")
    height: int | None = _field("image height, a multiple of 16 pixels; width x height / 256 tokens must fit")


@dataclass(frozen=True, kw_only=True)
class EditRequest(ImageRequest):
    task: ClassVar[str] = "edit"
    image: str | None = _field("input image", required=True)
    ref_image: str | None = _field("style reference image (edit type image_ref_transfer)")
    edit_type: str | None = _field(f"{', '.join(EDIT_TYPES)} or multi_view_<view>")
    cfg_img: float | None = _field("image guidance scale (0 = off)")
    image_budget: int | None = _field(BUDGET_HELP)


@dataclass(frozen=True, kw_only=True)
class InpaintRequest(ImageRequest):
    task: ClassVar[str] = "inpaint"
    prompt: str | None = _field("text prompt", required=True)
    image: str | None = _field("input image", required=True)
    mask: str | None = _field("mask image of the input's size: white = regenerate (replaces the box)")
    mask_h_ratio: float | None = _field("centred box height / image height, in (0, 1]")
    mask_w_ratio: float | None = _field("centred box width / image width, in (0, 1]")
    image_budget: int | None = _field(BUDGET_HELP)


@dataclass(frozen=True, kw_only=True)
class OutpaintRequest(InpaintRequest):
    """Inpainting's fields; the region outside the box (or the mask's white region) is regenerated."""

    task: ClassVar[str] = "outpaint"


@dataclass(frozen=True, kw_only=True)
class UnderstandRequest(Request):
    task: ClassVar[str] = "understand"
    question: str | None = _field("question about the image", required=True)
    image: str | None = _field("input image", required=True)
    image_budget: int | None = _field(BUDGET_HELP)
    gen_length: int | None = _field("answer tokens (stops early at EOS)")
    block_length: int | None = _field("answer block length (divides gen_length)")
    steps: int | None = _field("sampling steps over the whole answer (a multiple of gen_length / block_length)")
    temperature: float | None = _field("sampling temperature (0 = greedy)")
    cfg_scale: float | None = _field("guidance scale (0 = off)")
    kv_cache: str | None = _field(
        f"K/V cache, one of {', '.join(KV_CACHE_MODES)}: none is exact, prefix reuses the prompt's K/V within a "
        "block, dual also the later blocks'"
    )
    parallel_threshold: float | None = _field(
        "each step also reveals every masked position at least this confident, in (0, 1] (unset: exact)"
    )
    fast: bool | None = _field(
        "the recommended fast pair: "
        + ", ".join(f"{k} {v}" for k, v in FAST_UNDERSTANDING.items())
        + " (explicit settings win)"
    )

    def text_settings(self) -> TextSettings:
        names = [f.name for f in dataclasses.fields(TextSettings)]
        return TextSettings(**{name: getattr(self, name) for name in names})


# The understanding fields that trade exactness for speed: the flags `dimoo eval shapes` and `dimoo serve` share.
UNDERSTAND_SPEED_FIELDS = ("kv_cache", "parallel_threshold", "fast")

TASKS: dict[str, type[Request]] = {
    cls.task: cls for cls in (TextToImageRequest, EditRequest, InpaintRequest, OutpaintRequest, UnderstandRequest)
}


@functools.cache
def field_type(cls: type[Request], name: str) -> type:
    """The value type of a field (``int | None`` -> ``int``): what the CLI parses and a batch line must hold."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (Union, types.UnionType):
        (hint,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def resolve(request: Request, checkpoint_defaults: Mapping[str, Any] | None = None) -> Request:
    """Every field the user left out, from the checkpoint's ``generation_defaults``, else `DEFAULTS`.

    Optional inputs (ref_image, mask, output) and the seed stay None when not given. ``fast`` (the request's, else
    the checkpoint's) lays `FAST_UNDERSTANDING` over both layers, under the user's own values.
    """
    layers = {**DEFAULTS[request.task], **(checkpoint_defaults or {})}
    fast = getattr(request, "fast", None)
    if fast if fast is not None else layers.get("fast"):
        layers.update(FAST_UNDERSTANDING)
    names = {f.name for f in dataclasses.fields(request)}
    filled = {name: layers[name] for name in names & set(layers) if name != "seed" and getattr(request, name) is None}
    return dataclasses.replace(request, **filled)


def from_mapping(task: str, values: Mapping[str, Any], where: str) -> Request:
    """A request from JSON-like values (a batch-file line, flags, an API body), each typed by its annotation."""
    cls = TASKS[task]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(
            f"{where} has unknown field(s) {', '.join(unknown)} for {task}: use {', '.join(sorted(known))}"
        )
    for name, value in values.items():
        if value is not None:
            check_type(cls, name, value, where)
    return cls(**values)


def check_type(cls: type[Request], name: str, value: Any, where: str) -> None:
    """JSON numbers where numbers are meant (integers for counts), booleans for switches, strings otherwise."""
    kind = field_type(cls, name)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        expected = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]
        raise InputError(f"{where}: {name} must be {expected}, not {value!r}")
    if kind is float:
        check_finite(f"{where}: {name}", value)


def check_image_size(width: int, height: int, where: str = "the request") -> None:
    """Generated sides must be positive multiples of 16 pixels (one image token per 16 x 16)."""
    for name, value in (("width", width), ("height", height)):
        check_image_dimension(f"{name} of {where}", value)
        if value % PIXELS_PER_CELL:
            lower = max(PIXELS_PER_CELL, value // PIXELS_PER_CELL * PIXELS_PER_CELL)
            upper = lower + PIXELS_PER_CELL if value > lower else lower
            nearest = f"{lower} or {upper}" if upper != lower else f"{lower}"
            raise InputError(f"{name} {value} is not a multiple of 16 pixels: use {nearest}")


# ---- the budget of a request: every size-like field bounded by the length cap, before any image is touched ----


def image_tokens(rows: int, cols: int) -> int:
    """Tokens of a ``rows`` x ``cols`` grid in a sequence: each row ends with an end-of-line."""
    return rows * (cols + 1)


def square_cells(tokens: int) -> int:
    """Cells on a side of the largest square grid whose rows fit in ``tokens`` (c with c * (c + 1) <= tokens), in
    O(1) for any number."""
    return (math.isqrt(4 * tokens + 1) - 1) // 2 if tokens >= 2 else 0


def budget_tokens(budget: int) -> int:
    """Image tokens an input image costs at ``budget``: its bucket is about budget x budget pixels."""
    side = budget // PIXELS_PER_CELL
    return image_tokens(side, side)


def field_maxima(cap: int) -> dict[str, int]:
    """The largest value of each size-like request field under a length cap of ``cap`` tokens (the README's
    table): a side of one row of cells, an image budget whose picture alone fills the cap, and step counts and
    answer lengths of at most one per position."""
    budget = square_cells(cap - IMAGE_FRAME) * PIXELS_PER_CELL // BUDGET_PATCH * BUDGET_PATCH
    side = PIXELS_PER_CELL * max(1, cap - IMAGE_FRAME - 1)
    return {
        "width": side,
        "height": side,
        "image_budget": budget,
        "timesteps": cap,
        "steps": cap,
        "refresh_interval": cap,
        "gen_length": cap,
        "block_length": cap,
    }


def least_tokens(request: Request) -> int:
    """A lower bound on the longest sequence of a resolved request, from its fields alone: what the cap is
    checked against before an image is opened (the exact length is checked again once the prompt is encoded)."""
    budget = getattr(request, "image_budget", None) or 0
    picture = budget_tokens(budget)
    if isinstance(request, TextToImageRequest):
        return image_tokens(request.height // PIXELS_PER_CELL, request.width // PIXELS_PER_CELL) + IMAGE_FRAME
    if isinstance(request, EditRequest):
        return (2 + bool(request.ref_image)) * picture + IMAGE_FRAME  # the sources and an output of their size
    if isinstance(request, UnderstandRequest):
        return picture + request.gen_length + 2  # BOA answer EOA
    return picture + IMAGE_FRAME


def check_budget(request: Request, cap: int, where: str = "the request") -> Request:
    """Every size-like field within `field_maxima` of ``cap`` and the request's `least_tokens` within ``cap``:
    refused by the field's name before any image is decoded, resized or encoded. Lower bounds and divisibility
    are the sampler settings' checks (`dimoo_npu.settings.generation_settings`), with their own hints."""
    cap = check_int("the length cap", cap, 1, MAX_LENGTH_LIMIT)
    fix = f" for the length cap of {cap} tokens (raise it with --max-length or DIMOO_MAX_LENGTH)"
    for name, high in field_maxima(cap).items():
        value = getattr(request, name, None)
        if isinstance(value, int) and value > high:
            raise InputError(f"{name} of {where}={shown(value)} is over the maximum of {high}{fix}")
    need = least_tokens(request)
    if need > cap:
        what = where
        if isinstance(request, TextToImageRequest):
            side = square_cells(cap - IMAGE_FRAME) * PIXELS_PER_CELL
            square = f"the largest square under this cap is {side}x{side}"
            what = f"a {request.width}x{request.height} image of {where} ({square})"
        raise InputError(
            f"{what} needs at least {need} tokens, more than the length cap of {cap}: use a smaller image, "
            f"image_budget or answer length, or raise the cap with --max-length {need} (or DIMOO_MAX_LENGTH={need})"
        )
    return request


def check(request: Request, where: str = "the request", cap: int | None = None, count: int = 1) -> Request:
    """Every check that needs no model, tokenizer or file: a resolved request passes or an InputError names the fix.

    ``cap`` (the length cap in tokens) bounds every size-like field (`check_budget`); ``count`` images are sampled
    from seeds ``seed .. seed + count - 1``, each a valid seed.
    """
    for f in dataclasses.fields(request):
        value = getattr(request, f.name)
        if f.metadata["required"] and value in (None, ""):
            flag = "--" + f.name.replace("_", "-")
            raise InputError(f"{where} has no {f.name}: pass {flag} (or set it in every line of the batch file)")
        if isinstance(value, float):
            check_finite(f"{where}: {f.name}", value)
    for name in ("prompt", "question"):
        check_text(f"{name} of {where}", getattr(request, name, None))
    if isinstance(request, TextToImageRequest):
        check_image_size(request.width, request.height, where)
    if isinstance(request, EditRequest):
        check_edit_type(request.edit_type)
    budget = getattr(request, "image_budget", None)
    if budget is not None and (budget < 0 or budget % BUDGET_PATCH):
        raise InputError(
            f"image budget {shown(budget)} of {where} must be a multiple of 32 (e.g. 512; 0 keeps the size)"
        )
    if request.seed is not None:
        check_seeds(request.seed, count)
    if cap is not None:
        check_budget(request, cap, where)
    if isinstance(request, ImageRequest):
        request.image_settings().check()
    if isinstance(request, UnderstandRequest):
        request.text_settings().check()
    return request


def trained_length(checkpoint: str | os.PathLike) -> int:
    """The checkpoint's max_sequence_length (config.json; 4096 when it names none): what the length cap derives
    from (`dimoo_npu.tokens.lengths.length_cap`) before any model or tokenizer loads."""
    path = resolve_checkpoint(checkpoint) / "config.json"
    try:
        value = json.loads(path.read_text()).get("max_sequence_length", 4096)
    except (OSError, json.JSONDecodeError, AttributeError):
        return 4096  # load_model reports an unreadable config with the fix
    return check_int(f"max_sequence_length of {path}", value, 1, MAX_LENGTH_LIMIT)


def generation_defaults(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's layer of the defaults (config.json ``generation_defaults``); empty when it names none.

    A small model cannot take the public defaults (1024 x 1024 images, 1024-token answers), so it says its own.
    """
    path = resolve_checkpoint(checkpoint) / "config.json"
    try:
        return dict(json.loads(path.read_text()).get("generation_defaults") or {})
    except (OSError, json.JSONDecodeError):
        return {}  # load_model reports an unreadable config with the fix
