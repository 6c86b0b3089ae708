"""Output files written atomically (temp file, then link or replace), never over an existing file unless
asked; PNGs carry the prompt, seed and settings in text chunks so an image says how it was made."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dimoo_npu.atomic import umask
from dimoo_npu.errors import InputError
from dimoo_npu.validate import output_file


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output that exists (unless ``overwrite``) before any compute is spent on it."""
    path = output_file(path)
    if path.exists() and not overwrite:
        raise InputError(f"output {path} already exists: pass --overwrite to replace it, or choose another output")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], overwrite: bool = False) -> Path:
    """Call ``write`` on a temp file beside ``path``, then move it in place: readers see the old file or
    the whole new one. Without ``overwrite`` the final step is a hard link, which never clobbers."""
    path = check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~umask())  # mkstemp makes it private (0600); outputs get the usual mode
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(temp_name, path)
        else:
            os.link(temp_name, path)
    except FileExistsError:
        raise InputError(f"output {path} appeared while writing: pass --overwrite to replace it") from None
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
    return path


def png_info(metadata: Mapping[str, Any]) -> PngInfo:
    """One text chunk per key; values that are not strings are stored as JSON."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    return info


def save_png(image: Image.Image, path: str | os.PathLike, metadata: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Write ``image`` as PNG with ``metadata`` in text chunks, atomically."""
    return atomic_write(path, lambda file: image.save(file, format="PNG", pnginfo=png_info(metadata)), overwrite)


def save_text(text: str, path: str | os.PathLike, overwrite: bool = False) -> Path:
    return atomic_write(path, lambda file: file.write(text.encode("utf-8")), overwrite)


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks of a PNG written by `save_png`."""
    with Image.open(path) as image:
        return dict(image.text)
