"""The masked-diffusion training loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def masked_diffusion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One mean of full-vocabulary cross-entropy over every labelled position of the batch.

    No shift: a position predicts its own token. Labels of -100 are ignored. Only labelled rows are
    upcast to fp32, so the (B, L, V) logits are never copied whole.
    """
    flat_labels = labels.reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    picked = logits.reshape(-1, logits.shape[-1])[keep]
    return F.cross_entropy(picked.float(), flat_labels[keep], reduction="mean")
