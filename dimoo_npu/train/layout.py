"""From a run config and a world size to parallel degrees and options, refusing what cannot run.

`plan_layout` holds every layout rule (degrees, widths, batch split, schedule, sequence and data parallelism);
`dimoo_npu.parallel` applies its answer unchecked. Every check runs before a process group, a model or a batch
exists, so a wrong config costs seconds, not a queued cluster job. Degrees follow Megatron: dp = world / (tp * pp);
the per-step micro-batch count is global_batch / (micro_batch * dp).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch

from dimoo_npu.model import DiMOOModel
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.modeling.presets import preset_config
from dimoo_npu.parallel import ParallelDims, ParallelOptions
from dimoo_npu.parallel.pipeline_parallel import SCHEDULES
from dimoo_npu.parallel.recompute import RECOMPUTE_MODES
from dimoo_npu.quantization import refuse_quantized
from dimoo_npu.train.config import TrainConfig, check_choice
from dimoo_npu.train.lora import check_targets
from dimoo_npu.utils.errors import ConfigError

logger = logging.getLogger(__name__)


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
        model = DiMOOConfig.from_json(config.model.init_from)
        refuse_quantized(model, config.model.init_from, "training (model.init_from)")
        return model
    if config.model.preset is not None:
        return preset_config(config.model.preset)
    return DiMOOConfig.from_dict({"model_type": "llada", **config.model.config})


def plan_layout(config: TrainConfig, model: DiMOOConfig, world_size: int) -> tuple[ParallelDims, ParallelOptions]:
    """Parallel degrees and options for ``world_size`` processes; `ConfigError` naming the fix otherwise.

    The one place that checks a layout: `dimoo_npu.parallel` applies what this returns without checking it.
    """
    g = config.gpt_args
    tp, pp = g.tensor_model_parallel_size, g.pipeline_model_parallel_size
    check_choice("gpt_args.recompute_granularity", config.recompute, RECOMPUTE_MODES)
    check_choice("pipeline_schedule", config.pipeline_schedule, tuple(SCHEDULES))
    for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
        if value < 1:
            raise ConfigError(f"gpt_args.{name} is {value}; it must be at least 1")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not a multiple of tensor_model_parallel_size * pipeline_model_parallel_size"
            f" = {tp}*{pp}: launch a multiple of {tp * pp} processes, or change tp/pp"
        )
    dims = ParallelDims(pp=pp, dp=world_size // (tp * pp), tp=tp)
    _check_lora(config, dims, model)
    _check_model_split(dims, model)
    per_pass = g.micro_batch_size * dims.dp
    if g.global_batch_size % per_pass:
        raise ConfigError(
            f"global_batch_size {g.global_batch_size} is not divisible by micro_batch_size * dp = "
            f"{g.micro_batch_size}*{dims.dp} = {per_pass}: make it a multiple of {per_pass}"
        )
    microbatches = g.global_batch_size // per_pass
    if pp > 1 and config.pipeline_schedule == "1F1B" and microbatches < pp:
        raise ConfigError(
            f"the 1F1B schedule needs at least as many micro-batches as pipeline stages: microbatches "
            f"{microbatches} < pp {pp}; raise global_batch_size / micro_batch_size or use GPipe"
        )
    _check_sequence(config, dims)
    _check_data_parallel(config, dims)
    options = ParallelOptions(
        sequence_parallel=g.sequence_parallel,
        recompute=config.recompute,
        data_parallel="fsdp" if g.use_distributed_optimizer else "ddp",
        microbatches=microbatches,
        pp_schedule=config.pipeline_schedule,
        param_dtype=torch.bfloat16 if g.bf16 else None,
        reduce_dtype=torch.float32,
    )
    return dims, options


def _check_lora(config: TrainConfig, dims: ParallelDims, model: DiMOOConfig) -> None:
    """LoRA runs on one device or FSDP2 data parallel (not tensor or pipeline parallel), on targets the blocks have."""
    if not config.lora.enabled:
        return
    with torch.device("meta"):
        check_targets(DiMOOModel(dataclasses.replace(model, n_layers=1)), config.lora.target_modules)
    ddp = dims.dp > 1 and not config.gpt_args.use_distributed_optimizer
    if dims.tp > 1 or dims.pp > 1 or ddp:
        raise ConfigError(
            f"LoRA runs on one device or FSDP2 data parallel only (got tp {dims.tp}, pp {dims.pp}, dp {dims.dp}"
            f"{' with DDP' if ddp else ''}): set tensor_model_parallel_size and pipeline_model_parallel_size to 1 "
            "and use_distributed_optimizer: true"
        )


def _check_model_split(dims: ParallelDims, model: DiMOOConfig) -> None:
    """Tensor parallelism splits heads and MLP columns evenly; every pipeline stage needs a layer."""
    widths = {"n_heads": model.n_heads, "d_model": model.d_model, "mlp_hidden_size": model.mlp_hidden_size}
    for name, width in widths.items():
        if width % dims.tp:
            common = math.gcd(*widths.values())
            divisors = [d for d in range(1, common + 1) if common % d == 0]
            raise ConfigError(
                f"tensor_model_parallel_size {dims.tp} does not divide the model's {name} ({width}): "
                f"tensor parallelism splits heads and MLP columns evenly; choose tp among {divisors}"
            )
    if dims.pp > model.n_layers:
        raise ConfigError(
            f"pipeline_model_parallel_size {dims.pp} is larger than the model's {model.n_layers} layers: "
            f"every stage needs at least one layer; use at most {model.n_layers}"
        )


def _check_sequence(config: TrainConfig, dims: ParallelDims) -> None:
    """Pipeline and sequence parallelism need fixed-shape batches; sequence parallelism splits them over tp."""
    seq_length = config.data.seq_length
    if dims.pp > 1 and seq_length is None:
        raise ConfigError(
            "pipeline parallelism needs fixed-shape batches: set data.seq_length (at least the "
            "longest pre-tokenized sample)"
        )
    if config.gpt_args.sequence_parallel and dims.tp == 1:
        # Megatron-LM's convention, which MindSpeed follows: without tensor parallelism there is nothing to shard.
        logger.warning("sequence_parallel has no effect with tensor_model_parallel_size 1: turned off")
        config.gpt_args.sequence_parallel = False
    if not config.gpt_args.sequence_parallel:
        return
    if seq_length is None:
        raise ConfigError("sequence_parallel needs fixed-shape batches: set data.seq_length (a multiple of tp)")
    if seq_length % dims.tp:
        raise ConfigError(f"sequence_parallel needs data.seq_length ({seq_length}) divisible by tp {dims.tp}")


def _check_data_parallel(config: TrainConfig, dims: ParallelDims) -> None:
    """DDP (use_distributed_optimizer: false) replicates plain tensors of real weights, one stage per rank."""
    if config.gpt_args.use_distributed_optimizer:
        return
    ddp, fix = "data_parallel 'ddp' (use_distributed_optimizer: false)", "use_distributed_optimizer: true (FSDP2)"
    if dims.tp > 1:
        raise ConfigError(f"{ddp} does not take tensor-parallel DTensors: {fix} with tp > 1")
    if dims.dp == 1:
        return
    if dims.pp > 1:
        # Measured with torch 2.13: the pipeline's first-step shape inference breaks DDP's gradient buckets.
        raise ConfigError(f"{ddp} is not supported with pipeline parallelism: {fix} with pp > 1")
    if config.model.init_from is not None:
        raise ConfigError(
            f"{ddp} cannot start from model.init_from at dp {dims.dp}: the model is built on the meta device and DDP "
            f"broadcasts real weights when it wraps it; {fix}, or a single data-parallel rank"
        )
