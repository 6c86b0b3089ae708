"""Tensor-parallel plan in a mock world (one process, fake process group: world 4, this rank 2), litgpt style.

Checks the sharding math (which dim of which weight is split, local shapes, local head count), that the
ops (the seam to fused NPU kernels) only ever see plain tensors, and, with CommDebugMode, the exact
collectives of a forward and a forward + backward: a stray all-reduce or all-gather fails here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import loss_parallel

from dimoo_npu.model import DiMOOModel
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.ops import OP_NAMES, resolve_ops
from dimoo_npu.parallel.tensor_parallel import apply_tp

WORLD, RANK = 4, 2
LAYERS, HEADS, D_MODEL, MLP, VOCAB = 2, 8, 64, 128, 512
BATCH, LENGTH = 2, 16


@pytest.fixture(scope="module", autouse=True)
def fake_world():
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=RANK, world_size=WORLD)
    yield
    dist.destroy_process_group()


def _config() -> DiMOOConfig:
    return DiMOOConfig(
        d_model=D_MODEL, n_layers=LAYERS, n_heads=HEADS, mlp_hidden_size=MLP, embedding_size=VOCAB,
        rope_theta=10000.0, max_sequence_length=64, special_tokens={"mask": 248, "vocab": VOCAB},
    )  # fmt: skip


def _recording_ops(calls: list[tuple[str, tuple]]):
    """The torch ops, each recording the types and shapes of its tensor arguments."""
    base = resolve_ops("cpu")

    def record(name, fn):
        def wrapped(*args):
            calls.append((name, tuple((type(a), tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))))
            return fn(*args)

        return wrapped

    return dataclasses.replace(base, **{name: record(name, getattr(base, name)) for name in OP_NAMES})


def _tp_model(sequence_parallel: bool, calls: list | None = None) -> DiMOOModel:
    model = DiMOOModel(_config())
    if calls is not None:
        model.use_ops(_recording_ops(calls))
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    return apply_tp(model, mesh, sequence_parallel)


def _forward(model: DiMOOModel) -> torch.Tensor:
    ids = torch.randint(0, 240, (BATCH, LENGTH))
    return model(ids, positions=DiMOOModel._default_positions(ids, None))


EXPECTED_SHARDING = {  # parameter suffix -> (placement, local shape)
    "wte.weight": (Shard(0), (VOCAB // WORLD, D_MODEL)),  # vocabulary-parallel embedding
    "attn_norm.weight": (Replicate(), (D_MODEL,)),
    "q_proj.weight": (Shard(0), (D_MODEL // WORLD, D_MODEL)),
    "k_proj.weight": (Shard(0), (D_MODEL // WORLD, D_MODEL)),
    "v_proj.weight": (Shard(0), (D_MODEL // WORLD, D_MODEL)),
    "attn_out.weight": (Shard(1), (D_MODEL, D_MODEL // WORLD)),
    "ff_norm.weight": (Replicate(), (D_MODEL,)),
    "ff_proj.weight": (Shard(0), (MLP // WORLD, D_MODEL)),
    "up_proj.weight": (Shard(0), (MLP // WORLD, D_MODEL)),
    "blocks.0.ff_out.weight": (Shard(1), (D_MODEL, MLP // WORLD)),
    "blocks.1.ff_out.weight": (Shard(1), (D_MODEL, MLP // WORLD)),
    "ln_f.weight": (Replicate(), (D_MODEL,)),
    "transformer.ff_out.weight": (Shard(0), (VOCAB // WORLD, D_MODEL)),  # vocabulary-parallel head
}


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_every_parameter_is_sharded_as_megatron_splits_it(sequence_parallel):
    params = dict(_tp_model(sequence_parallel).named_parameters())
    assert len(params) == 3 + 9 * LAYERS
    for name, param in params.items():
        matches = [suffix for suffix in EXPECTED_SHARDING if name.endswith(suffix)]
        assert len(matches) == 1, name
        placement, local_shape = EXPECTED_SHARDING[matches[0]]
        assert isinstance(param, DTensor) and param.placements == (placement,), name
        assert tuple(param.to_local().shape) == local_shape, name


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_ops_see_plain_local_tensors_with_local_heads(sequence_parallel):
    calls: list[tuple[str, tuple]] = []
    logits = _forward(_tp_model(sequence_parallel, calls))
    assert isinstance(logits, DTensor) and logits.placements == (Shard(2),)
    assert tuple(logits.to_local().shape) == (BATCH, LENGTH, VOCAB // WORLD)
    # the training layout: separate projections, no fused inference ops (add_rms_norm, swiglu_packed)
    assert {name for name, _ in calls} == {"attention", "rms_norm", "rotary", "swiglu"}
    for name, args in calls:
        assert all(not issubclass(kind, DTensor) for kind, _ in args), f"{name} got a DTensor"
    head_dim, local_heads = D_MODEL // HEADS, HEADS // WORLD
    attention_shapes = {args[0][1] for name, args in calls if name == "attention"}
    assert attention_shapes == {(BATCH, local_heads, LENGTH, head_dim)}
    norm_rows = {args[0][1][1] for name, args in calls if name == "rms_norm"}
    assert norm_rows == {LENGTH // WORLD if sequence_parallel else LENGTH}  # SP: each rank normalises a slice


def _counts(mode: CommDebugMode) -> dict[str, int]:
    return {str(op).split(".")[-1].rstrip("')"): n for op, n in mode.get_comm_counts().items()}


# Megatron's communication per step of an L-layer TP model (norms = 2L + 1 including ln_f):
#   no SP: forward one all-reduce per row-parallel output (2L) + the embedding; backward one per norm;
#   SP:    forward all-gather per norm, reduce-scatter per row-parallel output and the embedding;
#          backward the mirror image. loss_parallel's cross-entropy adds 3 all-reduces (max, sum-exp, target).
COLLECTIVES = {
    False: ({"all_reduce": 2 * LAYERS + 1}, {"all_reduce": 2 * (2 * LAYERS + 1) + 3}),
    True: (
        {"all_gather_into_tensor": 2 * LAYERS + 1, "reduce_scatter_tensor": 2 * LAYERS + 1},
        {"all_gather_into_tensor": 4 * LAYERS + 2, "reduce_scatter_tensor": 4 * LAYERS + 2, "all_reduce": 3},
    ),
}


@pytest.mark.filterwarnings("ignore:Full backward hook")  # CommDebugMode's own module hooks
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp_forward_and_backward_issue_exactly_megatrons_collectives(sequence_parallel):
    model = _tp_model(sequence_parallel)
    forward_mode = CommDebugMode()
    with forward_mode:
        _forward(model)
    step_mode = CommDebugMode()
    with step_mode, loss_parallel():
        logits = _forward(model)
        labels = torch.randint(0, VOCAB, (BATCH * LENGTH,))
        F.cross_entropy(logits.flatten(0, 1), labels, reduction="sum").backward()
    assert (_counts(forward_mode), _counts(step_mode)) == COLLECTIVES[sequence_parallel]
