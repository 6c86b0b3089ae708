"""Every layout a world size allows for a run config, planned and ranked by predicted step time."""

from __future__ import annotations

import dataclasses

from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.parallel.recompute import RECOMPUTE_MODES
from dimoo_npu.planner.hardware import Accelerator
from dimoo_npu.planner.rl_plan import add_rl_terms
from dimoo_npu.planner.train_plan import TrainPlan, layout_of, plan_training
from dimoo_npu.train.config import TrainConfig
from dimoo_npu.train.layout import plan_layout
from dimoo_npu.utils.errors import ConfigError


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_configs(config: TrainConfig, world: int) -> list[TrainConfig]:
    """The run config with every (tp, pp, micro_batch, recompute) that `plan_layout` accepts for ``world``.

    Sequence parallelism is on whenever tp > 1 (it only saves memory); the global batch, schedule, data
    parallel kind and sequence length stay the config's. Self-GRPO (an ``rl:`` section) runs data parallel only.
    """
    out = []
    splits = [1] if config.rl is not None else _divisors(world)
    for tp in splits:
        for pp in [1] if config.rl is not None else _divisors(world // tp):
            dp = world // (tp * pp)
            per_rank = config.gpt_args.global_batch_size // dp if config.gpt_args.global_batch_size % dp == 0 else 0
            for micro in (m for m in _divisors(per_rank) if m & (m - 1) == 0):
                for recompute in RECOMPUTE_MODES:
                    gpt_args = dataclasses.replace(
                        config.gpt_args,
                        tensor_model_parallel_size=tp,
                        pipeline_model_parallel_size=pp,
                        micro_batch_size=micro,
                        sequence_parallel=tp > 1,
                        recompute_granularity=recompute,
                    )
                    out.append(dataclasses.replace(config, gpt_args=gpt_args))
    return out


def sweep(config: TrainConfig, model: DiMOOConfig, world: int, accelerator: Accelerator) -> tuple[list[TrainPlan], int]:
    """(plans that fit, fastest first; how many valid layouts were planned). Each plan covers every stage's
    largest rank (rank 0 of tp and dp), which decides whether the layout fits; a Self-GRPO plan holds the
    reference and the rollout batch as `dimoo train --plan` counts them."""
    plans, valid = [], 0
    for candidate in candidate_configs(config, world):
        try:
            dims, options = plan_layout(candidate, model, world)
        except ConfigError:
            continue
        valid += 1
        plan = plan_training(model, layout_of(candidate, dims, options, model), accelerator, every_rank=False)
        if candidate.rl is not None:  # the frozen reference and the rollout batch count too
            add_rl_terms(plan, candidate)
        if plan.fits:
            plans.append(plan)
    plans.sort(key=lambda p: (p.step.step_s, p.worst.total))
    return plans, valid
