"""One rank of the parity runs: trains a tiny DiMOO for a few steps under each named layout.

Launched N times by ``conftest.run_distributed`` (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Every rank
builds the same model (same seed) and the same global batches; rank 0 also runs the plain single-process loop
(``masked_diffusion_loss`` on the whole global batch) as the reference. A layout of fewer ranks than the world
runs on each group of consecutive ranks at once (one launch serves 2- and 4-rank layouts). Each rank writes
rank{R}.json: {"reference": {...} (rank 0), "<scenario>": {"losses": [...], "norms": [...], "master_dtypes": [...]}}.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dimoo_npu.model import DiMOOModel
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.modeling.losses import masked_diffusion_loss
from dimoo_npu.parallel import ParallelDims, ParallelOptions, build_mesh, parallelize
from dimoo_npu.train.step import TrainStep

STEPS = 5
GLOBAL_BATCH, LENGTH = 8, 16
LR, MAX_NORM = 1e-2, 0.5
# A special-token table that fits a 509-token vocabulary: text 0..239, specials 240..248, image codes 253..508.
# 509 is prime, so the vocabulary-parallel embedding and head are sharded unevenly (as DiMOO's 134548 at tp=8).
SPECIAL_TOKENS = {
    "newline": 240, "boa": 241, "eoa": 242, "boi": 243, "eoi": 244, "uncondition": 245, "eos": 246,
    "answer_pad": 247, "mask": 248, "image_offset": 253, "codebook_size": 256, "vocab": 509,
}  # fmt: skip
MASK_ID = SPECIAL_TOKENS["mask"]

SCENARIOS: dict[str, tuple[ParallelDims, ParallelOptions]] = {
    # two ranks
    "tp2": (ParallelDims(tp=2), ParallelOptions()),
    "tp2_sp": (ParallelDims(tp=2), ParallelOptions(sequence_parallel=True, microbatches=2)),
    "tp2_sp_full_recompute": (
        ParallelDims(tp=2),
        ParallelOptions(sequence_parallel=True, microbatches=2, recompute="full"),
    ),
    "pp2_1f1b": (ParallelDims(pp=2), ParallelOptions(microbatches=2)),
    "pp2_gpipe": (ParallelDims(pp=2), ParallelOptions(microbatches=2, pp_schedule="GPipe")),
    "pp2_gpipe_mb4": (ParallelDims(pp=2), ParallelOptions(microbatches=4, pp_schedule="GPipe")),
    "pp2_selective_split13": (
        ParallelDims(pp=2),
        ParallelOptions(microbatches=2, recompute="selective", pipeline_num_layers=[1, 3]),
    ),
    "dp2_fsdp": (ParallelDims(dp=2), ParallelOptions(microbatches=2)),
    "dp2_ddp": (ParallelDims(dp=2), ParallelOptions(data_parallel="ddp", microbatches=2)),
    "tp2_sp_bf16": (ParallelDims(tp=2), ParallelOptions(sequence_parallel=True, param_dtype=torch.bfloat16)),
    # four ranks
    "tp2_pp2": (ParallelDims(pp=2, tp=2), ParallelOptions(microbatches=2)),
    "tp2_pp2_sp_gpipe": (
        ParallelDims(pp=2, tp=2),
        ParallelOptions(microbatches=2, sequence_parallel=True, pp_schedule="GPipe", recompute="full"),
    ),
    "dp2_tp2": (ParallelDims(dp=2, tp=2), ParallelOptions(sequence_parallel=True)),
    "pp2_dp2": (ParallelDims(pp=2, dp=2), ParallelOptions(microbatches=2)),
}


def tiny_config() -> DiMOOConfig:
    return DiMOOConfig(
        d_model=32, n_layers=4, n_heads=4, mlp_hidden_size=64, embedding_size=SPECIAL_TOKENS["vocab"],
        rope_theta=10000.0, max_sequence_length=64, special_tokens=SPECIAL_TOKENS,
    )  # fmt: skip


def tiny_model() -> DiMOOModel:
    torch.manual_seed(1234)
    return DiMOOModel(tiny_config())


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked-diffusion batch: ids with masked positions, labels there (-100 elsewhere), right padding."""
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, 500, (GLOBAL_BATCH, LENGTH), generator=gen)
    masked = torch.rand(GLOBAL_BATCH, LENGTH, generator=gen) < 0.5
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (GLOBAL_BATCH,), generator=gen)
    attention_mask = torch.arange(LENGTH)[None] < lengths[:, None]
    masked &= attention_mask
    input_ids = torch.where(masked, torch.full_like(tokens, MASK_ID), tokens)
    labels = torch.where(masked, tokens, torch.full_like(tokens, -100))
    return input_ids, labels, attention_mask


def reference_run() -> dict[str, list[float]]:
    """The plain single-process loop on the whole global batch."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for step in range(STEPS):
        input_ids, labels, mask = global_batch(step)
        loss = masked_diffusion_loss(model(input_ids, mask), labels)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return {"losses": losses, "norms": norms}


def replica_mesh(dims: ParallelDims) -> tuple[int, DeviceMesh]:
    """For a layout of fewer ranks than the world: (this rank's replica, its (pp, dp, tp) mesh). Collective."""
    replicas = dist.get_world_size() // dims.world_size
    shape = (replicas, dims.pp, dims.dp, dims.tp)
    full = init_device_mesh("cpu", shape, mesh_dim_names=("replica", "pp", "dp", "tp"))
    return full.get_local_rank("replica"), full["pp", "dp", "tp"]


def parallel_run(dims: ParallelDims, options: ParallelOptions, mesh: DeviceMesh) -> dict[str, list[float]]:
    part = parallelize(tiny_model(), dims, mesh, options, torch.device("cpu"))
    runner = TrainStep(part, dims, mesh, options, torch.device("cpu"))
    optimizer = torch.optim.AdamW(part.parameters(), lr=LR)
    dp_rank, rows = mesh.get_local_rank("dp"), GLOBAL_BATCH // dims.dp
    losses, norms = [], []
    for step in range(STEPS):
        input_ids, labels, mask = (t[dp_rank * rows : (dp_rank + 1) * rows] for t in global_batch(step))
        losses.append(float(runner.forward_backward(input_ids, labels, mask)))
        norms.append(float(runner.clip_grad_norm(MAX_NORM)))
        optimizer.step()
        optimizer.zero_grad()
    dtypes = sorted({str(p.dtype) for p in part.parameters()})
    return {"losses": losses, "norms": norms, "master_dtypes": dtypes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenarios", nargs="+", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {"reference": reference_run()} if rank == 0 else {}
    world = dist.get_world_size()
    whole = [name for name in args.scenarios if SCENARIOS[name][0].world_size == world]
    smaller = [name for name in args.scenarios if name not in whole]
    replicas = max((world // SCENARIOS[name][0].world_size for name in smaller), default=1)
    for start in range(0, len(smaller), replicas):
        # Each group of consecutive ranks (a replica) runs another layout of this batch, at the same time.
        batch = smaller[start : start + replicas]
        meshes = [replica_mesh(SCENARIOS[name][0]) for name in batch]  # every rank joins every mesh
        for index, (name, (replica, mesh)) in enumerate(zip(batch, meshes, strict=True)):
            if replica == index:
                results[name] = parallel_run(*SCENARIOS[name], mesh)
        dist.barrier()
    for name in whole:
        dims, options = SCENARIOS[name]
        results[name] = parallel_run(dims, options, build_mesh(dims, "cpu"))
        dist.barrier()
    (args.out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
