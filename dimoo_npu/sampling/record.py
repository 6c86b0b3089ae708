"""What a sampler records for reinforcement learning (``record=True``): the trajectory a policy log-likelihood needs.

A rollout is scored later with gradients (`dimoo_npu.rl.likelihood`), so recording runs under
``torch.no_grad`` instead of ``torch.inference_mode`` (inference tensors cannot be saved for backward) and on the
training (unfused) layout: the fused projections are sampling-only views that the optimizer never sees. The record
is one int per sampled position, the step that revealed it, written on the device with no host read; the
ordinary path (``record=False``) runs exactly as before.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dimoo_npu.utils.errors import InputError

NOT_SAMPLED = -1  # reveal step of a position the prompt already gave


@dataclass
class Rollout:
    """A sampled batch and its trajectory.

    ``tokens`` (B, K): the sampled positions' final ids (image cells, or answer positions); ``positions`` (B, K):
    where they sit in ``sequence`` (B, L), the whole filled-in input of the cond branch; ``real`` (B, L): real
    tokens; ``reveal_step`` (B, K): the step that fixed each position (`NOT_SAMPLED` where the prompt gave it);
    ``steps``: the number of steps run.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    sequence: torch.Tensor
    real: torch.Tensor
    reveal_step: torch.Tensor
    steps: int

    def rows(self, start: int, stop: int) -> Rollout:
        """Rows ``start:stop`` (a micro-batch)."""
        return self.select(slice(start, stop))

    def select(self, pick: slice | torch.Tensor) -> Rollout:
        """The rows a slice or an index tensor picks, in its order."""
        return Rollout(
            self.tokens[pick], self.positions[pick], self.sequence[pick], self.real[pick], self.reveal_step[pick],
            self.steps,
        )  # fmt: skip

    @staticmethod
    def stacked(parts: list[Rollout]) -> Rollout:
        """The rows of ``parts`` one after another: rollouts of the same prompts (equal widths and step counts)."""
        shapes = {(p.tokens.shape[1], p.sequence.shape[1], p.steps) for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"rollouts stack only at equal widths and steps, got (cells, length, steps) {shapes}")
        fields = ("tokens", "positions", "sequence", "real", "reveal_step")
        return Rollout(*(torch.cat([getattr(p, f) for p in parts]) for f in fields), parts[0].steps)


def sampling_context(record: bool) -> contextlib.AbstractContextManager:
    """``torch.inference_mode`` for ordinary sampling; ``torch.no_grad`` when recording (see the module doc)."""
    return torch.no_grad() if record else torch.inference_mode()


def check_recordable(model: torch.nn.Module) -> None:
    """Refuse the fused inference layout for a recorded rollout (its weights are views the trainer does not own)."""
    if any(getattr(module, "qkv_weight", None) is not None for module in model.modules()):
        raise InputError(
            "record=True needs the training (unfused) layout, but this model was fused for sampling "
            "(prepare_for_sampling / fuse_projections): roll out with the model being trained"
        )


def mark_revealed(
    reveal_step: torch.Tensor, slots: torch.Tensor, revealed: torch.Tensor, step: int | torch.Tensor
) -> None:
    """Record ``step`` (one for all rows, or (B, 1): each row's own) at the slots (B, K) that ``revealed`` (B, K)
    marks, in place, on the device."""
    current = reveal_step.gather(1, slots)
    reveal_step.scatter_(1, slots, torch.where(revealed, step, current))
