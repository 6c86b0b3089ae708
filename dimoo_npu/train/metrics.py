"""Per-step metrics: ``metrics.jsonl`` (one JSON line per step), throughput and an MFU estimate.

MFU = achieved model FLOP/s / (peak FLOP/s per device * devices), with model FLOPs per computed token
(torchtitan's convention for a dense transformer; recomputation is not counted):

    flops_per_token = 6 * (N - N_embedding) + 12 * n_layers * d_model * L

N counts every parameter of the full model (head included), N_embedding the input embedding (a lookup,
no matmul), L the padded sequence length of the step (attention is bidirectional: every query sees all
L keys). The 6 is 2 FLOPs per multiply-add times (1 forward + 2 backward) matmuls; 12 * n_layers * d_model
* L is the same for the two attention matmuls (scores, values). Peak: ``peak_tflops`` from the run config
when set, else the measured throughput of a large dense matmul on the device in the compute dtype (so on
CPU the MFU is against what this machine can actually do, not a datasheet number).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from dimoo_npu.files.atomic import write_text_atomically
from dimoo_npu.modeling.config import DiMOOConfig


def parameter_counts(config: DiMOOConfig) -> tuple[int, int]:
    """(all parameters, input-embedding parameters) of the full model, from its config."""
    d, hidden, vocab = config.d_model, config.mlp_hidden_size, config.embedding_size
    block = 4 * d * d + 3 * d * hidden + 2 * d  # q, k, v, attn_out; gate, up, down; two norms
    embedding = vocab * d
    return embedding + config.n_layers * block + d + vocab * d, embedding


def flops_per_token(config: DiMOOConfig, seq_length: int) -> float:
    total, embedding = parameter_counts(config)
    return 6.0 * (total - embedding) + 12.0 * config.n_layers * config.d_model * seq_length


def measure_peak_flops(
    device: torch.device, dtype: torch.dtype, synchronize=lambda: None, clock=time.perf_counter
) -> float:
    """FLOP/s of repeated square matmuls on ``device`` in ``dtype`` (best of a few timed repetitions).

    ``clock`` may be ``time.process_time`` on a shared CPU, to count this process's CPU time only.
    """
    size = 1024 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        synchronize()
        start = clock()
        for _ in range(4):
            a @ b
        synchronize()
        best = min(best, (clock() - start) / 4)
    return 2.0 * size**3 / best


class MetricsLog:
    """Appends one JSON line per step to ``metrics.jsonl`` (rank 0 only), flushed so a crash loses nothing."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path = path
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.records = self._kept(resume_step)
            self._rewrite()
            self._handle = open(path, "a", encoding="utf-8")

    def _kept(self, resume_step: int) -> list[dict[str, Any]]:
        """Lines of an earlier run up to the resumed step (later ones are trained again)."""
        if not self.path.is_file():
            return []
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if record.get("step", 0) <= resume_step:
                kept.append(record)
        return kept

    def _rewrite(self) -> None:
        write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self.enabled:
            self._handle.close()
