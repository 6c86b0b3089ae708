"""The planner's sharded bytes are the real ones: the 8B model built on meta for simulated worlds of 16 and 64 ranks
(PyTorch's fake process group, one rank at a time in this process), sharded by the project's own `parallelize`,
compared tensor by tensor at the corner ranks (first and last stage, tp rank and dp rank) of fixed layouts.

Gradients are checked against the size FSDP2 gives the reduce-scattered gradient (``FSDPParam.sharded_size``,
reduce dtype), and optimizer state against the AdamW state a real step creates on the meta parameters.
FSDP refuses to run a forward on meta parameters, so no backward runs here.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from dimoo_npu.model import DiMOOModel
from dimoo_npu.modeling.presets import preset_config
from dimoo_npu.ops import resolve_ops
from dimoo_npu.parallel import ParallelDims, ParallelOptions, build_mesh, parallelize
from dimoo_npu.planner.hardware import accelerator
from dimoo_npu.planner.train_plan import Layout, local_shape, plan_training, stage_parameters
from dimoo_npu.train.config import TrainConfig
from dimoo_npu.train.trainer import build_optimizer

MODEL = preset_config("lumina-dimoo-8b")

# (tp, pp, dp, recompute, micro-batches): world 16 as the shipped config (the vocabulary's FSDP shards are uneven:
# 33637 rows per tp rank split 16819 / 16818), and a 64-rank layout whose tensor-parallel shards are uneven too
# (134548 / 8 tp ranks: 16819 x 7 and 16815, then over 4 dp ranks).
LAYOUTS = {
    "w16-tp4-pp2-dp2-full": (4, 2, 2, "full", 32),
    "w64-tp8-pp2-dp4-selective": (8, 2, 4, "selective", 8),
}


def _layout(tp: int, pp: int, dp: int, recompute: str, microbatches: int) -> Layout:
    return Layout(
        tp=tp, pp=pp, dp=dp, micro_batch=1, microbatches=microbatches, seq_length=2560, recompute=recompute,
        sequence_parallel=True, fsdp=True, schedule="1F1B", bf16=True,
    )  # fmt: skip


def _corner_ranks(tp: int, pp: int, dp: int) -> list[tuple[int, int, int]]:
    return sorted(set(itertools.product((0, pp - 1), (0, tp - 1), (0, dp - 1))))


def _real_rank(layout: Layout, stage: int, tp_rank: int, dp_rank: int):
    """Build and shard the meta 8B model as rank (stage, tp_rank, dp_rank) of ``layout`` would."""
    rank = (stage * layout.dp + dp_rank) * layout.tp + tp_rank
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=layout.world)
    try:
        dims = ParallelDims(pp=layout.pp, dp=layout.dp, tp=layout.tp)
        mesh = build_mesh(dims, "cpu")
        with torch.device("meta"):
            model = DiMOOModel(MODEL, resolve_ops("cpu"))
        options = ParallelOptions(
            sequence_parallel=True, recompute=layout.recompute, data_parallel="fsdp",
            microbatches=layout.microbatches, pp_schedule="1F1B", param_dtype=torch.bfloat16,
        )  # fmt: skip
        return rank, parallelize(model, dims, mesh, options, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def _fsdp_params(part: torch.nn.Module) -> list:
    out = []
    for module in part.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                out += [(param, group.mp_policy) for param in group.fsdp_params]
    return out


@pytest.fixture(autouse=True)
def _no_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process; the fake one needs a clean slate")
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planner_bytes_equal_the_real_sharded_model(name):
    layout = _layout(*LAYOUTS[name])
    plan = {(r.stage, r.tp_rank, r.dp_rank): r for r in plan_training(MODEL, layout, accelerator("910b")).ranks}
    for index, (stage, tp_rank, dp_rank) in enumerate(_corner_ranks(layout.tp, layout.pp, layout.dp)):
        rank, part = _real_rank(layout, stage, tp_rank, dp_rank)
        planned = plan[stage, tp_rank, dp_rank]
        assert planned.rank == rank

        # Every parameter, by name: the planner's local shape is the real unpadded local tensor's.
        real = {n.replace("._checkpoint_wrapped_module", ""): _local(p) for n, p in part.named_parameters()}
        specs = {s.name: s for s in stage_parameters(MODEL, stage, layout.pp)}
        assert set(real) == set(specs), f"rank {rank}: parameter names differ"
        for param_name, tensor in real.items():
            want = local_shape(specs[param_name], layout.tp, tp_rank, layout.dp, dp_rank, fsdp=True)
            assert tuple(tensor.shape) == want, f"rank {rank} {param_name}: real {tuple(tensor.shape)} != plan {want}"
        weights = sum(t.numel() * t.element_size() for t in real.values())
        assert planned.memory["weights fp32 (owned shard)"] == weights

        # Gradients: FSDP2 reduce-scatters into sharded_size in the reduce dtype; compute copies: param dtype.
        fsdp = _fsdp_params(part)
        assert len(fsdp) == len(real)
        grads = sum(p.sharded_size.numel() * (policy.reduce_dtype or p.orig_dtype).itemsize for p, policy in fsdp)
        assert planned.memory["grads fp32 (owned shard)"] == grads
        gathered = sum(p._orig_size.numel() * (policy.param_dtype or p.orig_dtype).itemsize for p, policy in fsdp)
        assert planned.memory["weights gathered for compute"] == gathered  # pipeline stages keep all gathered
        assert planned.memory["grads gathered, accumulated over micro-batches"] == 2 * gathered  # fp32 vs bf16

        if index == 0:  # a real AdamW step on the meta shards of the first corner (seconds each)
            optimizer = build_optimizer([part], TrainConfig())
            for param in part.parameters():
                param.grad = torch.zeros_like(param)
            optimizer.step()
            state = [
                _local(value)
                for per_param in optimizer.state.values()
                for value in per_param.values()
                if isinstance(value, torch.Tensor) and value.device.type == "meta"
            ]  # the step counter lives on the host, not on the device
            assert len(state) == 2 * len(real)
            assert planned.memory["AdamW m, v fp32 (owned shard)"] == sum(t.numel() * t.element_size() for t in state)
