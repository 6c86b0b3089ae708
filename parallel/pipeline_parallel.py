"""Pipeline parallelism: the block stack split into stages, run by torch.distributed.pipelining schedules.

Layers per stage follow MindSpeed-MM's ``pipeline_num_layers``: an explicit list, or an even split (the first
stages take the remainder, since the last stage also carries the large vocabulary head).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from dimoo_npu.model import DiMOOModel
from dimoo_npu.utils.errors import ConfigError

SCHEDULES: dict[str, type[PipelineScheduleSingle]] = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe}


def stage_layer_counts(n_layers: int, stages: int, explicit: list[int] | None = None) -> list[int]:
    """Number of blocks of each stage: ``explicit`` checked, or an even split."""
    if explicit is not None:
        counts = [int(n) for n in explicit]
        if len(counts) != stages or sum(counts) != n_layers or min(counts) < 1:
            raise ConfigError(
                f"pipeline_num_layers {counts} must list {stages} positive layer counts (one per pipeline stage) "
                f"summing to the model's {n_layers} layers"
            )
        return counts
    base, extra = divmod(n_layers, stages)
    return [base + (1 if stage < extra else 0) for stage in range(stages)]


def split_stage(model: DiMOOModel, stage: int, counts: list[int]) -> DiMOOModel:
    """Keep in place only what stage ``stage`` runs: its blocks, plus the embedding (first) or head (last)."""
    start = sum(counts[:stage])
    keep = {str(i) for i in range(start, start + counts[stage])}
    tr = model.transformer
    for key in list(tr.blocks.keys()):
        if key not in keep:
            del tr.blocks[key]
    if stage > 0:
        tr.wte = None  # takes hidden states from the previous stage
    if stage < len(counts) - 1:
        tr.ln_f = None  # returns hidden states to the next stage
        tr.ff_out = None
    return model


def build_schedule(
    part: torch.nn.Module,
    stage: int,
    stages: int,
    device: torch.device,
    pp_group: dist.ProcessGroup,
    schedule: str,
    microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> PipelineScheduleSingle:
    """One stage per rank under GPipe or 1F1B. Gradients are not rescaled: ``loss_fn`` already normalises."""
    pipeline_stage = PipelineStage(part, stage, stages, device, group=pp_group)
    return SCHEDULES[schedule](pipeline_stage, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
