"""Generated images and texts, written with `dimoo_npu.files.atomic` and never over an existing file unless asked;
PNGs carry the prompt, seed and settings in text chunks so an image says how it was made."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dimoo_npu.files.atomic import write_atomically
from dimoo_npu.utils.errors import InputError
from dimoo_npu.utils.validate import output_file


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output that exists (unless ``overwrite``) before any compute is spent on it."""
    path = output_file(path)
    if path.exists() and not overwrite:
        raise InputError(f"output {path} already exists: pass --overwrite to replace it, or choose another output")
    return path


def _save(path: str | os.PathLike, write: Callable[[Path], object], overwrite: bool) -> Path:
    """`write_atomically` after `check_writable`; without ``overwrite`` a file that appears meanwhile is kept."""
    path = check_writable(path, overwrite)
    try:
        return write_atomically(path, write, overwrite)
    except FileExistsError:
        raise InputError(f"output {path} appeared while writing: pass --overwrite to replace it") from None


def png_info(metadata: Mapping[str, Any]) -> PngInfo:
    """One text chunk per key; values that are not strings are stored as JSON."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    return info


def save_png(image: Image.Image, path: str | os.PathLike, metadata: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Write ``image`` as PNG with ``metadata`` in text chunks, atomically."""
    return _save(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=png_info(metadata)), overwrite)


def save_text(text: str, path: str | os.PathLike, overwrite: bool = False) -> Path:
    return _save(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")), overwrite)


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks of a PNG written by `save_png`."""
    with Image.open(path) as image:
        return dict(image.text)
