"""One optimizer step's forward and backward on the module `dimoo_npu.parallel.parallelize` returned.

Micro-batches run as gradient accumulation, or through the pipeline schedule; the loss is reduced exactly over
the global batch (`dimoo_npu.train.loss`); gradients are clipped by their norm over every stage and shard.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.nn.parallel import DistributedDataParallel

from dimoo_npu.model import DiMOOModel
from dimoo_npu.parallel import ParallelDims, ParallelOptions
from dimoo_npu.parallel.mesh import pipeline_stage
from dimoo_npu.parallel.pipeline_parallel import build_schedule
from dimoo_npu.train.loss import StepLoss, global_label_count
from dimoo_npu.utils.errors import InputError


class TrainStep:
    """Forward/backward of one step's micro-batches on this rank's ``part``, and gradient clipping."""

    def __init__(
        self, part: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None, options: ParallelOptions, device
    ) -> None:
        self.part = part
        self.dims, self.mesh, self.options, self.device = dims, mesh, options, torch.device(device)
        self.stage = pipeline_stage(dims, mesh)
        self._step_loss: StepLoss | None = None
        self.schedule = None
        if dims.pp > 1:
            self.schedule = build_schedule(
                part, self.stage, dims.pp, self.device, mesh["pp"].get_group(),
                options.pp_schedule, options.microbatches, self._pipeline_loss,
            )  # fmt: skip
        # Without FSDP's mixed-precision policy (one process, or DDP), bf16 compute comes from autocast.
        self._autocast = options.param_dtype is not None and (mesh is None or options.data_parallel == "ddp")

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.dims.pp - 1

    def _group(self, name: str) -> dist.ProcessGroup | None:
        return None if self.mesh is None or getattr(self.dims, name) == 1 else self.mesh[name].get_group()

    def _context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self.dims.tp > 1:
            stack.enter_context(loss_parallel())  # logits arrive sharded on the vocabulary
        if self._autocast:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.options.param_dtype))
        return stack

    def forward_backward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Accumulate one step's gradients from this rank's batch (B_local, L); return the step's loss.

        Every rank of a data-parallel group passes the same batch. The loss is the mean masked-diffusion loss
        over the labelled tokens of the global batch (all data-parallel ranks), identical on every rank.
        """
        input_ids, labels = input_ids.to(self.device), labels.to(self.device)
        mask = None if attention_mask is None else attention_mask.to(self.device).bool()
        self._check_batch(input_ids, labels)
        positions = DiMOOModel._default_positions(input_ids, mask)  # full-sequence rotary positions (B, L)
        self._step_loss = StepLoss(global_label_count(labels, self._group("dp")), self.dims.dp)
        with self._context():
            if self.schedule is not None:
                losses = self._pipeline_step(input_ids, labels, mask, positions)
            else:
                losses = self._accumulate(input_ids, labels, mask, positions)
        return self._reduce_loss(self._step_loss.local_total(losses, self.device))

    def _check_batch(self, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        """The batch tensors fit the layout (the trainer's batches do by construction; direct callers may not)."""
        if labels.shape != input_ids.shape:
            raise InputError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
        if input_ids.shape[0] % self.options.microbatches:
            raise InputError(
                f"local batch of {input_ids.shape[0]} rows does not split into {self.options.microbatches} "
                "micro-batches: make micro_batch_size * microbatches the per-rank batch"
            )
        if self.options.sequence_parallel and input_ids.shape[1] % self.dims.tp:
            raise InputError(
                f"sequence length {input_ids.shape[1]} is not divisible by tp {self.dims.tp}, which sequence "
                "parallelism needs: pad sequences to a multiple of tensor_model_parallel_size"
            )

    def _pipeline_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._step_loss(logits, labels)

    def _pipeline_step(self, input_ids, labels, mask, positions) -> list[torch.Tensor]:
        kwargs = {"positions": positions} if mask is None else {"positions": positions, "attention_mask": mask}
        args = (input_ids,) if self.is_first_stage else ()
        target = labels if self.is_last_stage else None
        losses: list[torch.Tensor] = []  # filled on the last stage only
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        return losses

    def _accumulate(self, input_ids, labels, mask, positions) -> list[torch.Tensor]:
        count = self.options.microbatches
        chunks = [t.chunk(count) if t is not None else [None] * count for t in (input_ids, labels, mask, positions)]
        losses = []
        for index, (ids, lab, msk, pos) in enumerate(zip(*chunks, strict=True)):
            last = index == count - 1
            no_sync = isinstance(self.part, DistributedDataParallel) and not last
            with self.part.no_sync() if no_sync else contextlib.nullcontext():
                loss = self._step_loss(self.part(ids, msk, positions=pos), lab)
                loss.backward()
            losses.append(loss)
        return losses

    def _reduce_loss(self, local: torch.Tensor) -> torch.Tensor:
        """Sum the step's loss over data-parallel ranks and pipeline stages (only the last one computed it)."""
        for name in ("dp", "pp"):
            group = self._group(name)
            if group is not None:
                dist.all_reduce(local, group=group)
        return local

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Scale gradients so their global L2 norm is at most ``max_norm``; return the norm before clipping."""
        params = [p for p in self.part.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # over tensor and data parallel shards
        group = self._group("pp")
        if group is not None:
            norm = norm**2
            dist.all_reduce(norm, group=group)  # stages own disjoint parameters: squares add up
            norm = norm.sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm
