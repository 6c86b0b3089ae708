"""Device-to-host reads of the samplers, counted per step on the tiny fixture model.

On a GPU or an NPU every read of a tensor's value on the host (item, tolist, int/float/bool of a tensor) and every
op whose output shape depends on the data (nonzero, boolean-mask indexing, masked_select, unique) stalls the
launch queue. The bound: at most one such read per image step (with or without ML-Cache) and per answer block of
`sample_text`, beyond a fixed handful at the setup of a call.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dimoo_npu.sampling import sample_image, sample_text
from dimoo_npu.utils.errors import InputError

# Tensor methods and torch functions that hand a tensor's value to the host or size their output by it.
READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__bool__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.masked_select,
    torch.masked_select,
    torch.Tensor.unique,
    torch.unique,
    torch.unique_consecutive,
    torch.Tensor.unique_consecutive,
    torch.argwhere,
}
SETUP_READS = 14  # per call of batch 2: id range check, schedules, layout checks of each prompt row


class HostReads(TorchFunctionMode):
    """Counts host reads made by Python code (reads inside torch itself are not Python calls, so not seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func in READS
            or (func is torch.Tensor.__getitem__ and _has_bool_index(args[1]))
            or _one_arg_where(func, args, kwargs)
        ):
            self.count += 1
            self.seen.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _one_arg_where(func, args, kwargs) -> bool:
    return func is torch.where and len(args) + len(kwargs) == 1


def _counted(fn) -> HostReads:
    with HostReads() as reads:
        fn()
    return reads


def _image_rows(golden, name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Batch 2: the case's prompt twice, the second with 3 more text tokens (so the rows are padded)."""
    prompt, uncond = golden[f"{name}.prompt"][0], golden[f"{name}.uncond"][0]
    longer = torch.cat([prompt[:3], prompt])
    return [prompt, longer], [uncond, uncond[:-2]]


def _sample_image(tiny_model, golden, use_cache: bool, timesteps: int):
    prompts, uncond = _image_rows(golden, "t2i_wide_cfg")
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    return lambda: sample_image(
        tiny_model,
        prompts,
        uncond_ids=uncond,
        timesteps=timesteps,
        temperature=1.0,
        cfg_scale=4.0,
        use_cache=use_cache,
        warmup_ratio=0.2,
        refresh_interval=3,
        generator=generators,
    )


def test_counter_sees_each_kind_of_read():
    """Guard: the counter counts what it claims to."""
    x = torch.arange(6)
    reads = _counted(
        lambda: (x.sum().item(), x.tolist(), int(x[0]), bool(x[1]), x.nonzero(), x[x > 2], x.masked_select(x > 1))
    )
    assert reads.count == 7, reads.seen


def test_image_steps_read_nothing_from_the_host(tiny_model, golden):
    """Zero reads per step, with and without ML-Cache: 8 more steps add no read (the bound asked is one)."""
    for use_cache in (False, True):
        few, many = (_counted(_sample_image(tiny_model, golden, use_cache, steps)) for steps in (4, 12))
        assert many.count == few.count, f"cache {use_cache}: {many.count - few.count} reads in 8 more steps {many.seen}"
        assert few.count <= SETUP_READS, few.seen


def _text_reads(tiny_model, golden, cases, block_length: int, steps: int, **modes) -> HostReads:
    case = cases["cases"]["mmu_cfg"]
    prompt = golden["mmu_cfg.prompt"][0]
    return _counted(
        lambda: sample_text(
            tiny_model,
            [prompt, torch.cat([prompt[:2], prompt])],
            gen_length=case["gen_length"],
            block_length=block_length,
            steps=steps,
            temperature=1.0,
            cfg_scale=case["cfg_scale"],
            generator=torch.Generator().manual_seed(0),
            **modes,
        )
    )


def test_text_reads_the_host_at_most_once_per_block(tiny_model, golden, cases):
    one_block = _text_reads(tiny_model, golden, cases, block_length=12, steps=3)
    three_blocks = _text_reads(tiny_model, golden, cases, block_length=4, steps=3)
    three_blocks_more_steps = _text_reads(tiny_model, golden, cases, block_length=4, steps=6)
    assert three_blocks_more_steps.count == three_blocks.count, "a step read the host"
    assert three_blocks.count - one_block.count <= 2, (three_blocks.seen, one_block.seen)
    assert one_block.count <= SETUP_READS, one_block.seen


@pytest.mark.parametrize("kv_cache", ["prefix", "dual"])
def test_cached_text_steps_read_nothing_from_the_host(tiny_model, golden, cases, kv_cache):
    exact = _text_reads(tiny_model, golden, cases, block_length=4, steps=3)
    more_steps = _text_reads(tiny_model, golden, cases, block_length=4, steps=6, kv_cache=kv_cache)
    assert more_steps.count == exact.count, more_steps.seen


@pytest.mark.parametrize("kv_cache", ["none", "dual"])
def test_threshold_reads_the_host_once_per_step_and_no_more_per_block(tiny_model, golden, cases, kv_cache):
    """The threshold's one read per step (is the block revealed?) also carries the block's EOS check: 3 blocks
    of 2 steps read 6 times where exact reads 2 (an EOS check at the end of each block but the last; threshold 1.0:
    no block ends early on the random model)."""
    exact = _text_reads(tiny_model, golden, cases, block_length=4, steps=6, kv_cache=kv_cache)
    threshold = _text_reads(
        tiny_model, golden, cases, block_length=4, steps=6, kv_cache=kv_cache, parallel_threshold=1.0
    )
    assert threshold.count - exact.count == 6 - 2, (threshold.seen, exact.seen)


def test_forward_checks_the_id_range_unless_told_not_to(tiny_model):
    """Called directly, forward refuses ids outside the vocabulary; samplers check once and pass check_ids=False."""
    ids = torch.tensor([[1, 2, tiny_model.config.embedding_size]])
    with pytest.raises(InputError, match="outside the vocabulary"):
        tiny_model(ids)
    reads = _counted(lambda: tiny_model(ids[:, :2], check_ids=False))
    assert reads.count == 0, reads.seen
