"""Read safetensors files through a memory map, one tensor at a time, releasing pages as they are copied.

The safetensors library's own reader keeps every mapped page resident until the file is closed, so a
bf16 checkpoint loaded into fp32 would cost 1.5x its target size in RSS. Here each tensor is copied
into its destination in slices of at most ``CHUNK_BYTES`` and the mapped pages behind each slice are
dropped (``MADV_DONTNEED``) right after, so loading costs the destination plus one slice.
Format: 8-byte little-endian header size N, N bytes of JSON header, then the raw data.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dimoo_npu.atomic import write_atomically
from dimoo_npu.errors import CheckpointError

CHUNK_BYTES = 64 << 20

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


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> list[TensorEntry]:
    """Parse and check a safetensors header: a truncated or corrupt file fails here, naming the file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes, no header): download or copy it again")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise CheckpointError(f"{path} is truncated inside its header: download or copy it again")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from None
    base = 8 + header_len
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        entries.append(TensorEntry(name, DTYPES[info["dtype"]], tuple(info["shape"]), base + start, base + end))
    last = max((entry.end for entry in entries), default=base)
    if last > size:
        raise CheckpointError(
            f"{path} is truncated: its header needs {last} bytes but the file has {size}; download or copy it again"
        )
    return entries


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
    itemsize = torch.empty((), dtype=entry.dtype).element_size()
    numel = (entry.end - entry.start) // itemsize
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
