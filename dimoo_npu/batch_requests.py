"""Generation requests from command-line flags or a JSONL batch file, and each process's share of them.

A batch file has one JSON object per line with the task's fields (see ``TASK_FIELDS``); fields missing
from a line take the command-line value. Relative image paths are read from the batch file's folder.
Under torchrun, process RANK of WORLD_SIZE takes requests RANK, RANK + WORLD_SIZE, ...: together the
processes cover every request exactly once, with no process group needed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dimoo_npu.errors import InputError
from dimoo_npu.validate import (
    check_finite,
    check_image_dimension,
    check_seeds,
    check_text,
    output_file,
    read_text_file,
    resolved,
)

# Per task: fields a request may carry, and those it must have.
TASK_FIELDS: dict[str, tuple[set[str], set[str]]] = {
    "t2i": ({"prompt", "seed", "width", "height", "output"}, {"prompt"}),
    "edit": ({"prompt", "image", "ref_image", "edit_type", "seed", "output"}, {"image"}),
    "inpaint": ({"prompt", "image", "mask", "mask_h_ratio", "mask_w_ratio", "seed", "output"}, {"prompt", "image"}),
    "outpaint": ({"prompt", "image", "mask", "mask_h_ratio", "mask_w_ratio", "seed", "output"}, {"prompt", "image"}),
    "understand": ({"question", "image", "seed"}, {"question", "image"}),
}
PATH_FIELDS = ("image", "ref_image", "mask")
NUMBER_FIELDS = {"width": int, "height": int, "seed": int, "mask_h_ratio": float, "mask_w_ratio": float}
ALIASES = {"understand": {"prompt": "question"}}


@dataclass
class Request:
    """One request: its index in the whole batch (seeds and default names derive from it) and its fields."""

    index: int
    fields: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.fields.get(name)


def read_batch_file(path: str | os.PathLike, task: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped), each checked against the task's fields."""
    path = Path(path)
    allowed = TASK_FIELDS[task][0]
    lines = []
    for number, line in enumerate(read_text_file(path, "batch file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number} is not valid JSON ({err.msg}): one JSON object per line") from None
        if not isinstance(item, dict):
            raise InputError(f'{path}:{number} is not a JSON object: write e.g. {{"prompt": "a red cat"}}')
        item = {ALIASES.get(task, {}).get(key, key): value for key, value in item.items()}
        unknown = sorted(set(item) - allowed)
        if unknown:
            raise InputError(
                f"{path}:{number} has unknown field(s) {', '.join(unknown)} for {task}: "
                f"use {', '.join(sorted(allowed))}"
            )
        check_field_types(item, f"{path}:{number}")
        for key in PATH_FIELDS:
            if item.get(key):
                item[key] = str(path.parent / item[key])
        lines.append(item)
    if not lines:
        raise InputError(f"batch file {path} has no requests: write one JSON object per line")
    return lines


def check_field_types(item: dict[str, Any], where: str) -> None:
    """Numbers must be JSON numbers (integers where a count is meant); everything else a string."""
    for key, value in item.items():
        kind = NUMBER_FIELDS.get(key, str)
        ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
        if not ok or isinstance(value, bool):
            expected = {int: "an integer", float: "a number", str: "a string"}[kind]
            raise InputError(f"{where}: {key} must be {expected}, not {value!r}")
        check_finite(f"{where}: {key}", value)


def build_requests(task: str, flags: dict[str, Any], batch_file: str | None) -> list[Request]:
    """Requests from the batch file (flags fill missing fields) or one request from the flags alone."""
    allowed, required = TASK_FIELDS[task]
    defaults = {key: value for key, value in flags.items() if key in allowed and value is not None}
    items = read_batch_file(batch_file, task) if batch_file else [{}]
    requests = [Request(index, {**defaults, **item}) for index, item in enumerate(items)]
    for request in requests:
        missing = sorted(name for name in required if request[name] in (None, ""))
        if missing:
            where = f"request {request.index + 1} of the batch file" if batch_file else "the command"
            flags_text = ", ".join("--" + name.replace("_", "-") for name in missing)
            raise InputError(f"{where} has no {', '.join(missing)}: pass {flags_text} (or set it in every line)")
        check_request_values(request)
    return requests


def check_request_values(request: Request) -> None:
    """Values a JSON type check lets through: blank prompts, sizes <= 0, seeds no generator takes."""
    for name in ("prompt", "question"):
        check_text(f"{name} of request {request.index + 1}", request[name])
    for name in ("width", "height"):
        if request[name] is not None:
            check_image_dimension(f"{name} of request {request.index + 1}", request[name])
    if request["seed"] is not None:
        check_seeds(request["seed"])


def my_share(requests: list[Request], rank: int, world: int) -> list[Request]:
    """Requests rank, rank + world, ...: disjoint across ranks and covering all of them."""
    return requests[rank::world]


def output_paths(requests: list[Request], task: str, output: str | None, output_dir: str) -> list[Path]:
    """Each request's PNG path: its ``output`` field (under ``output_dir``), ``--output`` for a single
    request, else ``<task>_<index>_seed<seed>.png``; one file twice is refused, however it is spelt
    (``..``, symlinks), before any sampling."""
    if output and len(requests) > 1:
        raise InputError(
            "--output names one file but there are several requests: use --output-dir, or an "
            "'output' field per line of the batch file"
        )
    paths = []
    for request in requests:
        name = request["output"] or output or f"{task}_{request.index:05d}_seed{request['seed']}.png"
        path = Path(name)
        paths.append(path if path.is_absolute() or (output and not request["output"]) else Path(output_dir) / path)
    seen: dict[Path, int] = {}
    for request, path in zip(requests, paths, strict=True):
        output_file(path, "output", ".png")
        real = resolved(path, "output")
        if real in seen:
            raise InputError(
                f"requests {seen[real] + 1} and {request.index + 1} both write {real}: give each its own 'output'"
            )
        seen[real] = request.index
    return paths


def assign_seeds(requests: list[Request], base_seed: int) -> None:
    """A request without a seed gets ``base_seed + index``: fixed whatever the batching or the rank."""
    check_seeds(base_seed, len(requests))
    for request in requests:
        if request["seed"] is None:
            request.fields["seed"] = base_seed + request.index
