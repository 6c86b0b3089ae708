"""Parallel degrees, options and the single-process path of `parallelize` (no process group needed)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dimoo_npu.config import DiMOOConfig
from dimoo_npu.errors import ConfigError, InputError
from dimoo_npu.losses import masked_diffusion_loss
from dimoo_npu.model import DiMOOModel
from dimoo_npu.parallel import ParallelDims, ParallelOptions, build_mesh, parallelize
from dimoo_npu.parallel.pipeline_parallel import split_stage, stage_layer_counts
from dimoo_npu.parallel.recompute import apply_recompute


def _config(**overrides) -> DiMOOConfig:
    sizes = dict(d_model=48, n_layers=4, n_heads=6, mlp_hidden_size=96, embedding_size=256, rope_theta=1e4)
    sizes.update(overrides)
    return DiMOOConfig(**sizes, max_sequence_length=32, special_tokens={"mask": 250, "vocab": 256})


def test_world_size_is_the_product():
    assert ParallelDims(pp=2, dp=3, tp=2).world_size == 12
    assert ParallelDims().world_size == 1


@pytest.mark.parametrize(
    ("dims", "world", "message"),
    [
        (ParallelDims(tp=4), 4, "does not divide the model's n_heads"),  # 6 heads
        (ParallelDims(tp=3), 3, "does not divide the model's mlp_hidden_size"),  # with mlp_hidden_size 100
        (ParallelDims(pp=5), 5, "larger than the model's 4 layers"),
        (ParallelDims(pp=2, tp=2), 8, "does not match the world size 8"),
        (ParallelDims(dp=0), 0, "must be an integer >= 1"),
    ],
)
def test_invalid_layouts_are_refused_with_the_fix(dims, world, message):
    config = _config(mlp_hidden_size=100) if dims.tp == 3 else _config()
    with pytest.raises(ConfigError, match=message):
        dims.validate(config, world)


def test_valid_layout_passes():
    ParallelDims(pp=4, dp=2, tp=2).validate(_config(), 16)


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
    first = split_stage(DiMOOModel(_config()), 0, [1, 3])
    last = split_stage(DiMOOModel(_config()), 1, [1, 3])
    assert list(first.transformer.blocks) == ["0"] and first.transformer.ln_f is None
    assert first.transformer.wte is not None and first.transformer.ff_out is None
    assert list(last.transformer.blocks) == ["1", "2", "3"] and last.transformer.wte is None
    hidden = first(torch.randint(0, 200, (2, 8)))
    assert hidden.shape == (2, 8, 48)
    assert last(hidden).shape == (2, 8, 256)


@pytest.mark.parametrize(
    ("options", "dims", "message"),
    [
        (ParallelOptions(recompute="some"), ParallelDims(), "recompute='some'"),
        (ParallelOptions(pp_schedule="ZB"), ParallelDims(), "pp_schedule='ZB'"),
        (ParallelOptions(microbatches=0), ParallelDims(), "microbatches=0"),
        (ParallelOptions(microbatches=2), ParallelDims(pp=4), "at least as many micro-batches"),
        (ParallelOptions(sequence_parallel=True), ParallelDims(), "needs tensor_model_parallel_size > 1"),
        (ParallelOptions(data_parallel="ddp"), ParallelDims(dp=2, tp=2), "does not take tensor-parallel DTensors"),
        (ParallelOptions(data_parallel="ddp", microbatches=2), ParallelDims(pp=2, dp=2), "not supported with pipeline"),
    ],
)
def test_invalid_options_are_refused(options, dims, message):
    with pytest.raises(ConfigError, match=message):
        options.validate(dims)


def _batch(rows: int = 4, length: int = 8):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 240, (rows, length), generator=gen)
    masked = torch.rand(rows, length, generator=gen) < 0.5
    return torch.where(masked, 250, ids), torch.where(masked, ids, -100)


@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
def test_single_process_step_equals_the_plain_loss_and_gradients(recompute):
    torch.manual_seed(0)
    plain = DiMOOModel(_config())
    model = DiMOOModel(_config())
    model.load_state_dict(plain.state_dict())
    ids, labels = _batch()
    expected = masked_diffusion_loss(plain(ids), labels)
    expected.backward()
    options = ParallelOptions(microbatches=2, recompute=recompute)
    wrapped = parallelize(model, ParallelDims(), None, options, torch.device("cpu"))
    loss = wrapped.forward_backward(ids, labels)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=0)
    grads = {name.replace("._checkpoint_wrapped_module", ""): p.grad for name, p in model.named_parameters()}
    for name, param in plain.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-7)
    norm = wrapped.clip_grad_norm(1e-3)
    assert norm > 1e-3
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    torch.testing.assert_close(clipped, torch.tensor(1e-3), rtol=1e-4, atol=0)


def test_batch_that_does_not_split_into_microbatches_is_refused():
    wrapped = parallelize(DiMOOModel(_config()), ParallelDims(), None, ParallelOptions(microbatches=3), "cpu")
    with pytest.raises(InputError, match="micro-batches"):
        wrapped.forward_backward(*_batch(rows=4))


def test_single_process_bf16_computes_in_bf16_and_keeps_fp32_master_weights():
    torch.manual_seed(0)
    model = DiMOOModel(_config())
    ids, labels = _batch()
    expected = float(masked_diffusion_loss(model(ids), labels).detach())
    seen = []
    model.transformer.blocks["0"].q_proj.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    options = ParallelOptions(param_dtype=torch.bfloat16)
    loss = float(parallelize(model, ParallelDims(), None, options, torch.device("cpu")).forward_backward(ids, labels))
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert loss != expected and abs(loss - expected) < 1e-2 * expected


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.name().split("::")[-1].split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def _backward_ops(recompute: str) -> Counter[str]:
    torch.manual_seed(0)
    model = apply_recompute(DiMOOModel(_config()), recompute)
    ids, labels = _batch()
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
