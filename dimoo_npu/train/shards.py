"""The pre-tokenized shard format: one safetensors file per chunk of the manifest, read through a memory map.

A shard holds N samples laid end to end (no pickle, no Python objects):

- ``tokens`` int32 (T,): every sample's full sequence with its answer in clear.
- ``loss_mask`` uint8 (T,): 1 where a token is part of the answer and may be masked and predicted. An image
  answer marks its codes only (not the end-of-line tokens between rows); a text answer marks every token
  up to its padding. This generalises an answer span: the span is the first to the last marked position.
- ``offsets`` int64 (N+1,): sample i is ``tokens[offsets[i]:offsets[i+1]]``.
- ``drop_spans`` int32 (N, 2): the user text [start, end) that a condition drop replaces by ``<uncondition>``;
  (0, 0) for samples that are never dropped (understanding).
- ``tasks`` uint8 (N,): index into `TASKS`.
- metadata: ``format``, ``ids`` (JSON list of record ids) and ``digest`` (of the manifest lines it came from).
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dimoo_npu.files.safetensors_io import atomic_save_file, read_header, read_metadata
from dimoo_npu.utils.errors import CheckpointError

FORMAT = "dimoo-shard-1"
TASKS = ("t2i", "edit", "inpaint", "mmu")
SHARD_GLOB = "shard-*.safetensors"


@dataclass
class Sample:
    """One training sequence before masking."""

    tokens: torch.Tensor  # (L,) int64
    loss_mask: torch.Tensor  # (L,) bool
    drop_span: tuple[int, int]
    task: str

    def __len__(self) -> int:
        return self.tokens.numel()

    @property
    def answer_span(self) -> tuple[int, int]:
        where = self.loss_mask.nonzero()
        return (int(where[0]), int(where[-1]) + 1) if where.numel() else (0, 0)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def write_shard(path: Path, samples: list[Sample], ids: list[str], digest: str) -> None:
    """Write ``samples`` as one shard, atomically (a crash leaves no partial shard)."""
    lengths = [len(sample) for sample in samples]
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    tensors = {
        "tokens": _cat([s.tokens for s in samples], torch.int32),
        "loss_mask": _cat([s.loss_mask for s in samples], torch.uint8),
        "offsets": torch.from_numpy(offsets),
        "drop_spans": torch.tensor([list(s.drop_span) for s in samples], dtype=torch.int32).reshape(-1, 2),
        "tasks": torch.tensor([TASKS.index(s.task) for s in samples], dtype=torch.uint8),
    }
    atomic_save_file(tensors, path, metadata={"format": FORMAT, "ids": json.dumps(ids), "digest": digest})


def _cat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([p.to(dtype) for p in parts]) if parts else torch.zeros(0, dtype=dtype)


class Shard:
    """A memory-mapped shard: samples are views into the file, so a large dataset costs no RAM up front."""

    def __init__(self, path: Path):
        self.path = path
        meta = read_metadata(path)
        if meta.get("format") != FORMAT:
            raise CheckpointError(
                f"{path} is not a dimoo shard (format {meta.get('format')!r}); write shards with `dimoo pretokenize`"
            )
        entries = {entry.name: entry for entry in read_header(path)}
        with open(path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        self.arrays = {name: self._view(entry) for name, entry in entries.items()}
        self.ids: list[str] = json.loads(meta["ids"])
        self.offsets = self.arrays["offsets"].tolist()

    def _view(self, entry) -> torch.Tensor:
        itemsize = torch.empty((), dtype=entry.dtype).element_size()
        count = (entry.end - entry.start) // itemsize
        flat = (
            torch.frombuffer(self._map, dtype=entry.dtype, count=count, offset=entry.start)
            if count
            else (torch.zeros(0, dtype=entry.dtype))
        )
        return flat.view(entry.shape)

    def __len__(self) -> int:
        return len(self.ids)

    def sample(self, i: int) -> Sample:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        start, end = (int(v) for v in self.arrays["drop_spans"][i])
        return Sample(
            tokens=self.arrays["tokens"][lo:hi].long(),
            loss_mask=self.arrays["loss_mask"][lo:hi].bool(),
            drop_span=(start, end),
            task=TASKS[int(self.arrays["tasks"][i])],
        )


class ShardDataset:
    """Every sample of a shard folder, indexed globally in shard order."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        paths = sorted(folder.glob(SHARD_GLOB))
        if not paths:
            raise CheckpointError(
                f"no shards ({SHARD_GLOB}) in {folder}: run `dimoo pretokenize` first "
                "and set data.shards to its output folder"
            )
        self.shards = [shard for shard in (Shard(path) for path in paths) if len(shard)]
        self.starts = np.cumsum([0] + [len(shard) for shard in self.shards])
        if self.starts[-1] == 0:
            raise CheckpointError(
                f"the shards in {folder} hold no samples: every record was rejected (see rejected.jsonl there)"
            )

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> Sample:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.shards[shard].sample(index - int(self.starts[shard]))

    def lengths(self) -> list[int]:
        """Every sample's token count, in global index order (read from the offsets, no tokens loaded)."""
        return np.concatenate([np.diff(shard.offsets) for shard in self.shards]).tolist()

    def max_length(self) -> int:
        return max(int(np.diff(shard.offsets).max()) for shard in self.shards)
