"""What Self-GRPO (`dimoo_npu.rl`, a run config with an ``rl:`` section) adds to a rank's training memory.

On top of the policy's weights, gradients, AdamW state and update activations (`train_plan`, the update forward is
a training forward of ``micro_batch_size`` completions):

- the frozen reference, built like the policy (fp32, sharded over data parallel the same way), when ``beta`` > 0
  or the reference answers the self-reward's questions;
- the rollout batch: every local completion and its guidance branch in one no-grad forward per sampling step (one
  block's working set at a time, counted as the backward working set of that many tokens: an overestimate), and
  the fp32 image-code logits of every cell (logits, guided logits, softmax: three copies).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dimoo_npu.planner.activations import op_family, working_set_terms
from dimoo_npu.planner.train_plan import RESERVE, TrainPlan
from dimoo_npu.settings.requests import PIXELS_PER_CELL

if TYPE_CHECKING:
    from dimoo_npu.train.config import TrainConfig

REFERENCE = "reference weights fp32 (frozen, sharded like the policy)"
ROLLOUT = "rollout batch (no-grad sampling forward, image-code logits)"


def add_rl_terms(plan: TrainPlan, config: TrainConfig) -> TrainPlan:
    """``plan`` with the reference and rollout terms on every rank (in place; the reserve stays last)."""
    rl, layout, model = config.rl, plan.layout, plan.model
    width, height = rl.image_size(model.generation_defaults)
    cells = (height // PIXELS_PER_CELL) * (width // PIXELS_PER_CELL)
    rows = config.gpt_args.global_batch_size // layout.dp * (2 if rl.cfg_scale > 0 else 1)
    family = op_family("npu" if plan.accelerator.name == "910b" else "cuda")
    compute_bytes = 2 if layout.bf16 else 4
    forward = working_set_terms(model, rows * layout.seq_length, layout.tp, layout.sequence_parallel, family, False)
    logits = 3 * 4 * rows * cells * model.special_tokens.get("codebook_size", 8192)
    for rank in plan.ranks:
        reserve = rank.memory.pop(RESERVE)
        if rl.beta > 0 or rl.reward_model == "reference":
            rank.memory[REFERENCE] = 4 * rank.param_elements
        rank.memory[ROLLOUT] = sum(forward.values()) * compute_bytes / 2 + logits
        rank.memory[RESERVE] = reserve
    plan.assumptions.append(
        f"Self-GRPO: {rows} rollout rows per rank of {layout.seq_length} tokens and {cells} image cells; the reference "
        "model's transient gathered blocks and the self-reward's answer sampling (smaller) are not counted"
    )
    return plan
