"""The masked-diffusion loss of one optimizer step, split over micro-batches, pipeline stages and ranks.

`dimoo_npu.modeling.losses.masked_diffusion_loss` is one mean over the labelled positions of a batch. Split into pieces,
that mean is kept exact by summing each piece's cross-entropy and dividing by the labelled-token count of the
whole global batch, counted once per step (all-reduced over data parallel ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from dimoo_npu.modeling.losses import IGNORE_INDEX


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of full-vocabulary cross-entropy (fp32) over the labelled positions; no shift.

    Vocabulary-sharded DTensor logits (tensor parallel) must be passed inside `loss_parallel`.
    """
    vocab = logits.shape[-1]
    if isinstance(logits, DTensor):
        flat = logits.reshape(-1, vocab).float()  # (B*L, V) sharded on V
        return F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    flat_labels = labels.reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    picked = logits.reshape(-1, vocab)[keep]  # only labelled rows are upcast
    return F.cross_entropy(picked.float(), flat_labels[keep], reduction="sum")


def global_label_count(labels: torch.Tensor, dp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Labelled positions of the whole step: this rank's batch, summed over data parallel ranks."""
    count = (labels != IGNORE_INDEX).sum().to(torch.float32)
    if dp_group is not None:
        dist.all_reduce(count, group=dp_group)
    return count


class StepLoss:
    """Loss function of one step's micro-batches (no side effects: pipeline schedules also call it to infer shapes).

    Data parallel averages gradients over its ``dp_size`` ranks, so each rank's backward loss is multiplied by
    ``dp_size``: the averaged gradient is then that of (sum over the global batch) / (global count).
    """

    def __init__(self, count: torch.Tensor, dp_size: int):
        self.denominator = max(float(count), 1.0)  # a step with no labelled token contributes zero loss
        self.dp_size = dp_size

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = summed_cross_entropy(logits, labels) / self.denominator
        return loss * self.dp_size if self.dp_size > 1 else loss

    def local_total(self, losses: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """This rank's share of the step's loss, from what ``__call__`` returned for its micro-batches."""
        total = torch.zeros((), dtype=torch.float32, device=device)
        for loss in losses:
            total += (loss.full_tensor() if isinstance(loss, DTensor) else loss).detach().float()
        return total / self.dp_size if self.dp_size > 1 else total
