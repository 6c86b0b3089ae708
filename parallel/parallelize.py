"""Compose parallelism onto a plain `DiMOOModel` in a fixed order, and run one optimizer step's forward/backward.

Order (torchtitan's): pipeline split -> tensor parallel -> recompute -> (compile: not here) -> FSDP/DDP.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.nn.parallel import DistributedDataParallel

from dimoo_npu.errors import ConfigError, InputError
from dimoo_npu.model import DiMOOModel
from dimoo_npu.parallel.data_parallel import apply_ddp, apply_fsdp
from dimoo_npu.parallel.loss import StepLoss, global_label_count
from dimoo_npu.parallel.mesh import ParallelDims
from dimoo_npu.parallel.pipeline_parallel import SCHEDULES, build_schedule, split_stage, stage_layer_counts
from dimoo_npu.parallel.recompute import RECOMPUTE_MODES, apply_recompute
from dimoo_npu.parallel.tensor_parallel import apply_tp


@dataclass
class ParallelOptions:
    """How the parallel degrees are used (MindSpeed-MM names in brackets).

    sequence_parallel [sequence_parallel]: shard the residual stream on the sequence between TP regions.
    recompute [recompute_granularity]: "none", "full" (whole blocks) or "selective" (elementwise ops only).
    data_parallel: "fsdp" (FSDP2; also used with dp=1 on a multi-rank mesh for mixed precision) or "ddp".
    microbatches: micro-batches per optimizer step (pipeline micro-batches, or gradient accumulation).
    pp_schedule: "GPipe" or "1F1B". pipeline_num_layers [pipeline_num_layers]: explicit blocks per stage.
    param_dtype: compute dtype (e.g. torch.bfloat16); master weights stay fp32. reduce_dtype: gradient reduction.
    """

    sequence_parallel: bool = False
    recompute: str = "none"
    data_parallel: str = "fsdp"
    microbatches: int = 1
    pp_schedule: str = "1F1B"
    pipeline_num_layers: list[int] | None = None
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype = torch.float32

    def validate(self, dims: ParallelDims) -> None:
        """Raise `ConfigError` for option values or combinations this package cannot run."""
        choices = {
            "recompute": (self.recompute, RECOMPUTE_MODES),
            "data_parallel": (self.data_parallel, ("fsdp", "ddp")),
            "pp_schedule": (self.pp_schedule, tuple(SCHEDULES)),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")
        if not isinstance(self.microbatches, int) or self.microbatches < 1:
            raise ConfigError(f"microbatches={self.microbatches!r} must be an integer >= 1")
        if dims.pp > 1 and self.pp_schedule == "1F1B" and self.microbatches < dims.pp:
            raise ConfigError(
                f"the 1F1B schedule needs at least as many micro-batches as pipeline stages: microbatches "
                f"{self.microbatches} < pp {dims.pp}; raise global_batch_size / micro_batch_size or use GPipe"
            )
        if self.sequence_parallel and dims.tp == 1:
            raise ConfigError("sequence_parallel needs tensor_model_parallel_size > 1; set it to false for tp=1")
        if self.data_parallel == "ddp" and dims.pp > 1 and dims.dp > 1:
            # Measured with torch 2.13: the pipeline's first-step shape inference breaks DDP's gradient buckets.
            raise ConfigError(
                "data_parallel 'ddp' (use_distributed_optimizer: false) is not supported with pipeline parallelism; "
                "use 'fsdp' (use_distributed_optimizer: true) with pp > 1"
            )
        if self.data_parallel == "ddp" and dims.tp > 1:
            raise ConfigError(
                "data_parallel 'ddp' (use_distributed_optimizer: false) does not take tensor-parallel DTensors; "
                "use 'fsdp' (use_distributed_optimizer: true) with tp > 1"
            )


def parallelize(
    model: DiMOOModel, dims: ParallelDims, mesh: DeviceMesh | None, options: ParallelOptions, device: torch.device
) -> ParallelModel:
    """Apply ``dims``/``options`` to ``model`` in place and return the wrapper the trainer drives.

    Every rank passes an identical full model (same seed or same weights). A model on the meta device stays
    there (FSDP and TP only, not DDP): ``to_empty`` the parts, then load weights. A pipeline rank keeps only its
    stage's modules. Call `DiMOOModel.use_ops` before, not after (TP norms wrap their op).
    """
    dims.validate(model.config, 1 if mesh is None else mesh.size())
    options.validate(dims)
    if dims.pp > 1:
        counts = stage_layer_counts(model.config.n_layers, dims.pp, options.pipeline_num_layers)
        split_stage(model, mesh.get_local_rank("pp"), counts)
    if not any(p.is_meta for p in model.parameters()):
        model.to(device)
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], options.sequence_parallel)
    apply_recompute(model, options.recompute)
    part: nn.Module = model
    if mesh is not None and options.data_parallel == "fsdp":
        apply_fsdp(model, mesh["dp"], options.param_dtype, options.reduce_dtype, reshard_after_forward=dims.pp == 1)
    elif dims.dp > 1:
        part = apply_ddp(model, mesh["dp"])
    return ParallelModel(part, dims, mesh, options, device)


class ParallelModel:
    """The model part this rank owns, with one optimizer step's forward/backward and gradient clipping."""

    def __init__(self, part: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None, options: ParallelOptions, device):
        self.parts: list[nn.Module] = [part]
        self.dims, self.mesh, self.options, self.device = dims, mesh, options, torch.device(device)
        self._step_loss: StepLoss | None = None
        self.stage = mesh.get_local_rank("pp") if dims.pp > 1 else 0  # this rank's pipeline stage
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
        part = self.parts[0]
        count = self.options.microbatches
        chunks = [t.chunk(count) if t is not None else [None] * count for t in (input_ids, labels, mask, positions)]
        losses = []
        for index, (ids, lab, msk, pos) in enumerate(zip(*chunks, strict=True)):
            last = index == count - 1
            no_sync = isinstance(part, DistributedDataParallel) and not last
            with part.no_sync() if no_sync else contextlib.nullcontext():
                loss = self._step_loss(part(ids, msk, positions=pos), lab)
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
        params = [p for part in self.parts for p in part.parameters() if p.grad is not None]
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

    def train(self) -> ParallelModel:
        for part in self.parts:
            part.train()
        return self

    def eval(self) -> ParallelModel:
        for part in self.parts:
            part.eval()
        return self


__all__ = ["ParallelModel", "ParallelOptions", "parallelize"]
