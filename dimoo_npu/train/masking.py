"""The masked-diffusion training objective: which answer tokens a step hides and predicts.

Per sample: with probability ``cond_drop_prob`` the user text becomes ``<uncondition>`` (so the model also
learns the unconditional branch CFG needs); then r ~ U(0, 1), ratio = cos(pi/2 * r), and
max(1, int(n * ratio)) of the n answer tokens are replaced by the mask token. Labels hold the original
token at masked positions and -100 everywhere else, so the loss covers masked answer tokens only.

Every draw comes from a generator seeded by (run seed, the sample's position in the run's sample stream),
never from global RNG state: a resumed run, or the same run on another tp/pp/dp layout, masks exactly the
same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dimoo_npu.modeling.losses import IGNORE_INDEX
from dimoo_npu.train.shards import Sample
from dimoo_npu.utils.errors import InputError

_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads consecutive positions over the seed space


@dataclass(frozen=True)
class Objective:
    mask_id: int
    uncondition_id: int
    cond_drop_prob: float = 0.1

    @classmethod
    def from_special_tokens(cls, special: dict[str, int], cond_drop_prob: float) -> Objective:
        return cls(special["mask"], special["uncondition"], cond_drop_prob)


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the sample at ``position`` of the run's stream (a pure function of both)."""
    return torch.Generator().manual_seed((seed * _GOLDEN + position) % (1 << 63))


def cosine_mask_ratio(r: float) -> float:
    return math.cos(math.pi / 2 * r)


def drop_condition(sample: Sample, uncondition_id: int) -> Sample:
    """The sample with its user text replaced by the single ``<uncondition>`` token."""
    start, end = sample.drop_span
    token = torch.tensor([uncondition_id], dtype=sample.tokens.dtype)
    return Sample(
        tokens=torch.cat([sample.tokens[:start], token, sample.tokens[end:]]),
        loss_mask=torch.cat([sample.loss_mask[:start], torch.zeros(1, dtype=torch.bool), sample.loss_mask[end:]]),
        drop_span=(start, start + 1),
        task=sample.task,
    )


def mask_answer(
    tokens: torch.Tensor, loss_mask: torch.Tensor, mask_id: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) with a cosine-scheduled share (at least one) of the answer tokens masked."""
    candidates = loss_mask.nonzero().flatten()
    r = float(torch.rand((), generator=generator))
    count = max(1, int(candidates.numel() * cosine_mask_ratio(r)))
    chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]
    input_ids = tokens.clone()
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[chosen] = tokens[chosen]
    input_ids[chosen] = mask_id
    return input_ids, labels


def training_example(
    sample: Sample, objective: Objective, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of one sample: condition drop, then answer masking, both from ``generator``."""
    drop = float(torch.rand((), generator=generator)) < objective.cond_drop_prob
    if drop and sample.drop_span[1] > sample.drop_span[0]:
        sample = drop_condition(sample, objective.uncondition_id)
    if not bool(sample.loss_mask.any()):
        raise InputError(f"a {sample.task} sample has no answer tokens: its shard is corrupt, pre-tokenize again")
    return mask_answer(sample.tokens, sample.loss_mask, objective.mask_id, generator)


def collate(
    examples: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to ``length`` (default: the longest): input_ids, labels (-100 on padding), attention_mask."""
    longest = max(ids.numel() for ids, _ in examples)
    length = length or longest
    if longest > length:
        raise InputError(
            f"a sample of {longest} tokens does not fit data.seq_length {length}: raise seq_length "
            f"or pre-tokenize with --max-length {length}"
        )
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.bool)
    for row, (ids, row_labels) in enumerate(examples):
        input_ids[row, : ids.numel()] = ids
        labels[row, : ids.numel()] = row_labels
        attention_mask[row, : ids.numel()] = True
    return input_ids, labels, attention_mask
