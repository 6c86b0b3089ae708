"""Prompt texts of every DiMOO task: the system texts the model was trained with and the edit types.

Wording and edit-type names follow the public Lumina-DiMOO prompt utilities (Apache-2.0), as facts.
One deliberate difference: the public code only gives dense prediction its system text for edit types
containing ``dense``, which none of its documented types (``canny_pred``...) do; here ``*_pred`` types
get the dense-prediction system text and their fixed instruction, as its description table intends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dimoo_npu.utils.errors import InputError

SYSTEM_TEXTS: dict[str, str] = {
    "understanding": (
        "You are a multimodal model that can process both text and images. Answer the following question "
        "based on the provided images. Analyze each image and combine relevant details to answer."
    ),
    "image_generation": "Generate an image according to the text prompt.",
    "image_editing": "Generate an image applying the following editing instruction based on the original image.",
    "dense_prediction": "Perform dense prediction on the given images.",
    "control_generation": "Generate an image according to the text prompt and the given control image.",
    "subject_generation": "Generate an image according to the text prompt and the given object image.",
    "multi_view": "Generate a view-image based on the given image.",
    "style_transfer": "Transform the current image into the style of the provided image.",
}

UNCONDITION_TEXT = "<uncondition>"

DENSE_MAPS = {"canny": "canny edge map", "hed": "hed edge map", "depth": "depth map", "openpose": "pose estimation map"}
CONTROLS = ("canny", "hed", "depth", "openpose")
EDIT_VARIANTS = ("edit", "edit_add", "edit_remove", "edit_replace", "edit_background", "edit_text_transfer")
STYLE_TRANSFER = "image_ref_transfer"

# Every accepted --edit-type except multi_view_<view>, which takes any view name.
EDIT_TYPES: tuple[str, ...] = (
    *EDIT_VARIANTS,
    *(f"{name}_control" for name in CONTROLS),
    *(f"{name}_pred" for name in DENSE_MAPS),
    "subject_driven",
    STYLE_TRANSFER,
)
_MULTI_VIEW = re.compile(r"^multi_view_([A-Za-z]+)$")


@dataclass(frozen=True)
class EditPrompt:
    """System text and user text of one image-to-image request."""

    system: str
    user: str
    needs_reference: bool = False  # style transfer takes a second (reference) image


def edit_prompt(edit_type: str, user_text: str | None) -> EditPrompt:
    """The system and user texts for ``edit_type``; fixed-instruction types ignore ``user_text``."""
    check_edit_type(edit_type)
    name = edit_type.removesuffix("_pred")
    if edit_type.endswith("_pred") and name in DENSE_MAPS:
        return EditPrompt(SYSTEM_TEXTS["dense_prediction"], f"Generate a {DENSE_MAPS[name]} according to the image.")
    if edit_type == STYLE_TRANSFER:
        return EditPrompt(SYSTEM_TEXTS["style_transfer"], SYSTEM_TEXTS["style_transfer"], needs_reference=True)
    view = _MULTI_VIEW.match(edit_type)
    if view:
        return EditPrompt(
            SYSTEM_TEXTS["multi_view"], f"Generate the {view.group(1)} view based on the provided front view."
        )
    system = _system_for_prompted_type(edit_type)
    if not user_text or not user_text.strip():
        raise InputError(f"edit type {edit_type} needs a text prompt: pass --prompt (or a 'prompt' in the batch file)")
    return EditPrompt(system, user_text)


def _system_for_prompted_type(edit_type: str) -> str:
    if edit_type in EDIT_VARIANTS:
        return SYSTEM_TEXTS["image_editing"]
    if edit_type.endswith("_control") and edit_type[:-8] in CONTROLS:
        return SYSTEM_TEXTS["control_generation"]
    return SYSTEM_TEXTS["subject_generation"]  # subject_driven, the last prompted type


def check_edit_type(edit_type: str) -> None:
    """Raise InputError for an edit type this package does not know (before any model is loaded)."""
    if edit_type in EDIT_TYPES or _MULTI_VIEW.match(edit_type):
        return
    if edit_type == "multi_view":
        raise InputError(
            "edit type multi_view needs the view to generate: use multi_view_<view>, e.g. multi_view_left, "
            "multi_view_right or multi_view_back"
        )
    raise InputError(f"unknown edit type {edit_type!r}: choose one of {', '.join(EDIT_TYPES)} or multi_view_<view>")


def chat_text(system: str, user: str) -> str:
    """The training template: ``<system>{system}</system><user>{user}</user>``."""
    return f"<system>{system}</system><user>{user}</user>"


def uncond_text(system: str) -> str:
    """The unconditional prompt of a task: the user text replaced by ``<uncondition>``."""
    return chat_text(system, UNCONDITION_TEXT)


def template_texts() -> list[str]:
    """Every system text and fixed instruction (the words a small test tokenizer must know)."""
    fixed = [edit_prompt(name, "x").user for name in EDIT_TYPES] + [edit_prompt("multi_view_left", None).user]
    return [*SYSTEM_TEXTS.values(), *fixed]
