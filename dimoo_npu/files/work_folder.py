"""Work folders a tool may clear: only the ones it made, recognised by a marker file it wrote on creation.

`claim` is called once every argument has been checked: it refuses a path that is a file, and a folder that
already holds something but no marker (a checkout, a home folder, another tool's output), naming it and leaving
it untouched; ``fresh`` then empties only a folder that carries the marker.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from dimoo_npu.utils.errors import InputError
from dimoo_npu.utils.validate import resolved

logger = logging.getLogger(__name__)


def claim(path: str | os.PathLike, marker: str, fresh: bool = False, what: str = "work folder") -> Path:
    """``path`` as a work folder of the tool that writes ``marker``: created (with the marker) when absent or
    empty, reused when marked, emptied first when ``fresh`` and marked; anything else is an InputError."""
    folder = Path(path)
    real = resolved(folder, what)
    if real.exists() and not real.is_dir():
        raise InputError(f"{what} {folder} is a file: name a folder (it is created when absent)")
    mine = (real / marker).is_file()
    if real.is_dir() and not mine and any(real.iterdir()):
        raise InputError(
            f"{what} {folder} holds files this tool did not make (no {marker} in it): it is left untouched; "
            "choose a new or empty folder"
        )
    if fresh and mine:
        logger.info("--fresh: deleting the work folder %s (made by this tool: %s)", folder, marker)
        shutil.rmtree(real)
    real.mkdir(parents=True, exist_ok=True)
    (real / marker).write_text("made by this tool; --fresh may delete this folder\n")
    return folder
