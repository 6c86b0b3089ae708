"""Generation requests from command-line flags or a JSONL batch file, and each process's share of them.

A batch-file line is one JSON object holding any field of the task's request type (`dimoo_npu.settings.requests`,
sampling settings included); a field missing from a line takes the command-line value, then the checkpoint's
``generation_defaults``, then the public default. Relative image paths are read from the batch file's folder.
Under torchrun, process RANK of WORLD_SIZE takes requests RANK, RANK + WORLD_SIZE, ...: together the
processes cover every request exactly once, with no process group needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dimoo_npu.settings.requests import TASKS, Request, check, from_mapping, resolve
from dimoo_npu.utils.errors import InputError
from dimoo_npu.utils.validate import check_seeds, output_file, read_text_file, resolved

PATH_FIELDS = ("image", "ref_image", "mask")
ALIASES = {"understand": {"prompt": "question"}}


@dataclass(frozen=True)
class Numbered:
    """A request and its index in the whole batch (its default seed and output name derive from it)."""

    index: int
    request: Request


def read_batch_file(path: str | os.PathLike, task: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped), each typed against the task's request fields."""
    path = Path(path)
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
        from_mapping(task, item, f"{path}:{number}")  # names and types
        for key in PATH_FIELDS:
            if item.get(key):
                item[key] = str(path.parent / item[key])
        lines.append(item)
    if not lines:
        raise InputError(f"batch file {path} has no requests: write one JSON object per line")
    return lines


def build_requests(
    task: str,
    flags: Mapping[str, Any],
    batch_file: str | None,
    checkpoint_defaults: Mapping[str, Any] | None = None,
    cap: int | None = None,
) -> list[Numbered]:
    """Resolved, checked requests from the batch file (flags fill missing fields) or one from the flags alone.

    ``flags`` may hold anything (the run's other flags are ignored); the request fields among them are typed here.
    ``cap``, the length cap in tokens, bounds every size-like field (`dimoo_npu.settings.requests.check_budget`).
    """
    names = {f.name for f in dataclasses.fields(TASKS[task])}
    given = {key: value for key, value in flags.items() if key in names and value is not None}
    from_mapping(task, given, "the command line")
    items = read_batch_file(batch_file, task) if batch_file else [{}]
    numbered = []
    for index, item in enumerate(items):
        where = f"request {index + 1}"
        request = resolve(from_mapping(task, {**given, **item}, where), checkpoint_defaults)
        numbered.append(Numbered(index, check(request, where, cap)))
    return numbered


def my_share(requests: list[Numbered], rank: int, world: int) -> list[Numbered]:
    """Requests rank, rank + world, ...: disjoint across ranks and covering all of them."""
    return requests[rank::world]


def output_paths(requests: list[Numbered], task: str, output: str | None, output_dir: str) -> list[Path]:
    """Each request's PNG path: its ``output`` field (under ``output_dir``), ``--output`` for a single
    request, else ``<task>_<index>_seed<seed>.png``; one file twice is refused, however it is spelt
    (``..``, symlinks, or letter case: one file on macOS and Windows), before any sampling."""
    if output and len(requests) > 1:
        raise InputError(
            "--output names one file but there are several requests: use --output-dir, or an "
            "'output' field per line of the batch file"
        )
    paths = []
    for item in requests:
        own = item.request.output
        name = own or output or f"{task}_{item.index:05d}_seed{item.request.seed}.png"
        path = Path(name)
        paths.append(path if path.is_absolute() or (output and not own) else Path(output_dir) / path)
    seen: dict[str, tuple[int, Path]] = {}
    for item, path in zip(requests, paths, strict=True):
        output_file(path, "output", ".png")
        real = resolved(path, "output")
        first = seen.setdefault(str(real).casefold(), (item.index, real))
        if first[0] != item.index:
            same = "" if first[1] == real else f" and {first[1]} (one file where case does not count: macOS, Windows)"
            raise InputError(
                f"requests {first[0] + 1} and {item.index + 1} both write {real}{same}: give each its own 'output'"
            )
    return paths


def assign_seeds(requests: list[Numbered], base_seed: int) -> list[Numbered]:
    """A request without a seed gets ``base_seed + index``: fixed whatever the batching or the rank."""
    check_seeds(base_seed, len(requests))
    return [
        item
        if item.request.seed is not None
        else Numbered(item.index, dataclasses.replace(item.request, seed=base_seed + item.index))
        for item in requests
    ]
