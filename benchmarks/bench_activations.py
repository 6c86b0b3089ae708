"""Fit the planner's per-layer activation constants on one model and report their error on another (held out).

OMP_NUM_THREADS=1 python benchmarks/bench_activations.py [--json out.json]

On CPU (torch kernels, bf16), for every recompute mode and tensor-parallel layout (tp 1; tp 2 and 4 with and
without sequence parallel, on PyTorch's fake process group: real shapes, no peers), measure the bytes one
micro-batch keeps for backward (`dimoo_npu.planner.measure`). The fit model's per-layer bytes are the difference
between 2 and 1 layers, split by width (numel per token: d or d/t, h/t, H/t, per-token scalars) and solved for
the `Widths` constants by least squares. The held-out model (other widths, heads, depth, vocabulary, batch and
length) is then predicted whole (blocks with the fitted constants, plus the planner's per-model terms) and
compared with its measurement. The last column is the planner's shipped constants on the held-out model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel
from torch.testing._internal.distributed.fake_pg import FakeStore

from dimoo_npu.model import DiMOOModel
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.ops import resolve_ops
from dimoo_npu.parallel import ParallelDims, build_mesh
from dimoo_npu.parallel.recompute import RECOMPUTE_MODES, apply_recompute
from dimoo_npu.parallel.tensor_parallel import apply_tp
from dimoo_npu.planner.activations import BLOCK, Widths, stage_activation_terms
from dimoo_npu.planner.measure import measure_kept_bytes, summed_loss

log = logging.getLogger("bench_activations")

LAYOUTS = [(1, False), (2, False), (2, True), (4, False), (4, True)]  # (tp, sequence parallel)
FIT = {"d_model": 128, "n_heads": 8, "mlp_hidden_size": 352, "embedding_size": 512, "batch": 2, "length": 96}
HELD_OUT = {"d_model": 192, "n_heads": 8, "mlp_hidden_size": 512, "embedding_size": 768, "batch": 1, "length": 80}
D_CLASSES = ("residual", "full", "split", "tp_full", "sp_residual")


def _config(sizes: dict, layers: int) -> DiMOOConfig:
    vocab = sizes["embedding_size"]
    return DiMOOConfig(
        d_model=sizes["d_model"], n_layers=layers, n_heads=sizes["n_heads"], mlp_hidden_size=sizes["mlp_hidden_size"],
        embedding_size=vocab, special_tokens={"mask": vocab - 1},
    )  # fmt: skip


def measure(sizes: dict, layers: int, mode: str, tp: int, sequence_parallel: bool) -> list[tuple[int, tuple]]:
    """(bytes, shape) of every storage one micro-batch keeps, on rank 0 of a fake tp-rank world."""
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        torch.manual_seed(0)
        config = _config(sizes, layers)
        model = DiMOOModel(config, resolve_ops("cpu")).to(torch.bfloat16)
        if tp > 1:
            apply_tp(model, build_mesh(ParallelDims(1, 1, tp), "cpu")["tp"], sequence_parallel)
        apply_recompute(model, mode)
        batch, length = sizes["batch"], sizes["length"]
        ids = torch.randint(0, config.embedding_size - 2, (batch, length))
        positions = torch.arange(length).expand(batch, length)
        with loss_parallel() if tp > 1 else contextlib.nullcontext():
            _, live = measure_kept_bytes(model, lambda: summed_loss(model(ids, positions=positions), ids))
        return live
    finally:
        dist.destroy_process_group()


def buckets(live: list[tuple[int, tuple]], sizes: dict, tp: int) -> dict[str, float]:
    """Bytes by width: 'd' (d or d/t), 'mlp' (h/t), 'heads' (H/t), 'rows' (at most 1 per token), 'other'."""
    tokens = sizes["batch"] * sizes["length"]
    d, h, heads = sizes["d_model"], sizes["mlp_hidden_size"], sizes["n_heads"]
    out = dict.fromkeys(("d", "mlp", "heads", "rows", "other"), 0.0)
    for nbytes, shape in live:
        width = int(np.prod(shape)) / tokens
        if width in (d, d / tp):
            out["d"] += nbytes
        elif width == h / tp:
            out["mlp"] += nbytes
        elif width == heads / tp:
            out["heads"] += nbytes
        elif width <= 1:
            out["rows"] += nbytes
        else:
            out["other"] += nbytes
    return out


def d_features(sizes: dict, tp: int, sequence_parallel: bool) -> list[float]:
    """Elements per token of each d-wide class (the order of D_CLASSES), as `Widths.bytes_per_token` counts them."""
    d, share = sizes["d_model"], (1 / tp if sequence_parallel else 1.0)
    return [d * share, d, d / tp, d * (tp > 1), d * share * sequence_parallel]


def fit_mode(mode: str) -> tuple[Widths, list[str]]:
    """The `Widths` of one recompute mode from the fit model's per-layer bytes over every layout."""
    rows, targets, scalars = [], [], {"mlp": [], "heads": [], "rows": []}
    notes = []
    for tp, sp in LAYOUTS:
        one = buckets(measure(FIT, 1, mode, tp, sp), FIT, tp)
        two = buckets(measure(FIT, 2, mode, tp, sp), FIT, tp)
        layer = {k: two[k] - one[k] for k in one}
        tokens = FIT["batch"] * FIT["length"]
        rows.append(d_features(FIT, tp, sp))
        targets.append(layer["d"] / tokens)
        scalars["mlp"].append((layer["mlp"] / tokens, FIT["mlp_hidden_size"] / tp))
        scalars["heads"].append((layer["heads"] / tokens, FIT["n_heads"] / tp))
        scalars["rows"].append((layer["rows"] / tokens, 1 / tp if sp else 1.0))
        if layer["other"]:
            notes.append(f"{mode} tp{tp} sp{int(sp)}: {layer['other']:.0f} bytes per layer of no known width")
    solution, *_ = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)
    values = {name: round(float(v), 3) for name, v in zip(D_CLASSES, solution, strict=True)}
    for name, pairs in scalars.items():
        x = np.array([w for _, w in pairs])
        y = np.array([b for b, _ in pairs])
        values[name] = round(float(x @ y / (x @ x)), 3)
    return Widths(**values), notes


def predict(widths: Widths, sizes: dict, layers: int, mode: str, tp: int, sp: bool) -> float:
    """Whole-model kept bytes: blocks with ``widths``, the rest with the planner's per-model terms."""
    config = _config(sizes, layers)
    tokens = sizes["batch"] * sizes["length"]
    terms = stage_activation_terms(config, tokens, layers, tp, sp, mode, "torch", last_stage=True)
    terms["blocks"] = layers * widths.bytes_per_token(config, tp, sp) * tokens
    return sum(terms.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the fitted constants and the held-out errors here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report: dict = {"fit_model": FIT, "held_out_model": {**HELD_OUT, "n_layers": 3}, "modes": {}}
    print("| mode | fitted constants (bytes per token per element) | planner's | held-out error, fitted | shipped |")
    print("|---|---|---|---|---|")
    for mode in RECOMPUTE_MODES:
        fitted, notes = fit_mode(mode)
        for note in notes:
            log.warning(note)
        errors, shipped = [], []
        for tp, sp in LAYOUTS:
            live = measure(HELD_OUT, 3, mode, tp, sp)
            measured = sum(nbytes for nbytes, _ in live)
            errors.append((predict(fitted, HELD_OUT, 3, mode, tp, sp) - measured) / measured)
            shipped.append((predict(BLOCK["torch", mode], HELD_OUT, 3, mode, tp, sp) - measured) / measured)
        nonzero = {k: v for k, v in dataclasses.asdict(fitted).items() if abs(v) > 1e-6}
        planner = {k: v for k, v in dataclasses.asdict(BLOCK["torch", mode]).items() if v}
        worst, worst_shipped = max(errors, key=abs), max(shipped, key=abs)
        print(f"| {mode} | {nonzero} | {planner} | {worst:+.2%} (worst of {len(errors)}) | {worst_shipped:+.2%} |")
        report["modes"][mode] = {
            "fitted": dataclasses.asdict(fitted),
            "planner": dataclasses.asdict(BLOCK["torch", mode]),
            "held_out_errors": dict(zip([f"tp{t}-sp{int(s)}" for t, s in LAYOUTS], errors, strict=True)),
            "held_out_errors_shipped": dict(zip([f"tp{t}-sp{int(s)}" for t, s in LAYOUTS], shipped, strict=True)),
        }
    if args.json:
        from dimoo_npu.files.atomic import write_text_atomically

        write_text_atomically(args.json, json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
