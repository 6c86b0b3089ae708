"""Read safetensors files through a memory map, one tensor at a time, releasing pages as they are copied.

The safetensors library's own reader keeps every mapped page resident until the file is closed, so a
bf16 checkpoint loaded into fp32 would cost 1.5x its target size in RSS. Here each tensor is copied
into its destination in slices of at most ``CHUNK_BYTES`` and the mapped pages behind each slice are
dropped (``MADV_DONTNEED``) right after, so loading costs the destination plus one slice.
Format: 8-byte little-endian header size N, N bytes of JSON header, then the raw data.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dimoo_npu.files.atomic import write_atomically
from dimoo_npu.utils.errors import CheckpointError

CHUNK_BYTES = 64 << 20
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit on the JSON header

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ITEMSIZE = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in DTYPES.values()}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> list[TensorEntry]:
    """The tensors of a checked safetensors file (see `_parse`), allocating nothing for them."""
    return _parse(path)[0]


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` strings of a checked safetensors file (see `_parse`); {} when it has none."""
    return _parse(path)[1]


def _parse(path: Path) -> tuple[list[TensorEntry], dict[str, str]]:
    """Parse and check a safetensors header: its tensor entries and its metadata.

    The rules are the safetensors library's (``Metadata::validate`` and ``read_metadata``): the header
    is at most ``MAX_HEADER_BYTES``; every tensor's ``data_offsets`` span is exactly numel * itemsize
    of its shape and dtype; sorted by offset, the tensors tile the data section from byte 0 to the
    end of the file with no gap and no overlap. Anything else is refused, naming the file and tensor.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes, no header): download or copy it again")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path} claims a header of {header_len} bytes, over the format's limit of {MAX_HEADER_BYTES}: "
                "the file is corrupt; download or copy it again"
            )
        if 8 + header_len > size:
            raise CheckpointError(f"{path} is truncated inside its header: download or copy it again")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
    base = 8 + header_len
    entries = [_entry(path, name, info, base) for name, info in header.items() if name != "__metadata__"]
    _check_tiling(path, entries, base, size)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: its __metadata__ is not a map of strings: the file is corrupt; write it again")
    return entries, metadata


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: Path, name: str, info: object, base: int) -> TensorEntry:
    """One header entry, checked on its own: dtype, shape, offsets, and span = numel * itemsize."""
    corrupt = "the file is corrupt or was written by a faulty tool; download or convert it again"
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: header entry of tensor {name!r} is not an object: {corrupt}")
    if info.get("dtype") not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {json.dumps(shape)}, not a list of sizes: {corrupt}")
    ordered_pair = isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
    if not ordered_pair or offsets[1] < offsets[0]:
        raise CheckpointError(
            f"{path}: tensor {name!r} has data_offsets {json.dumps(offsets)}; they must be [start, end] with "
            f"0 <= start <= end: {corrupt}"
        )
    dtype = DTYPES[info["dtype"]]
    needed = math.prod(shape) * _ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != needed:
        raise CheckpointError(
            f"{path}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes but shape {shape} of {info['dtype']} "
            f"needs {needed}: {corrupt}"
        )
    return TensorEntry(name, dtype, tuple(shape), base + offsets[0], base + offsets[1])


def _check_tiling(path: Path, entries: list[TensorEntry], base: int, size: int) -> None:
    """Sorted by offset, the tensors must cover [base, size) exactly: no overlap, no gap, nothing after."""
    position, previous = base, None
    for entry in sorted(entries, key=lambda e: (e.start, e.end)):
        if entry.start < position:
            raise CheckpointError(
                f"{path}: tensor {entry.name!r} overlaps {previous!r} (bytes {entry.start - base}.."
                f"{position - base} of the data): the file is corrupt; download or convert it again"
            )
        if entry.start > position:
            raise CheckpointError(
                f"{path}: tensor {entry.name!r} starts at byte {entry.start - base} of the data, so bytes "
                f"{position - base}..{entry.start - base} belong to no tensor: the file is corrupt; download or "
                "convert it again"
            )
        position, previous = entry.end, entry.name
    if position > size:
        raise CheckpointError(
            f"{path} is truncated: its header needs {position} bytes but the file has {size}; download or copy it again"
        )
    if position < size:
        raise CheckpointError(
            f"{path} has {size - position} byte(s) after its last tensor: the file is corrupt or was appended to; "
            "download or copy it again"
        )


def iter_tensors(
    path: Path, make_destination: Callable[[TensorEntry], torch.Tensor | None]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Copy every tensor of ``path`` into ``make_destination(entry)`` (None skips it) and yield it.

    The destination decides device and dtype; the copy converts. Pages are released slice by slice.
    """
    entries = read_header(path)
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            for entry in entries:
                destination = make_destination(entry)
                if destination is None:
                    continue
                _copy_entry(mapped, entry, destination)
                yield entry.name, destination
        finally:
            mapped.close()


def _copy_entry(mapped: mmap.mmap, entry: TensorEntry, destination: torch.Tensor) -> None:
    itemsize = _ITEMSIZE[entry.dtype]
    numel = (entry.end - entry.start) // itemsize  # = numel of the shape: read_header checked it
    flat_destination = destination.view(-1)
    step = max(1, CHUNK_BYTES // itemsize)
    for first in range(0, numel, step):
        count = min(step, numel - first)
        offset = entry.start + first * itemsize
        source = torch.frombuffer(mapped, dtype=entry.dtype, count=count, offset=offset)
        flat_destination[first : first + count].copy_(source)
        _release(mapped, offset, count * itemsize)


def _release(mapped: mmap.mmap, offset: int, length: int) -> None:
    page = mmap.PAGESIZE
    start = offset - offset % page
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED, start, min(length + offset - start, len(mapped) - start))


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file next to ``path`` and rename it into place: a crash leaves the old file."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))
