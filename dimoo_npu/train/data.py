"""Which samples each rank trains on at each step: a stateless, resumable, dp-sharded order.

The run reads one infinite stream of sample positions 0, 1, 2, ...; position p is sample
``perm_e[p % N]`` of epoch e = p // N, where ``perm_e`` is a permutation seeded by (seed, e). A step
that starts at position c (the samples consumed so far) takes positions [c, c + G) (G = global batch);
data-parallel rank r takes the r-th contiguous slice of G/dp of them. Everything is a function of
(seed, c), so resuming needs only the consumed-sample count, and a step's global batch is the same
whatever the dp size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dimoo_npu.train.masking import Objective, collate, sample_generator, training_example
from dimoo_npu.train.shards import ShardDataset

GROUP_WINDOW_BATCHES = 64  # length grouping sorts windows of this many global batches


class SampleOrder:
    """Position in the run's stream -> dataset index (epochs are seeded permutations).

    With ``lengths`` and ``group`` (the global batch), each epoch's permutation is sorted by length inside
    windows of GROUP_WINDOW_BATCHES batches and the batches of a window are shuffled: a batch then pads
    to a length close to its own samples' (a mix of 90- and 190-token samples otherwise pads every batch
    to 190), while every sample is still seen once per epoch in an order that depends only on the seed.
    """

    def __init__(self, size: int, seed: int, lengths: Sequence[int] | None = None, group: int = 0):
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"{len(lengths)} lengths for {size} samples")
        self.size = size
        self.seed = seed
        self.lengths = lengths if group > 1 else None
        self.group = group
        self._epoch = -1
        self._perm: list[int] = []

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + 7919 * epoch)
            self._perm = torch.randperm(self.size, generator=generator).tolist()
            if self.lengths is not None:
                self._perm = self._grouped(self._perm, generator, lead=(-epoch * self.size) % self.group)
            self._epoch = epoch
        return self._perm[offset]

    def _grouped(self, perm: list[int], generator: torch.Generator, lead: int) -> list[int]:
        """``lead`` samples finish the batch the previous epoch began; the grouped batches start after them.
        Only whole batches are shuffled: the epoch's last, partial one stays last, so every batch stays aligned."""
        window = self.group * GROUP_WINDOW_BATCHES
        grouped = perm[:lead]
        for start in range(lead, len(perm), window):
            ordered = sorted(perm[start : start + window], key=lambda index: self.lengths[index])
            whole = len(ordered) // self.group
            for b in torch.randperm(whole, generator=generator).tolist():
                grouped.extend(ordered[b * self.group : (b + 1) * self.group])
            grouped.extend(ordered[whole * self.group :])
        return grouped


def rank_positions(consumed: int, global_batch: int, dp_rank: int, dp_size: int) -> range:
    """Stream positions of ``dp_rank``'s local batch in the step that starts at position ``consumed``."""
    local = global_batch // dp_size
    start = consumed + dp_rank * local
    return range(start, start + local)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L), -100 except masked answer tokens
    attention_mask: torch.Tensor  # (B, L) True = real token
    positions: range  # stream positions of the rows

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


class BatchSource:
    """Builds a rank's local batch for any step: sample order, condition drop, masking, padding."""

    def __init__(
        self,
        dataset: ShardDataset,
        objective: Objective,
        seed: int,
        pad_id: int,
        seq_length: int | None = None,
        group_by_length: int = 0,
    ):
        """``group_by_length``: the global batch size to group samples of similar length into (0: plain order)."""
        self.dataset = dataset
        self.objective = objective
        self.seed = seed
        self.pad_id = pad_id
        self.seq_length = seq_length
        lengths = dataset.lengths() if group_by_length > 1 else None
        self.order = SampleOrder(len(dataset), seed, lengths, group_by_length)

    def batch(self, consumed: int, global_batch: int, dp_rank: int = 0, dp_size: int = 1) -> Batch:
        """``dp_rank``'s local batch of the step that starts after ``consumed`` samples."""
        positions = rank_positions(consumed, global_batch, dp_rank, dp_size)
        examples = [
            training_example(self.dataset[self.order(p)], self.objective, sample_generator(self.seed, p))
            for p in positions
        ]
        input_ids, labels, attention_mask = collate(examples, self.pad_id, self.seq_length)
        return Batch(input_ids, labels, attention_mask, positions)
