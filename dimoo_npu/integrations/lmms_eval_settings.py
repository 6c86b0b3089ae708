"""How an lmms-eval request becomes a DiMOO understanding call: the model_args, the generation-kwargs mapping,
the request types refused, and the entry point that registers the model as ``dimoo``.

Nothing here imports lmms-eval at module level, so the default suite checks the mapping without it. The mapping
(README "lmms-eval"), model_args first, then the task's ``generation_kwargs``, then the checkpoint's defaults:

- answer length (``gen_length``): ``gen_length=`` in model_args, else the task's ``max_new_tokens``, else the
  checkpoint's ``generation_defaults`` (the public scripts': 1024);
- block length: ``block_length=``, else the checkpoint's block when it divides the answer, else the whole answer;
- steps: ``steps=``, else as many answer tokens per step as the checkpoint's defaults reveal (public: 1024 tokens in
  128 steps, so a 16-token answer takes 2), rounded up to whole steps per block;
- temperature: ``temperature=``, else the task's ``temperature`` (0 when ``do_sample`` is false), else the
  checkpoint's; ``until``: the answer is cut before the first stop string;
- everything else the task may set (``top_p``, ``num_beams``, ``image_aspect_ratio``, ...) has no counterpart in
  the masked-diffusion sampler and is ignored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from dimoo_npu.settings.generation_settings import TextSettings
from dimoo_npu.settings.requests import UnderstandRequest, resolve
from dimoo_npu.utils.errors import InputError

MODEL_NAME = "dimoo"
MODEL_CLASS = "dimoo_npu.integrations.lmms_eval_model.DiMOOLmms"
# ``image_budget=vlmevalkit``: the public VLMEvalKit wrapper's rule (Lumina-DiMOO's VLMEvalKit/vlmeval/vlm/
# lumina_dimmo/model.py): a picture under 512 x 512 pixels is cropped to the 512-pixel bucket list, one over
# 1024 x 1024 to the 1024-pixel list, anything between keeps its size (cropped to multiples of 16).
VLMEVALKIT_BUDGET = "vlmevalkit"
MULTI_IMAGE = ("refuse", "first")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """lmms-eval's ``--model_args`` plus what its own ``--batch_size``, ``--max_batch_size`` and ``--device`` add
    (give those as lmms-eval's flags, not in model_args). Unset sampling fields follow the
    request's generation kwargs, then the checkpoint's defaults (see the module docstring)."""

    pretrained: str | None = None  # a checkpoint folder or cached repo id; None: the bundled shapes model
    device: str | None = None  # None: auto (npu, then cuda, then cpu)
    batch_size: int = 4
    max_batch_size: int | None = None  # lmms-eval passes it; batches are ``batch_size`` exactly
    gen_length: int | None = None
    block_length: int | None = None
    steps: int | None = None
    temperature: float | None = None
    cfg_scale: float | None = None
    kv_cache: str | None = None
    parallel_threshold: float | None = None
    fast: bool | None = None
    image_budget: int | str | None = None  # pixels, "none" (keep the size) or "vlmevalkit"; None: the checkpoint's
    multi_image: str = "refuse"  # a request with several pictures: refuse it, or answer on the first
    seed: int = 0
    max_length: int | None = None


_TYPES: dict[str, tuple[type, ...]] = {
    "pretrained": (str,),
    "device": (str,),
    "batch_size": (int,),
    "max_batch_size": (int,),
    "gen_length": (int,),
    "block_length": (int,),
    "steps": (int,),
    "temperature": (int, float),
    "cfg_scale": (int, float),
    "kv_cache": (str,),
    "parallel_threshold": (int, float),
    "fast": (bool,),
    "image_budget": (int, str),
    "multi_image": (str,),
    "seed": (int,),
    "max_length": (int,),
}


def parse_model_args(values: Mapping[str, Any]) -> ModelOptions:
    """``--model_args`` as lmms-eval parsed them (numbers and true/false already typed); InputError names a key
    that is unknown or of the wrong type."""
    unknown = sorted(set(values) - set(_TYPES))
    if unknown:
        raise InputError(
            f'unknown dimoo model_args {", ".join(unknown)}: use {", ".join(sorted(_TYPES))} (README "lmms-eval")'
        )
    given = {name: value for name, value in values.items() if value is not None}
    batch = given.get("batch_size")
    if isinstance(batch, str) and batch.isdigit():
        given["batch_size"] = int(batch)  # lmms-eval's --batch_size N arrives as text
    elif isinstance(batch, str) and batch.startswith("auto"):
        given.pop("batch_size")  # --batch_size auto[:N]: ours is a fixed count, the default
    for name, value in given.items():
        types = _TYPES[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join(t.__name__ for t in types)
            raise InputError(f"dimoo model_args {name}={value!r} must be {wanted}")
    budget = given.get("image_budget")
    if isinstance(budget, str) and budget not in ("none", VLMEVALKIT_BUDGET):
        raise InputError(f"image_budget={budget!r}: use a pixel count, none (keep the size) or {VLMEVALKIT_BUDGET}")
    if given.get("multi_image", "refuse") not in MULTI_IMAGE:
        raise InputError(f"multi_image={given['multi_image']!r}: use one of {', '.join(MULTI_IMAGE)}")
    if given.get("batch_size", 1) < 1:
        raise InputError(f"batch_size={given['batch_size']} must be at least 1")
    return ModelOptions(**given)


def request_settings(
    gen_kwargs: Mapping[str, Any], options: ModelOptions, checkpoint_defaults: Mapping[str, Any]
) -> tuple[TextSettings, tuple[str, ...]]:
    """The sampler settings and stop strings of one generate_until request (mapping: module docstring)."""
    own = {name: getattr(options, name) for name in ("cfg_scale", "kv_cache", "parallel_threshold", "fast")}
    base = resolve(UnderstandRequest(**own), checkpoint_defaults)
    gen_length = options.gen_length or gen_kwargs.get("max_new_tokens") or base.gen_length
    block_length = options.block_length or (base.block_length if gen_length % base.block_length == 0 else gen_length)
    blocks = max(gen_length // block_length, 1)
    steps = options.steps or blocks * math.ceil(block_length * base.steps / base.gen_length)
    if options.temperature is not None:
        temperature = options.temperature
    elif gen_kwargs.get("do_sample") is False:
        temperature = 0.0
    else:
        temperature = gen_kwargs.get("temperature", base.temperature)
    settings = TextSettings(
        gen_length=int(gen_length),
        block_length=int(block_length),
        steps=int(steps),
        temperature=float(temperature),
        cfg_scale=float(base.cfg_scale),
        kv_cache=base.kv_cache,
        parallel_threshold=base.parallel_threshold,
    )
    return settings.check(), stop_strings(gen_kwargs.get("until"))


def stop_strings(until: str | Sequence[str] | None) -> tuple[str, ...]:
    """lmms-eval's ``until``: one string, a list of them, or nothing."""
    if until is None:
        return ()
    return (until,) if isinstance(until, str) else tuple(until)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The answer before the first occurrence of any stop string."""
    ends = [text.find(stop) for stop in until if stop and stop in text]
    return text[: min(ends)] if ends else text


def image_budget_for(size: tuple[int, int], option: int | str | None, checkpoint_budget: int | None) -> int | None:
    """The crop budget of one picture (None keeps its size): the option, else the checkpoint's."""
    if option is None:
        return checkpoint_budget
    if option == "none":
        return None
    if option == VLMEVALKIT_BUDGET:
        area = size[0] * size[1]
        return 512 if area < 512 * 512 else 1024 if area > 1024 * 1024 else None
    return int(option)


def single_image(visuals: Any, where: str, multi_image: str):
    """The one picture of a request (lmms-eval's doc_to_visual gives a list); refuses none, and several unless
    ``multi_image=first``."""
    pictures = [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]
    if not pictures:
        raise InputError(f"{where} has no image: the dimoo model answers questions about one picture")
    if len(pictures) > 1 and multi_image != "first":
        raise InputError(
            f"{where} has {len(pictures)} images: the dimoo model answers on one picture; pass "
            "--model_args multi_image=first to answer on the first (not the paper's setting)"
        )
    picture = pictures[0]
    if not hasattr(picture, "convert"):
        raise InputError(
            f"{where}: a {type(picture).__name__} visual is not a picture (video and audio are not served)"
        )
    return picture.convert("RGB")


def unsupported(request_type: str) -> InputError:
    """The error for an lmms-eval request type the plugin does not serve."""
    why = {
        "loglikelihood": "a masked-diffusion model has no left-to-right likelihood of a continuation",
        "generate_until_multi_round": "multi-round dialogue is not implemented",
    }.get(request_type, "it is not implemented")
    return InputError(
        f"the dimoo lmms-eval model cannot serve {request_type} requests ({why}): run tasks whose output_type is "
        "generate_until"
    )


def manifest():
    """The ``lmms_eval.models`` entry point (pyproject.toml): registers ``--model dimoo``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS)
