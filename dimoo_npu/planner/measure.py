"""Measure what one micro-batch really keeps for backward, to fit and check `dimoo_npu.planner.activations`.

A dispatch mode records every tensor storage the forward and the loss create; the ones still alive when the loss
is computed (parameters left out) are the activation memory the backward needs. Liveness is the storage's, not
the tensor object's: checkpointing keeps detached aliases of op outputs, and autograd keeps saved tensors in
C++, out of a saved-tensors hook's sight under non-reentrant checkpointing (its own hooks take precedence).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveStorages(TorchDispatchMode):
    """Remembers every plain tensor storage created under it; `live` lists those still alive.

    With ``peak_excluding`` (data pointers, e.g. the parameters') it also keeps ``peak``: the most bytes alive
    after any op, which costs a pass over the storages per op (tiny models only).
    """

    def __init__(self, peak_excluding: set[int] | None = None) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int, tuple[int, ...]]] = {}
        self.peak_excluding = peak_excluding
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor run its local ops, which then come through this mode
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if type(tensor) is not torch.Tensor:
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            known = self.storages.get(key)
            if key and (known is None or known[0].expired()):  # a freed address may be reused
                self.storages[key] = (StorageWeakRef(storage), storage.nbytes(), tuple(tensor.shape))
        if self.peak_excluding is not None:
            self.peak = max(self.peak, sum(nbytes for nbytes, _ in self.live(self.peak_excluding)))
        return out

    def live(self, exclude: set[int]) -> list[tuple[int, tuple[int, ...]]]:
        """(bytes, shape) of each storage still alive, leaving out ``exclude`` (data pointers)."""
        return [
            (nbytes, shape)
            for key, (ref, nbytes, shape) in self.storages.items()
            if not ref.expired() and key not in exclude
        ]


def _parameter_storages(model: torch.nn.Module) -> set[int]:
    return {(p.to_local() if isinstance(p, DTensor) else p).untyped_storage().data_ptr() for p in model.parameters()}


def measure_peak_bytes(model: torch.nn.Module, run: Callable[[], object]) -> int:
    """The most bytes alive at once (parameters excluded) while ``run()`` executes, e.g. a no-grad forward."""
    tracker = LiveStorages(peak_excluding=_parameter_storages(model))
    with tracker:
        run()
    return tracker.peak


def measure_kept_bytes(
    model: torch.nn.Module, forward_loss: Callable[[], torch.Tensor]
) -> tuple[int, list[tuple[int, tuple[int, ...]]]]:
    """Bytes alive after ``forward_loss()`` (one micro-batch through ``model`` and the loss), parameters excluded,
    and each live storage. Runs the backward afterwards, so the graph is freed.
    """
    params = _parameter_storages(model)
    tracker = LiveStorages()
    with tracker:
        loss = forward_loss()
        live = tracker.live(params)
    (loss.to_local() if isinstance(loss, DTensor) else loss).backward()
    model.zero_grad(set_to_none=True)
    return sum(nbytes for nbytes, _ in live), live


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross-entropy over every position, as the training loss computes it when all are labelled
    (vocabulary-sharded DTensor logits need `loss_parallel`); what it keeps is what the planner counts."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
