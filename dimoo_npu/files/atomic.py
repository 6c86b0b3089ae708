"""Atomic writes: a reader (or a crash) sees the old file or folder or the new one, never half of one.

The one way this package writes a file or a folder. Every write goes to a temporary name beside the
target, is flushed to disk (``fsync`` of the file, then of the folder that holds the new name), and
gets the mode a plain ``open``/``mkdir`` would give under the process's umask.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries (a rename or a new name in it), to disk."""
    fd = os.open(path, os.O_RDONLY)  # read-only is enough for fsync, and works on read-only files
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object], overwrite: bool = True) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, flush it to disk, then move it into place.

    ``overwrite=False`` moves it with a hard link, which never clobbers: a ``path`` that exists by then
    raises `FileExistsError` and the new file is dropped.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(handle, 0o666 & ~umask())  # mkstemp makes it private (0600)
        os.close(handle)
        write(tmp)
        fsync(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
        fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite)


def append_line_block(path: str | os.PathLike, text: str) -> Path:
    """Append whole lines to ``path`` in one ``write`` on an ``O_APPEND`` descriptor, flushed to disk.

    A crash can only leave a torn last line (no newline), which readers of such files drop
    (`dimoo_npu.batch.answer_files`); lines already there are never touched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def replace_directory(folder: str | os.PathLike, fill: Callable[[Path], object]) -> Path:
    """Call ``fill(staging)`` on a new folder beside ``folder``, flush it to disk, then swap it in.

    A failed ``fill`` leaves the old folder as it was. Linux cannot swap two folders in one rename, so
    ``folder`` is briefly absent between the two renames, but never half written.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        staging.chmod(0o777 & ~umask())  # mkdtemp makes it private; the folder gets the mode mkdir would give
        fill(staging)
        for root, _, files in os.walk(staging):
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    fsync(os.path.join(root, name))
            fsync(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    if folder.exists():
        os.replace(folder, retired)
    os.replace(staging, folder)
    fsync(folder.parent)
    shutil.rmtree(retired, ignore_errors=True)
    return folder
