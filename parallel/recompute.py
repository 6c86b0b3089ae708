"""Activation recompute per transformer block (Megatron/MindSpeed ``recompute_granularity``).

- ``full``: a block keeps only its input; everything inside is recomputed in the backward pass.
- ``selective``: matmuls, attention kernels and collectives keep their outputs; the cheap elementwise work
  (norms, rotary, SwiGLU, casts) is recomputed. Saving collectives' outputs avoids repeating communication.
"""

from __future__ import annotations

from functools import partial

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from dimoo_npu.model import DiMOOModel

RECOMPUTE_MODES = ("none", "selective", "full")  # by memory saved, the order the planner sweeps them

# Op names (namespace dropped) whose outputs selective recompute keeps.
_SAVED_OPS = frozenset(
    {
        "mm",
        "addmm",
        "bmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "npu_fusion_attention",
        "all_reduce",
        "all_gather_into_tensor",
        "reduce_scatter_tensor",
        "wait_tensor",
    }
)


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    name = op.name().split("::")[-1].split(".")[0]
    return CheckpointPolicy.MUST_SAVE if name in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_recompute(model: DiMOOModel, mode: str) -> DiMOOModel:
    """Wrap every block this model owns for ``mode`` recompute (in place; state-dict keys are unchanged)."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute mode {mode!r} is not one of {', '.join(RECOMPUTE_MODES)}")
    if mode == "none":
        return model
    extra = {}
    if mode == "selective":
        extra["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy)
    blocks = model.transformer.blocks
    for key in list(blocks.keys()):
        blocks[key] = checkpoint_wrapper(blocks[key], checkpoint_impl=CheckpointImpl.NO_REENTRANT, **extra)
    return model
