"""Number and path checks shared by every command, run before any model loads: each failure is an
`InputError` naming the value and what to pass instead, never a traceback after the work was spent."""

from __future__ import annotations

import math
import os
import re
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dimoo_npu.utils.errors import DimooError, InputError

NAME_MAX = 255  # bytes in one file name on Linux file systems
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2^64)
DEVICE_PATTERN = re.compile(r"(auto|cpu|cuda|npu)(:\d+)?")
# The longest sequence any cap may allow: 256 x the public checkpoint's 4096 (its attention scores alone would
# need TBs); beyond it a number is a typo, and loops that grow with the cap (largest_square) stay short.
MAX_LENGTH_LIMIT = 1 << 20
PIXELS_PER_CELL = 16  # one image token per 16 x 16 pixels
# Every counted flag of every command that is not a request field (those are bounded by the length cap in
# `dimoo_npu.settings.requests.check`): (smallest, largest). 0 means "all" / "keep" where the smallest is 0.
FLAG_BOUNDS: dict[str, tuple[int, int]] = {
    "batch_size": (1, 1024),  # requests per forward
    "chunk_size": (1, 1_000_000),  # records per shard
    "workers": (1, 256),  # processes
    "max_length": (1, MAX_LENGTH_LIMIT),
    "answer_length": (1, MAX_LENGTH_LIMIT),  # pretokenize
    "batch": (1, 1024),  # plan sample: images per forward
    "prompt_tokens": (0, MAX_LENGTH_LIMIT),
    "length": (1, MAX_LENGTH_LIMIT),  # dimoo check: tokens per row
    "layers": (0, 4096),
    "limit": (0, 2**31 - 1),  # items per evaluated task
    "image_budget": (0, PIXELS_PER_CELL * 1024),  # 16 x sqrt(MAX_LENGTH_LIMIT): one image filling the longest cap
    "threads": (1, 4096),
}
# Guidance scales and temperatures: >= 0 (0 switches off / samples greedily); past SCALE_LIMIT logits overflow.
SCALE_LIMIT = 1e4
SHOWN_CHARS = 60  # an error message shows at most this much of a value the user gave


class _BoundedRepr(reprlib.Repr):
    """reprlib with small limits everywhere; integers too long for str() are described by their size."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, SHOWN_CHARS, SHOWN_CHARS, SHOWN_CHARS
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = self.maxdeque = 4

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:
            return f"<a {x.bit_length()}-bit integer>"
        return super().repr_int(x, level)


_SHOWN = _BoundedRepr()


def shown(value: Any) -> str:
    """A bounded prefix of ``repr(value)``: error messages never format a value of unbounded size (a 10^5-digit
    number, a YAML alias bomb, a megabyte prompt)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    text = _SHOWN.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def check_int(name: str, value: Any, low: int, high: int, hint: str = "", error: type[DimooError] = InputError) -> int:
    """An integer (never a bool, a string or a float) in [low, high]; the message names the end it is past.
    ``error``: the class raised (a run config's keys raise ConfigError)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{name} is {shown(value)}, not a whole number: pass an integer in [{low}, {high}]{hint}")
    if value < low:
        least = "must not be negative" if low == 0 else f"must be at least {low}"
        raise error(f"{name}={shown(value)} {least}{hint}")
    if value > high:
        raise error(f"{name}={shown(value)} is over the maximum of {high}{hint}")
    return value


def parse_int(name: str, text: str, low: int, high: int) -> int:
    """A whole number written in text (an environment variable), bounded; only digits, at most 19 of them."""
    raw = text.strip()
    if not re.fullmatch(r"[0-9]{1,19}", raw):
        raise InputError(f"{name}={shown(raw)} is not a whole number: pass an integer in [{low}, {high}]")
    return check_int(name, int(raw), low, high)


def check_number(name: str, value: Any, low: float, high: float) -> float:
    """A finite int or float (never a bool or a string) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{name} is {shown(value)}, not a number: pass a number in [{low:g}, {high:g}]")
    check_finite(name, value)
    if value < low:
        least = "must not be negative" if low == 0 else f"must be at least {low:g}"
        raise InputError(f"{name}={shown(value)} {least}")
    if value > high:
        raise InputError(f"{name}={shown(value)} is over the maximum of {high:g}")
    return value


def check_finite(name: str, value: float) -> float:
    """``inf`` and ``nan`` pass every ``<`` and ``>`` test wrongly: refuse them by name."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{name}={value} is not a finite number: pass an ordinary number")
    return value


def check_seeds(seed: int, count: int = 1) -> int:
    """Request i uses ``seed + i``: every one of them must be a valid generator seed."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(f"seed {seed!r} is not an integer: pass a whole number such as 0")
    if not 0 <= seed <= SEED_LIMIT - count:
        raise InputError(
            f"seed {shown(seed)} is outside [0, 2^64 - {count}] for {count} request(s) (request i uses seed + i): "
            "pass a seed such as 0"
        )
    return seed


def check_image_dimension(name: str, value: int, high: int = PIXELS_PER_CELL * MAX_LENGTH_LIMIT) -> int:
    """A side in pixels: a positive integer, at most one row of cells under the longest cap."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"{name} {shown(value)} must be a positive number of pixels (a multiple of 16, e.g. 512)")
    return check_int(name, value, 1, high, " pixels")


def check_device(name: str) -> str:
    if not DEVICE_PATTERN.fullmatch(str(name).strip().lower()):
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda, npu (optionally with an index, cuda:1)")
    return name


def check_text(name: str, value: str | None) -> str | None:
    """A prompt or question of whitespace only is as good as none; one that is not Unicode text (a lone
    surrogate such as JSON's "\\ud800", or undecodable bytes of a command line) cannot be tokenized."""
    if value is not None and not value.strip():
        raise InputError(f"the {name} is empty or whitespace only: write a {name}")
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InputError(
                f"the {name} has a lone surrogate (U+{ord(value[err.start]):04X}) at character {err.start}, "
                "which is not text: send valid UTF-8"
            ) from None
    return value


def check_args(args: Mapping[str, Any]) -> None:
    """What every command's flags must satisfy, before any work: finite floats, every count within its
    `FLAG_BOUNDS`, a seed, a known device, a --json file that can be written."""
    for name, value in args.items():
        if isinstance(value, float):
            check_finite(f"--{name.replace('_', '-')}", value)
    for name, (low, high) in FLAG_BOUNDS.items():
        if isinstance(args.get(name), int):
            check_int(f"--{name.replace('_', '-')}", args[name], low, high)
    if isinstance(args.get("seed"), int):
        check_seeds(args["seed"])
    if isinstance(args.get("device"), str):
        check_device(args["device"])
    if isinstance(args.get("json"), str):
        output_file(args["json"], "--json")


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
