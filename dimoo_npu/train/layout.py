"""From a run config and a world size to parallel degrees and options, refusing what cannot run.

Every check here runs before a process group, a model or a batch exists, so a wrong config costs
seconds, not a queued cluster job. Degrees follow Megatron: dp = world / (tp * pp); the per-step
micro-batch count is global_batch / (micro_batch * dp).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dimoo_npu.config import DiMOOConfig
from dimoo_npu.errors import ConfigError
from dimoo_npu.parallel import ParallelDims, ParallelOptions
from dimoo_npu.presets import preset_config
from dimoo_npu.train.config import TrainConfig


def model_config_of(config: TrainConfig, planning: bool = False) -> DiMOOConfig:
    """The model's config: ``init_from``'s config.json, else ``model.preset``, else the ``model.config`` dict.

    When ``planning`` (--check, --plan), a preset stands in for an ``init_from`` folder that is not here, so a
    cluster can be planned from a laptop; a run itself still needs the folder."""
    if config.model.init_from is not None:
        if planning and config.model.preset is not None and not Path(config.model.init_from).is_dir():
            return preset_config(config.model.preset)
        if not Path(config.model.init_from).is_dir():
            raise ConfigError(
                f"model.init_from {config.model.init_from} is not a folder: point it at a Hugging Face "
                "checkpoint folder (config.json + *.safetensors); --check/--plan without it need model.preset "
                "(e.g. lumina-dimoo-8b)"
            )
        return DiMOOConfig.from_json(config.model.init_from)
    if config.model.preset is not None:
        return preset_config(config.model.preset)
    return DiMOOConfig.from_dict({"model_type": "llada", **config.model.config})


def plan_layout(config: TrainConfig, model: DiMOOConfig, world_size: int) -> tuple[ParallelDims, ParallelOptions]:
    """Parallel degrees and options for ``world_size`` processes; `ConfigError` naming the fix otherwise."""
    g = config.gpt_args
    tp, pp = g.tensor_model_parallel_size, g.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not a multiple of tensor_model_parallel_size * pipeline_model_parallel_size"
            f" = {tp}*{pp}: launch a multiple of {tp * pp} processes, or change tp/pp"
        )
    dims = ParallelDims(pp=pp, dp=world_size // (tp * pp), tp=tp)
    dims.validate(model, world_size)
    per_pass = g.micro_batch_size * dims.dp
    if g.global_batch_size % per_pass:
        raise ConfigError(
            f"global_batch_size {g.global_batch_size} is not divisible by micro_batch_size * dp = "
            f"{g.micro_batch_size}*{dims.dp} = {per_pass}: make it a multiple of {per_pass}"
        )
    seq_length = config.data.seq_length
    if pp > 1 and seq_length is None:
        raise ConfigError(
            "pipeline parallelism needs fixed-shape batches: set data.seq_length (at least the "
            "longest pre-tokenized sample)"
        )
    if g.sequence_parallel and seq_length is not None and seq_length % tp:
        raise ConfigError(f"sequence_parallel needs data.seq_length ({seq_length}) divisible by tp {tp}")
    if g.sequence_parallel and seq_length is None:
        raise ConfigError("sequence_parallel needs fixed-shape batches: set data.seq_length (a multiple of tp)")
    options = ParallelOptions(
        sequence_parallel=g.sequence_parallel,
        recompute=config.recompute,
        data_parallel="fsdp" if g.use_distributed_optimizer else "ddp",
        microbatches=g.global_batch_size // per_pass,
        pp_schedule=config.pipeline_schedule,
        param_dtype=torch.bfloat16 if g.bf16 else None,
        reduce_dtype=torch.float32,
    )
    options.validate(dims)
    return dims, options
