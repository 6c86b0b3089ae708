"""Tensor (and sequence) parallelism as DTensor plans applied to the plain model from outside.

Megatron's split, expressed with `parallelize_module`:
- q/k/v and the MLP gate/up projections are column-wise (each rank owns whole heads / MLP columns, outputs
  local), attention ``attn_out`` and MLP ``ff_out`` are row-wise (partial sums reduced at the output);
- the embedding is vocabulary-parallel (row-wise on the table) and the head column-wise, leaving the logits
  sharded on the vocabulary, for `loss_parallel`;
- every RMSNorm gets a replicated DTensor weight and hands *local* tensors to the op, so fused kernels never
  see a DTensor; its output is a replicated DTensor, so q/k/v (and gate/up) share one backward collective.
With sequence parallelism the residual stream is sharded on the sequence dim between blocks: row-wise outputs
reduce-scatter, each norm normalises its slice and all-gathers, and the norm weights' gradients are partial
sums that FSDP reduces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from dimoo_npu.model import DiMOOModel, RMSNorm

SEQUENCE_DIM = 1


def _local_rms_norm(op: Callable, out_layout: Placement, weight_grad: Placement) -> Callable:
    """``op`` run on local tensors: the DTensor weight goes in as its local copy, the output comes back a DTensor.

    Not `local_map`: it waits on async collective inputs with a non-differentiable ``wait()``, which cuts the
    gradient of whatever produced them (pytorch/pytorch#151240). A pending collective here is waited on by
    the op's first use instead, and the kernel still receives plain tensors.
    """

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not isinstance(weight, DTensor):
            return op(x, weight, eps)
        out = op(x, weight.to_local(grad_placements=(weight_grad,)), eps)
        return DTensor.from_local(out, weight.device_mesh, (out_layout,), run_check=False)

    return rms_norm


class NormParallel(ParallelStyle):
    """RMSNorm under TP: a replicated DTensor weight, the op on local tensors, a replicated DTensor out.

    Without sequence parallelism the input is the full (replicated) residual stream. With it, the input is
    this rank's sequence slice: the weight gradient computed on a slice is a partial sum (``Partial``,
    reduced by FSDP), and the output is all-gathered along the sequence. The replicated DTensor output lets
    the column-parallel projections that read it share one backward reduction.
    """

    def __init__(self, sequence_parallel: bool):
        super().__init__()
        self.local_layout: Placement = Shard(SEQUENCE_DIM) if sequence_parallel else Replicate()
        self.weight_grad: Placement = Partial() if sequence_parallel else Replicate()

    @staticmethod
    def _prepare_output(module: nn.Module, output: DTensor, mesh: DeviceMesh) -> DTensor:
        return output.redistribute(mesh, (Replicate(),))

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, RMSNorm):
            raise TypeError(f"NormParallel applies to RMSNorm, not {type(module).__name__}")
        local_op = _local_rms_norm(module.ops.rms_norm, self.local_layout, self.weight_grad)
        module.ops = dataclasses.replace(module.ops, rms_norm=local_op)
        return distribute_module(module, device_mesh, output_fn=self._prepare_output)  # weight replicated


def _block_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    residual = Shard(SEQUENCE_DIM) if sequence_parallel else Replicate()
    column = ColwiseParallel()  # Replicate in (the norm's DTensor), local head / column slice out
    row = RowwiseParallel(output_layouts=residual)  # local slice in, residual layout out (local)
    return {
        "attn_norm": NormParallel(sequence_parallel),
        "q_proj": column,
        "k_proj": column,
        "v_proj": column,
        "attn_out": row,
        "ff_norm": NormParallel(sequence_parallel),
        "ff_proj": column,
        "up_proj": column,
        "ff_out": row,
    }


def _model_plan(model: DiMOOModel, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Styles for the embedding / final norm / head this (possibly pipeline-split) model still owns."""
    tr = model.transformer
    residual = Shard(SEQUENCE_DIM) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {}
    if tr.wte is not None:
        plan["wte"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if tr.ln_f is not None:
        plan["ln_f"] = NormParallel(sequence_parallel)
    if tr.ff_out is not None:
        # The model applies the head as F.linear(x, ff_out.weight), so only the weight sharding matters:
        # replicated hidden states times a vocabulary-sharded weight give vocabulary-sharded logits.
        plan["ff_out"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    return plan


def apply_tp(model: DiMOOModel, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> DiMOOModel:
    """Shard ``model`` in place over ``tp_mesh``; the returned logits are a DTensor sharded on the vocabulary.

    Call `DiMOOModel.use_ops` before this, not after: the norms keep a DTensor-aware wrapper of their op.
    """
    tr = model.transformer
    parallelize_module(tr, tp_mesh, _model_plan(model, sequence_parallel))
    for block in tr.blocks.values():
        parallelize_module(block, tp_mesh, _block_plan(sequence_parallel))
    return model
