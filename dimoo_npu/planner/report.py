"""Plain-text views of training plans (one layout, or a sweep) for the terminal."""

from __future__ import annotations

from dimoo_npu.planner.hardware import GIB
from dimoo_npu.planner.train_plan import RankPlan, TrainPlan


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def stage_worst(plan: TrainPlan) -> list[RankPlan]:
    """The rank with the largest total of each pipeline stage."""
    worst: dict[int, RankPlan] = {}
    for rank in plan.ranks:
        if rank.stage not in worst or rank.total > worst[rank.stage].total:
            worst[rank.stage] = rank
    return [worst[stage] for stage in sorted(worst)]


def format_plan(plan: TrainPlan, model_name: str) -> str:
    """Memory by term for each stage's largest rank, the step time and every assumption behind them."""
    acc, layout, step = plan.accelerator, plan.layout, plan.step
    columns = stage_worst(plan)
    terms: list[str] = []
    for rank in columns:
        terms += [t for t in rank.memory if t not in terms]
    width = max(len(t) for t in terms + ["total"]) + 2
    header = "".join(f"{f'stage {r.stage}, rank {r.rank}':>20}" for r in columns)
    lines = [
        f"plan: {layout.describe()}",
        f"model: {model_name}: d_model {plan.model.d_model}, {plan.model.n_layers} layers, {plan.model.n_heads} heads, "
        f"mlp {plan.model.mlp_hidden_size}, vocabulary {plan.model.embedding_size}",
        "",
        f"memory per rank, GiB (each stage's largest rank; {acc.name}: {acc.memory_bytes / GIB:.1f} GiB):",
        f"{'':{width}}{header}",
    ]
    for term in terms:
        lines.append(f"  {term:{width - 2}}" + "".join(f"{_gib(r.memory.get(term, 0.0)):>20}" for r in columns))
    lines.append(f"  {'total':{width - 2}}" + "".join(f"{_gib(r.total):>20}" for r in columns))
    lines.append(f"  {'micro-batches in flight':{width - 2}}" + "".join(f"{r.in_flight:>20}" for r in columns))
    lines.append(f"  {'headroom':{width - 2}}" + "".join(f"{_gib(acc.memory_bytes - r.total):>20}" for r in columns))
    lines.append("one micro-batch keeps, MiB:")
    for stage, terms in plan.activation_terms.items():
        parts = ", ".join(f"{name} {value / 2**20:,.1f}" for name, value in terms.items())
        lines.append(f"  stage {stage} ({layout.recompute} recompute): {parts}")
    lines += [
        "",
        f"step: {step.step_s:.2f} s = {layout.microbatches + layout.pp - 1} x {step.microbatch_s * 1e3:.0f} ms per "
        f"micro-batch (compute {step.compute_s * 1e3:.0f}, tensor-parallel comm {step.tp_comm_s * 1e3:.1f}, "
        f"pipeline transfers {step.pp_comm_s * 1e3:.1f}; bubble {step.bubble_fraction:.1%})"
        f" + data-parallel {step.dp_exposed_s * 1e3:.0f} ms exposed of {step.dp_comm_s * 1e3:.0f}"
        f" + AdamW {step.optimizer_s * 1e3:.0f} ms",
        f"throughput: {step.tokens_per_s:,.0f} tokens/s ({step.tokens_per_s / layout.world:,.0f} per device), "
        f"MFU {step.mfu:.1%}",
        "",
        "assumptions:",
        *(f"  - {line}" for line in plan.assumptions),
    ]
    failure = plan.failure()
    lines.append("" if failure is None else f"\ndoes not fit: {failure}")
    return "\n".join(lines).rstrip()


def format_sweep(plans: list[TrainPlan], valid: int, world: int, top: int = 15) -> str:
    """The fastest layouts that fit, one line each."""
    if not valid:
        return (
            f"no layout is valid for world {world}: global_batch_size must be a multiple of micro_batch_size x dp "
            "(dp = world / (tp x pp)) and tp must divide the heads; raise global_batch_size or use fewer ranks"
        )
    if not plans:
        return f"none of the {valid} valid layouts for world {world} fits: use more ranks or a larger accelerator"
    head = f"{'#':>3} {'tp':>3} {'pp':>3} {'dp':>3} {'micro':>5} {'m':>4} {'recompute':>9} {'peak GiB':>9} "
    head += f"{'step s':>7} {'bubble':>7} {'dp traffic s':>12} {'tokens/s':>9} {'MFU':>6}"
    lines = [
        f"{len(plans)} of {valid} valid layouts for world {world} fit; fastest first (dp traffic: the data-parallel "
        "time per step that the prediction assumes compute hides, see --plan):",
        head,
    ]
    for index, plan in enumerate(plans[:top], 1):
        lay, step = plan.layout, plan.step
        lines.append(
            f"{index:>3} {lay.tp:>3} {lay.pp:>3} {lay.dp:>3} {lay.micro_batch:>5} {lay.microbatches:>4} "
            f"{lay.recompute:>9} {plan.worst.total / GIB:>9.1f} {step.step_s:>7.2f} {step.bubble_fraction:>7.1%} "
            f"{step.dp_comm_s:>12.2f} {step.tokens_per_s:>9,.0f} {step.mfu:>6.1%}"
        )
    return "\n".join(lines)
