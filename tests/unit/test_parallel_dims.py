"""The model transformations of `dimoo_npu.parallel` that need no process group: stages, recompute, the mesh."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dimoo_npu.model import DiMOOModel
from dimoo_npu.modeling.losses import masked_diffusion_loss
from dimoo_npu.parallel import ParallelDims, build_mesh
from dimoo_npu.parallel.pipeline_parallel import split_stage, stage_layer_counts
from dimoo_npu.parallel.recompute import apply_recompute
from dimoo_npu.utils.errors import ConfigError
from tests.unit.train_support import masked_batch, small_config


def test_world_size_is_the_product():
    assert ParallelDims(pp=2, dp=3, tp=2).world_size == 12
    assert ParallelDims().world_size == 1


def test_world_of_one_has_no_mesh():
    assert build_mesh(ParallelDims(), "cpu") is None


@pytest.mark.parametrize(
    ("layers", "stages", "explicit", "expected"),
    [(4, 2, None, [2, 2]), (7, 3, None, [3, 2, 2]), (4, 2, [1, 3], [1, 3]), (5, 1, None, [5])],
)
def test_stage_layer_counts(layers, stages, explicit, expected):
    assert stage_layer_counts(layers, stages, explicit) == expected


@pytest.mark.parametrize("explicit", [[2, 1], [4, 0], [1, 1, 2]])
def test_bad_explicit_stage_split_is_refused(explicit):
    with pytest.raises(ConfigError, match="pipeline_num_layers"):
        stage_layer_counts(4, 2, explicit)


def test_split_stage_keeps_only_its_modules():
    first = split_stage(DiMOOModel(small_config()), 0, [1, 3])
    last = split_stage(DiMOOModel(small_config()), 1, [1, 3])
    assert list(first.transformer.blocks) == ["0"] and first.transformer.ln_f is None
    assert first.transformer.wte is not None and first.transformer.ff_out is None
    assert list(last.transformer.blocks) == ["1", "2", "3"] and last.transformer.wte is None
    hidden = first(torch.randint(0, 200, (2, 8)))
    assert hidden.shape == (2, 8, 48)
    assert last(hidden).shape == (2, 8, 256)


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.name().split("::")[-1].split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def _backward_ops(recompute: str) -> Counter[str]:
    torch.manual_seed(0)
    model = apply_recompute(DiMOOModel(small_config()), recompute)
    ids, labels = masked_batch()
    loss = masked_diffusion_loss(model(ids), labels)
    with _OpCounter() as counter:
        loss.backward()
    return counter.counts


def test_selective_recompute_repeats_elementwise_ops_but_no_matmul_or_attention():
    plain, full, selective = (_backward_ops(mode) for mode in ("none", "full", "selective"))
    attention = "_scaled_dot_product_flash_attention_for_cpu"
    assert plain["silu"] == 0 and plain[attention] == 0
    assert full["mm"] > plain["mm"] and full[attention] == full["silu"] == 4  # whole blocks again
    assert selective["mm"] == plain["mm"] and selective[attention] == 0  # matmuls and attention kept
    assert selective["silu"] == 4  # elementwise work recomputed
