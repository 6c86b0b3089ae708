"""Activation memory of one micro-batch: what the model keeps for backward, by recompute mode and op family.

Counted per token of a micro-batch, per element of the width class a kept tensor scales with:

- ``residual``: the residual stream, d/t under sequence parallel, else d (norm inputs, block inputs);
- ``full``: d on every tensor-parallel rank (gathered norm outputs, row-parallel partial sums);
- ``split``: d/t (projections, attention inputs and outputs);
- ``tp_full``, ``sp_residual``: what selective recompute keeps of the collectives' outputs: all-reduce or
  all-gather outputs (d, only when tp > 1) and reduce-scatter outputs (d/t, only under sequence parallel);
- ``mlp``: h/t; ``heads``: H/t (softmax statistics); ``rows``: one value per token of the residual (rstd).

The ``torch`` constants (CPU and CUDA kernels) are measured with `dimoo_npu.planner.measure` on CPU, tp 1 and tp 2
with and without sequence parallel (benchmarks/bench_activations.py fits them on one model, checks another).
The ``npu`` constants swap in what the fused kernels keep instead: npu_rms_norm its bf16 input and rstd,
npu_rotary_mul its fp32 input, npu_swiglu its concatenated input, npu_fusion_attention 2 x 8 fp32 softmax
statistics per head and token and an output that attn_out must copy out of BNSD. Those are not measured here.
"""

from __future__ import annotations

from dataclasses import dataclass

from dimoo_npu.modeling.config import DiMOOConfig

OP_FAMILIES = ("torch", "npu")


@dataclass(frozen=True)
class Widths:
    """Bytes per token per element of each width class (see the module docstring)."""

    residual: float = 0.0
    full: float = 0.0
    split: float = 0.0
    tp_full: float = 0.0
    sp_residual: float = 0.0
    mlp: float = 0.0
    heads: float = 0.0
    rows: float = 0.0

    def bytes_per_token(self, config: DiMOOConfig, tp: int, sequence_parallel: bool) -> float:
        d, h, heads = config.d_model, config.mlp_hidden_size, config.n_heads
        residual_share = 1 / tp if sequence_parallel else 1.0
        return (
            (self.residual + (self.sp_residual if sequence_parallel else 0.0)) * d * residual_share
            + (self.full + (self.tp_full if tp > 1 else 0.0)) * d
            + self.split * d / tp
            + self.mlp * h / tp
            + self.heads * heads / tp
            + self.rows * residual_share
        )


# One block, per recompute mode. torch: measured (see the module docstring); npu: derived from the kernels.
BLOCK: dict[tuple[str, str], Widths] = {
    ("torch", "none"): Widths(residual=16, full=4, split=8, mlp=8, heads=4, rows=8),
    ("torch", "selective"): Widths(residual=2, full=4, split=8, tp_full=4, sp_residual=4, mlp=4, heads=4),
    ("torch", "full"): Widths(residual=2),
    ("npu", "none"): Widths(residual=4, full=4, split=18, mlp=6, heads=64, rows=8),
    ("npu", "selective"): Widths(residual=2, full=4, split=8, tp_full=4, sp_residual=4, mlp=4, heads=64),
    ("npu", "full"): Widths(residual=2),
}
# The final norm (last stage) keeps what a block's norm keeps, plus its gathered output for the head.
FINAL_NORM: dict[str, Widths] = {"torch": Widths(residual=8, full=2, rows=4), "npu": Widths(residual=2, full=2, rows=4)}
ROTARY_BYTES = 8  # cos and sin, fp32, per token per head-dim element: computed once, read by every block
IDS_BYTES = 24  # int64 positions, ids and labels per token
LOG_SOFTMAX_BYTES = 4  # fp32 log-probabilities of every vocabulary entry (every position labelled: worst case)
LOSS_PEAK_BYTES = 6  # while the loss runs: the bf16 logits and their fp32 copy, besides the log-probabilities


def op_family(device: str) -> str:
    """Which kernels a device runs: npu fused kernels, or stock PyTorch (cpu, cuda)."""
    return "npu" if device == "npu" else "torch"


def stage_activation_terms(
    config: DiMOOConfig,
    tokens: int,
    layers: int,
    tp: int,
    sequence_parallel: bool,
    mode: str,
    family: str,
    last_stage: bool,
) -> dict[str, float]:
    """Bytes one micro-batch of ``tokens`` (micro_batch x seq_length) keeps on a stage of ``layers`` blocks."""
    vocab_share = config.embedding_size / tp
    terms = {
        "blocks": layers * BLOCK[family, mode].bytes_per_token(config, tp, sequence_parallel) * tokens,
        "rotary tables": ROTARY_BYTES * config.head_dim * tokens,
        "ids, positions, labels": IDS_BYTES * tokens,
    }
    if last_stage:
        terms["final norm"] = FINAL_NORM[family].bytes_per_token(config, tp, sequence_parallel) * tokens
        terms["log-softmax"] = LOG_SOFTMAX_BYTES * vocab_share * tokens
    return terms


def working_set_terms(
    config: DiMOOConfig, tokens: int, tp: int, sequence_parallel: bool, family: str, last_stage: bool
) -> dict[str, float]:
    """Transient bytes on top of the kept ones: one block's activations during its backward (recomputed, or
    the gradients of what it kept), and on the last stage the logits while the loss runs."""
    terms = {"one block in backward": BLOCK[family, "none"].bytes_per_token(config, tp, sequence_parallel) * tokens}
    if last_stage:
        terms["logits at the loss"] = LOSS_PEAK_BYTES * config.embedding_size / tp * tokens
    return terms
