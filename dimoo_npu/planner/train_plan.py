"""Per-rank memory and step time of a training layout, from the model and run configs alone.

Memory of a rank (pipeline stage x tensor rank x data rank), in the order the parallel code creates it:

- parameters: the fp32 master shard each rank owns (FSDP2 chunks every tensor-parallel shard on dim 0 over the
  data-parallel ranks, so shards can be uneven), plus the bf16 copies FSDP gathers for compute: the root's and
  two blocks' (current and prefetched) without pipeline, every one of the stage's with it (pipeline stages keep
  parameters gathered between micro-batches);
- gradients: fp32 shards, plus, under pipeline parallelism, the gathered fp32 gradients FSDP accumulates over
  the micro-batches (the schedule turns gradient sync off until the last one);
- AdamW: exp_avg and exp_avg_sq in fp32 on the owned shard (the step counter lives on the host);
- activations: what one micro-batch keeps (`dimoo_npu.planner.activations`) times the micro-batches in flight
  (1F1B: pp - stage on stage ``stage``; GPipe: all; without pipeline: one), the stage inputs and outputs the
  schedule holds, one block's working set in backward, and the logits while the loss runs;
- buffers: the flat fp32 reduce-scatter input of the largest FSDP group, and a runtime reserve.

A LoRA run (``lora.rank``) holds the frozen base once in the compute dtype (bf16, or fp32 without ``bf16``), with
no gradients or AdamW states for it; the adapters (rank x in and out x rank per targeted projection) carry fp32
weights, gradients and AdamW states, and only they are reduce-scattered. Backward computes input gradients only
through the frozen weights (1 x forward instead of 2 x); activations are kept as for a full fine-tune.

Step time: FLOPs (2 per multiply-add; backward twice the forward; full recompute one more forward of the
blocks) at the accelerator's utilisation, plus tensor-parallel collectives (not overlapped), pipeline
point-to-point transfers and the bubble ((pp-1)/(m+pp-1)), plus the part of the data-parallel traffic that
compute does not hide, plus the AdamW update at HBM bandwidth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.parallel.pipeline_parallel import stage_layer_counts
from dimoo_npu.planner.activations import BLOCK, op_family, stage_activation_terms, working_set_terms
from dimoo_npu.planner.hardware import GIB, Accelerator

if TYPE_CHECKING:
    from dimoo_npu.parallel import ParallelDims, ParallelOptions
    from dimoo_npu.train.config import TrainConfig

ADAMW_BYTES_MOVED = 28  # fp32 param, grad, m, v read (16) and param, m, v written (12) per owned element


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as the model names it, its full shape, and the dim tensor parallelism shards (None: copied)."""

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None


def chunk_sizes(length: int, parts: int) -> list[int]:
    """Sizes ``torch.chunk`` (and so DTensor ``Shard`` and FSDP2) gives ``parts`` ranks; trailing ranks may get 0."""
    size = math.ceil(length / parts) if length else 0
    return [max(0, min(size, length - index * size)) for index in range(parts)]


def stage_parameters(config: DiMOOConfig, stage: int, stages: int) -> list[ParamSpec]:
    """The parameters pipeline stage ``stage`` keeps, with their tensor-parallel split (`parallel.tensor_parallel`)."""
    d, h, vocab = config.d_model, config.mlp_hidden_size, config.embedding_size
    counts = stage_layer_counts(config.n_layers, stages)
    start = sum(counts[:stage])
    prefix = "model.transformer"
    params = [ParamSpec(f"{prefix}.wte.weight", (vocab, d), 0)] if stage == 0 else []
    block = [
        ("attn_norm", (d,), None),
        ("q_proj", (d, d), 0),
        ("k_proj", (d, d), 0),
        ("v_proj", (d, d), 0),
        ("attn_out", (d, d), 1),
        ("ff_norm", (d,), None),
        ("ff_proj", (h, d), 0),
        ("up_proj", (h, d), 0),
        ("ff_out", (d, h), 1),
    ]
    for layer in range(start, start + counts[stage]):
        params += [ParamSpec(f"{prefix}.blocks.{layer}.{name}.weight", shape, dim) for name, shape, dim in block]
    if stage == stages - 1:
        params += [ParamSpec(f"{prefix}.ln_f.weight", (d,), None), ParamSpec(f"{prefix}.ff_out.weight", (vocab, d), 0)]
    return params


def adapter_parameters(specs: list[ParamSpec], rank: int, targets: tuple[str, ...]) -> list[ParamSpec]:
    """The LoRA A (rank x in) and B (out x rank) of every block projection among ``targets`` (tp is refused)."""
    adapters = []
    for spec in specs:
        parts = spec.name.split(".")
        if ".blocks." in spec.name and parts[-2] in targets:
            out, inner = spec.shape
            stem = spec.name.removesuffix(".weight")
            adapters += [ParamSpec(f"{stem}.lora_A.weight", (rank, inner), None)]
            adapters += [ParamSpec(f"{stem}.lora_B.weight", (out, rank), None)]
    return adapters


def local_shape(spec: ParamSpec, tp: int, tp_rank: int, dp: int, dp_rank: int, fsdp: bool) -> tuple[int, ...]:
    """The shape of this rank's piece: the tensor-parallel chunk, then (FSDP) its dim-0 chunk over data parallel."""
    shape = list(spec.shape)
    if spec.tp_dim is not None and tp > 1:
        shape[spec.tp_dim] = chunk_sizes(shape[spec.tp_dim], tp)[tp_rank]
    if fsdp:
        shape[0] = chunk_sizes(shape[0], dp)[dp_rank]
    return tuple(shape)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


@dataclass(frozen=True)
class Layout:
    """Parallel degrees and the options that change memory or time, as `plan_layout` accepted them."""

    tp: int
    pp: int
    dp: int
    micro_batch: int
    microbatches: int
    seq_length: int
    recompute: str
    sequence_parallel: bool
    fsdp: bool
    schedule: str
    bf16: bool
    lora_rank: int = 0  # 0: a full fine-tune
    lora_targets: tuple[str, ...] = ()

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.microbatches * self.dp

    def describe(self) -> str:
        data = "FSDP2" if self.fsdp else ("DDP" if self.dp > 1 else "one replica")
        sp = ", sequence parallel" if self.sequence_parallel else ""
        data += f", LoRA rank {self.lora_rank} on {len(self.lora_targets)} projections" if self.lora_rank else ""
        return (
            f"world {self.world} = pp {self.pp} x dp {self.dp} x tp {self.tp}; {self.microbatches} micro-batch(es) of "
            f"{self.micro_batch} x {self.seq_length} tokens per step (global batch {self.global_batch}); "
            f"{self.schedule if self.pp > 1 else 'no pipeline'}, recompute {self.recompute}{sp}, {data}"
        )


@dataclass
class RankPlan:
    rank: int
    stage: int
    tp_rank: int
    dp_rank: int
    memory: dict[str, float]  # bytes by term, in the order they are printed
    param_elements: int  # elements of this rank's parameter pieces (unpadded)

    @property
    def total(self) -> float:
        return sum(self.memory.values())

    in_flight: int = 1  # micro-batches whose activations this rank holds at once

    def largest(self) -> tuple[str, float]:
        name = max((k for k in self.memory if k != RESERVE), key=self.memory.__getitem__)
        return name, self.memory[name]


@dataclass
class StepPlan:
    compute_s: float  # slowest stage, one micro-batch: forward, backward, recompute
    tp_comm_s: float  # per micro-batch on the slowest stage
    pp_comm_s: float  # per micro-batch on the slowest stage
    microbatch_s: float
    pipeline_s: float  # all micro-batches, bubble included
    bubble_fraction: float
    dp_comm_s: float  # data-parallel traffic of the step
    dp_exposed_s: float  # the part compute does not hide
    optimizer_s: float
    step_s: float
    tokens_per_s: float
    mfu: float


RESERVE = "runtime reserve"
ACTIVATIONS = "activations kept (every micro-batch in flight)"
WORKING_SET = "backward working set (one block; logits at the loss)"


@dataclass
class TrainPlan:
    model: DiMOOConfig
    layout: Layout
    accelerator: Accelerator
    ranks: list[RankPlan]
    step: StepPlan
    activation_terms: dict[int, dict[str, float]]  # stage -> bytes one micro-batch keeps, by term
    assumptions: list[str] = field(default_factory=list)

    @property
    def worst(self) -> RankPlan:
        return max(self.ranks, key=lambda r: r.total)

    @property
    def fits(self) -> bool:
        return self.worst.total <= self.accelerator.memory_bytes

    def failure(self) -> str | None:
        """One line naming the rank that does not fit, its largest term and the knob that shrinks it."""
        if self.fits:
            return None
        worst = self.worst
        name, size = worst.largest()
        return (
            f"rank {worst.rank} (stage {worst.stage}, tp rank {worst.tp_rank}, dp rank {worst.dp_rank}) needs "
            f"{worst.total / GIB:.1f} GiB of the {self.accelerator.name}'s {self.accelerator.memory_bytes / GIB:.1f} "
            f"GiB: the largest term is {name} ({size / GIB:.1f} GiB); {fix_for(name, self.layout, self.model)}; "
            "`--sweep` lists the layouts that fit"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": asdict(self.layout),
            "accelerator": self.accelerator.to_dict(),
            "fits": self.fits,
            "worst_rank": self.worst.rank,
            "ranks": [{**asdict(rank), "total": rank.total} for rank in self.ranks],
            "activations_per_microbatch": {str(k): v for k, v in self.activation_terms.items()},
            "step": asdict(self.step),
            "assumptions": self.assumptions,
            "failure": self.failure(),
        }


def fix_for(term: str, layout: Layout, model: DiMOOConfig) -> str:
    """The config change that shrinks ``term`` most directly, given what the layout already does."""
    if term in (ACTIVATIONS, WORKING_SET):
        if layout.recompute != "full":
            return "set gpt_args.recompute_granularity: full (keeps one block input per layer)"
        if layout.micro_batch > 1:
            return "lower gpt_args.micro_batch_size"
        if layout.tp > 1 and not layout.sequence_parallel:
            return "set gpt_args.sequence_parallel: true"
        if layout.pp > 1 and layout.schedule == "GPipe":
            return "use pipeline_schedule: 1F1B (at most pp micro-batches in flight)"
        return "raise gpt_args.tensor_model_parallel_size, or shorten data.seq_length"
    if term.startswith("logits"):
        return "raise gpt_args.tensor_model_parallel_size (splits the vocabulary) or lower micro_batch_size"
    if "gathered" in term or "reduce-scatter" in term:
        return "raise gpt_args.tensor_model_parallel_size or pipeline_model_parallel_size (smaller stage copies)"
    if not layout.fsdp:
        return "set gpt_args.use_distributed_optimizer: true (FSDP2 shards weights, grads and AdamW over dp)"
    return "use more ranks (a larger dp shards further) or raise tensor/pipeline parallel sizes"


def plan_training(model: DiMOOConfig, layout: Layout, accelerator: Accelerator, every_rank: bool = True) -> TrainPlan:
    """The plan of ``layout``: every rank (``every_rank``), or only each stage's first rank, the largest one
    (chunks are largest at rank 0 of every dimension), which is what a sweep needs."""
    family = op_family("npu" if accelerator.name == "910b" else "cuda")
    tokens = layout.micro_batch * layout.seq_length
    stages = range(layout.pp)
    specs = {stage: stage_parameters(model, stage, layout.pp) for stage in stages}
    counts = stage_layer_counts(model.n_layers, layout.pp)
    activation = {
        stage: stage_activation_terms(
            model, tokens, counts[stage], layout.tp, layout.sequence_parallel, layout.recompute, family,
            stage == layout.pp - 1,
        )
        for stage in stages
    }  # fmt: skip
    if not layout.bf16:  # fp32 compute: the bf16 parts double (an overestimate for the parts already fp32)
        activation = {stage: {k: 2 * v for k, v in terms.items()} for stage, terms in activation.items()}
    ranks = []
    for stage in stages:
        for dp_rank in range(layout.dp if every_rank else 1):
            for tp_rank in range(layout.tp if every_rank else 1):
                rank = (stage * layout.dp + dp_rank) * layout.tp + tp_rank
                ranks.append(
                    _rank_memory(model, layout, accelerator, family, specs[stage], activation[stage], stage,
                                 tp_rank, dp_rank, rank)
                )  # fmt: skip
    step = _step_time(model, layout, accelerator, family, specs, counts, ranks)
    return TrainPlan(model, layout, accelerator, ranks, step, activation, assumptions(layout, accelerator, family))


def _in_flight(layout: Layout, stage: int) -> int:
    if layout.pp == 1:
        return 1
    if layout.schedule == "GPipe":
        return layout.microbatches
    return min(layout.pp - stage, layout.microbatches)


def _rank_memory(
    model: DiMOOConfig,
    layout: Layout,
    accelerator: Accelerator,
    family: str,
    specs: list[ParamSpec],
    activation: dict[str, float],
    stage: int,
    tp_rank: int,
    dp_rank: int,
    rank: int,
) -> RankPlan:
    tp, dp = layout.tp, layout.dp
    owned = sum(_numel(local_shape(s, tp, tp_rank, dp, dp_rank, layout.fsdp)) for s in specs)
    # Gathered over data parallel, per FSDP group: one per block, the root holds the rest (wte, ln_f, head).
    groups: dict[str, int] = {}
    for spec in specs:
        key = spec.name.split(".")[3] if ".blocks." in spec.name else "root"
        groups[key] = groups.get(key, 0) + _numel(local_shape(spec, tp, tp_rank, 1, 0, False))
    gathered = sum(groups.values())
    block = max((v for k, v in groups.items() if k != "root"), default=0)
    largest_group = max(groups.values())
    compute_bytes = 2 if layout.bf16 else 4
    memory: dict[str, float] = {}
    if layout.lora_rank:
        trained = _lora_memory(memory, layout, specs, owned, groups, block, tp_rank, dp_rank)
    elif layout.fsdp and layout.world > 1:
        memory["weights fp32 (owned shard)"] = 4 * owned
        held = gathered if layout.pp > 1 else groups.get("root", 0) + min(2, len(groups) - ("root" in groups)) * block
        memory["weights gathered for compute"] = compute_bytes * held
        memory["grads fp32 (owned shard)"] = 4 * owned
        if layout.pp > 1:
            memory["grads gathered, accumulated over micro-batches"] = 4 * gathered
        memory["AdamW m, v fp32 (owned shard)"] = 8 * owned
        memory["reduce-scatter buffer"] = (4 if layout.pp > 1 else 4 + compute_bytes) * largest_group
    else:
        memory["weights fp32"] = 4 * owned
        if layout.bf16:
            memory["weights bf16 (autocast copies)"] = 2 * owned
        memory["grads fp32"] = 4 * owned
        if dp > 1:
            memory["DDP gradient buckets"] = 4 * owned
        memory["AdamW m, v fp32"] = 8 * owned
    in_flight = _in_flight(layout, stage)
    memory[ACTIVATIONS] = in_flight * sum(activation.values())
    if layout.pp > 1:
        residual = compute_bytes * layout.micro_batch * layout.seq_length * model.d_model
        residual /= tp if layout.sequence_parallel else 1
        ends = (stage > 0) + (stage < layout.pp - 1)  # received input, sent output
        memory["pipeline stage inputs/outputs"] = ends * (in_flight + 1) * residual
    working = working_set_terms(
        model, layout.micro_batch * layout.seq_length, tp, layout.sequence_parallel, family, stage == layout.pp - 1
    )
    memory[WORKING_SET] = sum(working.values()) * compute_bytes / 2
    memory[RESERVE] = accelerator.reserve_gib * GIB
    return RankPlan(rank, stage, tp_rank, dp_rank, memory, trained if layout.lora_rank else owned, in_flight)


def _lora_memory(
    memory: dict[str, float],
    layout: Layout,
    specs: list[ParamSpec],
    owned: int,
    groups: dict[str, int],
    block: int,
    tp_rank: int,
    dp_rank: int,
) -> int:
    """The weight, gradient and optimizer terms of a LoRA rank into ``memory``; returns its trained elements."""
    compute_bytes = 2 if layout.bf16 else 4
    dtype = "bf16" if layout.bf16 else "fp32"
    adapters = adapter_parameters(specs, layout.lora_rank, layout.lora_targets)
    trained = sum(_numel(local_shape(s, layout.tp, tp_rank, layout.dp, dp_rank, layout.fsdp)) for s in adapters)
    sharded = layout.fsdp and layout.world > 1
    memory[f"frozen base {dtype}{' (owned shard)' if sharded else ''}"] = compute_bytes * owned
    if sharded:
        held = groups.get("root", 0) + min(2, len(groups) - ("root" in groups)) * block
        memory["weights gathered for compute"] = compute_bytes * held
    memory["LoRA adapters fp32"] = 4 * trained
    memory["LoRA grads fp32"] = 4 * trained
    memory["LoRA AdamW m, v fp32"] = 8 * trained
    if sharded:
        per_block: dict[str, int] = {}
        for spec in adapters:
            per_block[spec.name.split(".")[3]] = per_block.get(spec.name.split(".")[3], 0) + _numel(spec.shape)
        memory["reduce-scatter buffer"] = (4 + compute_bytes) * max(per_block.values(), default=0)
    elif layout.bf16:
        memory["LoRA adapters bf16 (autocast copies)"] = 2 * trained
    return trained


def stage_flops_per_token(model: DiMOOConfig, layers: int, last: bool, seq_length: int) -> tuple[float, float]:
    """(forward FLOPs of the blocks, forward FLOPs of the head) per token on a whole (unsplit) stage."""
    d, h = model.d_model, model.mlp_hidden_size
    blocks = layers * (2 * (4 * d * d + 3 * d * h) + 4 * seq_length * d)
    return blocks, (2 * d * model.embedding_size if last else 0.0)


def _step_time(
    model: DiMOOConfig,
    layout: Layout,
    accelerator: Accelerator,
    family: str,
    specs: dict[int, list[ParamSpec]],
    counts: list[int],
    ranks: list[RankPlan],
) -> StepPlan:
    from dimoo_npu.train.metrics import flops_per_token

    tp, pp, dp, m = layout.tp, layout.pp, layout.dp, layout.microbatches
    tokens = layout.micro_batch * layout.seq_length
    rate = accelerator.peak_tflops * 1e12 * accelerator.utilisation
    act_bytes = 2 * tokens * model.d_model  # one activation of the residual stream, bf16, full sequence
    tp_link = accelerator.link_gbps(tp) * 1e9
    pp_link = accelerator.link_gbps(2 * dp * tp) * 1e9
    per_stage = []
    for stage in range(pp):
        blocks, head = stage_flops_per_token(model, counts[stage], stage == pp - 1, layout.seq_length)
        forward = (blocks + head) * tokens / tp
        recompute = blocks * tokens / tp if layout.recompute == "full" else 0.0
        backward = 1 if layout.lora_rank else 2  # frozen weights: input gradients only
        compute = ((1 + backward) * forward + recompute) / rate
        if layout.recompute == "selective":  # elementwise ops rerun: what they did not keep, written and read
            dropped = BLOCK[family, "none"].bytes_per_token(model, tp, layout.sequence_parallel)
            dropped -= BLOCK[family, "selective"].bytes_per_token(model, tp, layout.sequence_parallel)
            compute += counts[stage] * tokens * max(dropped, 0.0) * 2 / (accelerator.hbm_tbps * 1e12)
        passes = 2 + (layout.recompute == "full")
        layers = counts[stage] + 0.5 * (stage == 0) + (stage == pp - 1)  # embedding, final norm + head
        tp_comm = 0.0 if tp == 1 else layers * passes * 4 * (tp - 1) / tp * act_bytes / tp_link
        residual = act_bytes / (tp if layout.sequence_parallel else 1)
        pp_comm = 0.0 if pp == 1 else ((stage > 0) + (stage < pp - 1)) * residual / pp_link
        per_stage.append((compute, tp_comm, pp_comm, forward / rate))
    compute, tp_comm, pp_comm, forward_s = max(per_stage, key=lambda t: t[0] + t[1] + t[2])
    microbatch = compute + tp_comm + pp_comm
    pipeline = (m + pp - 1) * microbatch
    bubble = (pp - 1) / (m + pp - 1)
    gathered = max(sum(_numel(local_shape(s, tp, 0, 1, 0, False)) for s in stage) for stage in specs.values())
    dp_link = accelerator.link_gbps(dp * tp) * 1e9
    share = (dp - 1) / dp
    compute_bytes = 2 if layout.bf16 else 4
    if dp == 1:
        dp_comm = exposed = 0.0
    elif not layout.fsdp:  # DDP: one fp32 all-reduce, overlapped with the last backward
        dp_comm = 2 * share * 4 * gathered / dp_link
        exposed = max(0.0, dp_comm - (compute - forward_s))
    elif pp > 1:  # gather once (hidden behind the first forward), reduce-scatter once after the last backward
        gather, scatter = share * compute_bytes * gathered / dp_link, share * 4 * gathered / dp_link
        dp_comm, exposed = gather + scatter, max(0.0, gather - forward_s) + scatter
    else:  # every micro-batch gathers (forward, backward) and reduce-scatters, overlapped block by block
        per_micro = share * (2 * compute_bytes + 4) * gathered / dp_link
        dp_comm, exposed = m * per_micro, m * max(0.0, per_micro - compute)
    owned = max(rank.param_elements for rank in ranks)
    optimizer = owned * ADAMW_BYTES_MOVED / (accelerator.hbm_tbps * 1e12)
    step = pipeline + exposed + optimizer
    step_tokens = layout.global_batch * layout.seq_length
    model_flops = flops_per_token(model, layout.seq_length) * step_tokens
    mfu = model_flops / (step * layout.world * accelerator.peak_tflops * 1e12)
    return StepPlan(
        compute, tp_comm, pp_comm, microbatch, pipeline, bubble, dp_comm, exposed, optimizer, step,
        step_tokens / step, mfu,
    )  # fmt: skip


def assumptions(layout: Layout, accelerator: Accelerator, family: str) -> list[str]:
    source = "measured on CPU" if family == "torch" else "derived from the fused npu kernels, not measured"
    return [
        *accelerator.assumptions(),
        f"activation bytes: {family} kernels ({source}); every position labelled (the loss keeps fp32 "
        "log-probabilities of all of them)",
        "tensor-parallel collectives are not overlapped with compute; pipeline transfers are not either",
        "FSDP traffic overlaps compute block by block; with a pipeline, the final reduce-scatter is exposed",
        "step FLOPs: 2 per multiply-add, backward = 2 x forward, full recompute adds one forward of the blocks, "
        "selective recompute rewrites and rereads at HBM bandwidth what it did not keep; "
        "attention is bidirectional over the whole data.seq_length (4 x seq x d_model per token per layer)",
        f"AdamW update: {ADAMW_BYTES_MOVED} bytes moved per owned parameter at HBM bandwidth",
        *(
            [
                "LoRA: backward = 1 x forward (no weight gradients for the frozen base); MFU counts a full fine-tune's "
                "FLOPs per token, so it reads high"
            ]
            if layout.lora_rank
            else []
        ),
    ]


def layout_of(config: TrainConfig, dims: ParallelDims, options: ParallelOptions, model: DiMOOConfig) -> Layout:
    """The planner's view of a run config that `dimoo_npu.train.layout.plan_layout` accepted."""
    g = config.gpt_args
    return Layout(
        tp=dims.tp,
        pp=dims.pp,
        dp=dims.dp,
        micro_batch=g.micro_batch_size,
        microbatches=options.microbatches,
        seq_length=config.data.seq_length or model.max_sequence_length,
        recompute=options.recompute,
        sequence_parallel=options.sequence_parallel,
        fsdp=options.data_parallel == "fsdp" and dims.world_size > 1,
        schedule=config.pipeline_schedule,
        bf16=g.bf16,
        lora_rank=config.lora.rank or 0,
        lora_targets=tuple(config.lora.target_modules) if config.lora.enabled else (),
    )
