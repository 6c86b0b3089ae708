"""Compose parallelism onto a plain `DiMOOModel` in a fixed order (torchtitan's):
pipeline split -> tensor parallel -> recompute -> (compile: not here) -> FSDP/DDP.

This module transforms a model; it does not validate layouts (`dimoo_npu.train.layout.plan_layout` does) and does
not train (`dimoo_npu.train.step.TrainStep` runs the forward/backward of a step on what it returns).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from dimoo_npu.model import DiMOOModel
from dimoo_npu.parallel.data_parallel import apply_ddp, apply_fsdp
from dimoo_npu.parallel.mesh import ParallelDims, pipeline_stage
from dimoo_npu.parallel.pipeline_parallel import split_stage, stage_layer_counts
from dimoo_npu.parallel.recompute import apply_recompute
from dimoo_npu.parallel.tensor_parallel import apply_tp


@dataclass
class ParallelOptions:
    """How the parallel degrees are used (MindSpeed-MM names in brackets).

    sequence_parallel [sequence_parallel]: shard the residual stream on the sequence between TP regions.
    recompute [recompute_granularity]: "none", "selective" (elementwise ops only) or "full" (whole blocks).
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


def parallelize(
    model: DiMOOModel, dims: ParallelDims, mesh: DeviceMesh | None, options: ParallelOptions, device: torch.device
) -> nn.Module:
    """Apply ``dims``/``options`` to ``model`` in place; return the module this rank runs.

    That is its pipeline stage of the model (the whole model without pipeline parallelism), wrapped in
    `DistributedDataParallel` under DDP. Every rank passes an identical full model (same seed or same weights).
    A model on the meta device stays there (FSDP and TP only; `plan_layout` refuses DDP for it): ``to_empty``
    the result, then load weights. Call `DiMOOModel.use_ops` before, not after (TP norms wrap their op).
    """
    if dims.pp > 1:
        counts = stage_layer_counts(model.config.n_layers, dims.pp, options.pipeline_num_layers)
        split_stage(model, pipeline_stage(dims, mesh), counts)
    if not any(p.is_meta for p in model.parameters()):
        model.to(device)
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], options.sequence_parallel)
    apply_recompute(model, options.recompute)
    if mesh is not None and options.data_parallel == "fsdp":
        return apply_fsdp(
            model, mesh["dp"], options.param_dtype, options.reduce_dtype, reshard_after_forward=dims.pp == 1
        )
    if dims.dp > 1:
        return apply_ddp(model, mesh["dp"])
    return model


__all__ = ["ParallelOptions", "parallelize"]
