"""Turning the samplers' inputs (a tensor of rows or a list of rows of any lengths) into padded batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dimoo_npu.utils.errors import InputError

RowsLike = torch.Tensor | Sequence[torch.Tensor]


def as_rows(ids: RowsLike, name: str) -> tuple[list[torch.Tensor], bool]:
    """Split ``ids`` into 1-D LongTensor rows; also say whether they came as one (B, L) tensor."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 2:
            raise InputError(
                f"{name} must be a (batch, length) LongTensor or a list of 1-D LongTensors; "
                f"got a tensor of shape {tuple(ids.shape)}"
            )
        rows, was_tensor = list(ids.unbind(0)), True
    elif isinstance(ids, (list, tuple)) and all(isinstance(row, torch.Tensor) for row in ids):
        rows, was_tensor = list(ids), False
    else:
        raise InputError(
            f"{name} must be a (batch, length) LongTensor or a list of 1-D LongTensors, not {type(ids).__name__}"
        )
    if not rows:
        raise InputError(f"{name} is empty: pass at least one row")
    for row in rows:
        if row.dim() != 1 or row.numel() == 0 or row.is_floating_point() or row.dtype == torch.bool:
            raise InputError(
                f"every row of {name} must be a non-empty 1-D integer tensor; got {row.dtype} {tuple(row.shape)}"
            )
    return [row.long() for row in rows], was_tensor


def matching_rows(ids: RowsLike | None, batch: int, name: str, needed_for: str) -> list[torch.Tensor]:
    """Rows of an uncond prefix argument: one per prompt, required when ``needed_for`` is set."""
    if ids is None:
        raise InputError(
            f"{needed_for} needs {name} (one unconditional prefix per prompt): pass {name} or set the guidance to 0"
        )
    rows, _ = as_rows(ids, name)
    if len(rows) != batch:
        raise InputError(f"{name} has {len(rows)} rows for {batch} prompts: pass one prefix per prompt")
    return rows


def pad_rows(rows: list[torch.Tensor], device: torch.device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows into ids (B, L) and the real-token mask (B, L); padding is never attended to."""
    lengths = torch.tensor([row.numel() for row in rows], device=device)
    ids = torch.nn.utils.rnn.pad_sequence([row.to(device) for row in rows], batch_first=True, padding_value=pad_id)
    real = torch.arange(ids.shape[1], device=device) < lengths[:, None]  # (B, L)
    return ids, real


def row_generators(generator, batch: int) -> list[torch.Generator | None]:
    """None, one generator shared by all rows (drawn in row order), or one generator per row."""
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * batch
    generators = list(generator)
    if len(generators) != batch or not all(isinstance(g, torch.Generator) for g in generators):
        raise InputError(
            f"generator must be None, a torch.Generator or a list of {batch} generators (one per "
            f"prompt); got {len(generators)} items"
        )
    return generators


def code_starts(rows: list[torch.Tensor], code_start: int | None, find, what: str) -> list[int]:
    """One code_start per row: the given int for every row, or ``find(row)`` (None when the row lacks it)."""
    if code_start is not None:
        return [int(code_start)] * len(rows)
    starts = [find(row) for row in rows]
    for index, start in enumerate(starts):
        if start is None:
            raise InputError(
                f"prompt row {index} has no {what}: build it with the sequence builders or pass code_start"
            )
    return starts


def first_pair_end(row: torch.Tensor, first: int, second: int) -> int | None:
    """Index just past the first ``first, second`` pair of ids in the row, or None."""
    hits = ((row[:-1] == first) & (row[1:] == second)).nonzero()
    return int(hits[0, 0]) + 2 if hits.numel() else None


def last_index_after(row: torch.Tensor, token: int) -> int | None:
    """1 + the index of the last ``token`` in the row, or None."""
    hits = (row == token).nonzero()
    return int(hits[-1, 0]) + 1 if hits.numel() else None
