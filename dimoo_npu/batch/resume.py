"""Resuming a batch run (``--resume``): which outputs a killed or finished run already made with the same
settings (skipped), which it left unreadable (made again), and which it made differently (refused, naming the
field). Temporary files that a killed writer left beside an output are removed first. Torch-free.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from PIL import Image

from dimoo_npu.utils.errors import InputError

logger = logging.getLogger("dimoo")

IGNORED = ("software",)  # a newer package version does not make an output stale
FIRST = ("benchmark", "task", "checkpoint")  # what made the output, named before any setting
FIX = "resume with the same command and settings, write to another folder, or pass --overwrite to redo everything"


class State(Enum):
    TODO = "todo"  # no output yet
    DONE = "done"  # made with the same settings: skipped
    REDO = "redo"  # unreadable (a torn or damaged file): made again over it


def remove_temporaries(path: Path) -> int:
    """Delete the temporary files `dimoo_npu.files.atomic` writes beside ``path`` (left by a killed writer)."""
    count = 0
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.tmp-*"):
        tmp.unlink(missing_ok=True)
        count += 1
    if count:
        logger.info("removed %d leftover temporary file(s) of %s", count, path)
    return count


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def flatten(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """PNG text chunks (or the dict they came from) as one flat dict: ``settings`` (JSON) spread out."""
    flat = {k: (v if isinstance(v, str) else json.dumps(v, sort_keys=True)) for k, v in metadata.items()}
    settings = flat.pop("settings", None)
    if settings is not None:
        try:
            flat.update({k: json.dumps(v, sort_keys=True) for k, v in json.loads(settings).items()})
        except (ValueError, AttributeError):
            flat["settings"] = settings
    return {k: v for k, v in flat.items() if k not in IGNORED}


def first_difference(recorded: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """The first field whose value differs, as "field (made with X, asked for Y)"; None when all match."""
    old, new = flatten(recorded), flatten(expected)
    for key in sorted(set(old) | set(new), key=lambda k: (FIRST.index(k) if k in FIRST else len(FIRST), k)):
        if old.get(key) != new.get(key):
            return f"{key} (made with {old.get(key, 'nothing')}, this run asks for {new.get(key, 'nothing')})"
    return None


def png_state(path: str | os.PathLike, expected: Mapping[str, Any]) -> State:
    """Whether the PNG at ``path`` is missing, done with ``expected``'s metadata, or unreadable; InputError
    naming the field when it was made otherwise (another command, checkpoint or setting)."""
    path = Path(path)
    remove_temporaries(path)
    if not path.exists():
        return State.TODO
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel: a torn file fails here
            recorded = dict(image.text)
    except (OSError, SyntaxError, ValueError) as err:
        logger.warning("output %s is unreadable (%s): making it again", path, err)
        return State.REDO
    if "settings" not in recorded:
        raise InputError(f"cannot resume into {path}: it was not written by dimoo (no settings recorded); {FIX}")
    difference = first_difference(recorded, expected)
    if difference:
        raise InputError(f"cannot resume: {path} differs in {difference}; {FIX}")
    return State.DONE
