"""Data parallelism: FSDP2 (``fully_shard`` per block, then the root) or DDP."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from dimoo_npu.model import DiMOOModel


def apply_fsdp(
    model: DiMOOModel,
    dp_mesh: DeviceMesh,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype,
    reshard_after_forward: bool,
) -> DiMOOModel:
    """Shard parameters, gradients and optimizer state over ``dp_mesh`` (2-D with tensor parallel DTensors).

    Each block is its own unit, so only one block's full parameters exist at a time. Mixed precision casts
    the fp32 master weights to ``param_dtype`` for compute and reduces gradients in ``reduce_dtype``.
    Pipeline stages keep parameters gathered between micro-batches (``reshard_after_forward=False``).
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.transformer.blocks.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> DistributedDataParallel:
    """Replicate the model over ``dp_mesh``, all-reducing (averaging) gradients after the last micro-batch."""
    return DistributedDataParallel(model, process_group=dp_mesh.get_group())
