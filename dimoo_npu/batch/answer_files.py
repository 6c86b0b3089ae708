"""Understanding answers as JSON lines, appended after every batch so a killed run keeps what it answered.

Under torchrun each rank appends to its own ``<stem>.rank<r>-of-<w><suffix>``; a resume reads the answers
file and the rank files of every earlier world size, so a job may be relaunched on more or fewer devices.
A torn last line (a kill during the write) is dropped; each row records the settings it was answered with.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from dimoo_npu.batch.resume import FIX, first_difference
from dimoo_npu.files.atomic import append_line_block, write_text_atomically
from dimoo_npu.utils.errors import InputError

logger = logging.getLogger("dimoo")


def answers_path(output: str | None, rank: int, world: int) -> Path | None:
    """Where this process writes its answers: ``output``, one file per rank under torchrun, or None (stdout)."""
    if not output:
        return None
    path = Path(output)
    return path.with_name(f"{path.stem}.rank{rank}-of-{world}{path.suffix}") if world > 1 else path


def earlier_files(output: str) -> list[Path]:
    """The answers file and its rank files of any world size that exist."""
    path = Path(output)
    pattern = re.compile(rf"{re.escape(path.stem)}\.rank\d+-of-\d+{re.escape(path.suffix)}")
    ranks = sorted(p for p in path.parent.glob(f"{path.stem}.rank*") if pattern.fullmatch(p.name))
    return [p for p in [path, *ranks] if p.is_file()]


def read_rows(path: Path, own: bool) -> list[dict[str, Any]]:
    """The complete rows of an answers file; a torn last line is dropped, and cut off the file when it is this
    process's ``own`` (the one it appends to: no other process writes there, so the cut races with no one)."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete, torn = lines[:-1], lines[-1]
    if torn:
        logger.warning("%s ends in a torn line (a killed run): dropping it", path)
        if own:
            write_text_atomically(path, "".join(line + "\n" for line in complete))
    rows = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("index"), int):
            raise InputError(f"cannot resume: {path}:{number} is not an answer row written by dimoo; {FIX}")
        rows.append(row)
    return rows


def answered(output: str, own: Path, expected: dict[int, dict[str, Any]]) -> set[int]:
    """Indices among ``expected`` (index -> the row's identifying fields and settings) already answered in
    ``output``'s files (``own``: the one this process appends to); InputError naming the field when a row was
    answered otherwise."""
    done = set()
    for path in earlier_files(output):
        for row in read_rows(path, own=path == own):
            want = expected.get(row["index"])
            if want is None:
                continue
            recorded = {key: row.get(key) for key in want}
            difference = first_difference(recorded, want)
            if difference:
                raise InputError(f"cannot resume: request {row['index'] + 1} in {path} differs in {difference}; {FIX}")
            done.add(row["index"])
    return done


def append_rows(rows: list[dict[str, Any]], path: Path) -> None:
    append_line_block(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
