"""Number and path checks shared by every command, run before any model loads: each failure is an
`InputError` naming the value and what to pass instead, never a traceback after the work was spent."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dimoo_npu.errors import InputError

NAME_MAX = 255  # bytes in one file name on Linux file systems
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2^64)
DEVICE_PATTERN = re.compile(r"(auto|cpu|cuda|npu)(:\d+)?")
# Flags that count things: zero or a negative value would silently do nothing.
POSITIVE_FLAGS = ("batch_size", "chunk_size", "workers", "max_length", "answer_length")
# Flags where 0 means "all" or "keep": a negative value would be read as something else.
NOT_NEGATIVE_FLAGS = ("limit", "image_budget")


def check_finite(name: str, value: float) -> float:
    """``inf`` and ``nan`` pass every ``<`` and ``>`` test wrongly: refuse them by name."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{name}={value} is not a finite number: pass an ordinary number")
    return value


def check_positive(name: str, value: int) -> int:
    if value < 1:
        raise InputError(f"{name}={value} must be at least 1")
    return value


def check_seeds(seed: int, count: int = 1) -> int:
    """Request i uses ``seed + i``: every one of them must be a valid generator seed."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(f"seed {seed!r} is not an integer: pass a whole number such as 0")
    if not 0 <= seed <= SEED_LIMIT - count:
        raise InputError(
            f"seed {seed} is outside [0, 2^64 - {count}] for {count} request(s) (request i uses seed + i): "
            "pass a seed such as 0"
        )
    return seed


def check_image_dimension(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InputError(f"{name} {value} must be a positive number of pixels (a multiple of 16, e.g. 512)")
    return value


def check_device(name: str) -> str:
    if not DEVICE_PATTERN.fullmatch(str(name).strip().lower()):
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda, npu (optionally with an index, cuda:1)")
    return name


def check_text(name: str, value: str | None) -> str | None:
    """A prompt or question of whitespace only is as good as none."""
    if value is not None and not value.strip():
        raise InputError(f"the {name} is empty or whitespace only: write a {name}")
    return value


def check_args(args: Mapping[str, Any]) -> None:
    """What every command's flags must satisfy: finite floats, counts >= 1, a seed, a known device."""
    for name, value in args.items():
        if isinstance(value, float):
            check_finite(f"--{name.replace('_', '-')}", value)
    for name in POSITIVE_FLAGS:
        if isinstance(args.get(name), int):
            check_positive(f"--{name.replace('_', '-')}", args[name])
    for name in NOT_NEGATIVE_FLAGS:
        if isinstance(args.get(name), int) and args[name] < 0:
            raise InputError(f"--{name.replace('_', '-')}={args[name]} must not be negative (0 means all / keep)")
    if isinstance(args.get("seed"), int):
        check_seeds(args["seed"])
    if isinstance(args.get("device"), str):
        check_device(args["device"])


def resolved(path: str | os.PathLike, what: str) -> Path:
    """The absolute path with every symlink followed; a symlink loop is refused by name."""
    if "\0" in str(path):
        raise InputError(f"{what} {path!r} contains a NUL character: name a real path")
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        raise InputError(f"{what} {path} is a symlink loop: point it at a real file") from None


def input_file(path: str | os.PathLike, what: str) -> Path:
    """An existing regular file (a folder, a loop or a missing path each get their own message)."""
    file = resolved(path, what)
    if file.is_dir():
        raise InputError(f"{what} {path} is a folder: name a file")
    if file.exists() and not file.is_file():
        raise InputError(f"{what} {path} is not a regular file (a device, pipe or socket): name a file")
    if not file.is_file():
        raise InputError(f"{what} {path} does not exist: check the path")
    return Path(path)


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """A UTF-8 text file's contents (a byte-order mark, as some editors write, is dropped)."""
    input_file(path, what)
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None


def output_file(path: str | os.PathLike, what: str = "output", suffix: str | None = None) -> Path:
    """A file we may create: not a folder, every existing parent a folder, the expected suffix."""
    path = Path(path)
    if len(os.fsencode(path.name)) > NAME_MAX:
        raise InputError(f"{what} name {path.name[:40]}... is longer than {NAME_MAX} bytes: choose a shorter name")
    if suffix and path.suffix.lower() != suffix:
        raise InputError(f"{what} {path} does not end in {suffix}: outputs are {suffix[1:].upper()} files")
    if resolved(path, what).is_dir():
        raise InputError(f"{what} {path} is a folder: name a file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{what} {path} cannot be written: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):  # also false on a read-only mount, even for root
                raise InputError(
                    f"{what} {path} cannot be written: {parent} is read-only or not yours: choose another folder"
                )
            break
    return path
