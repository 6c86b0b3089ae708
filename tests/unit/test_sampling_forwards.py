"""What the samplers ask of the model: one forward per step for all prompts and CFG branches, and only the
logits the step needs (positions and vocabulary slice)."""

from __future__ import annotations

import pytest
from torch import nn

from dimoo_npu.sampling import sample_image, sample_text
from dimoo_npu.sampling.schedule import keep_masked_table, masked_upper_bounds, refresh_steps


class Spy(nn.Module):
    """Records every forward's inputs and output shape, then runs the real model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, []

    def forward(self, input_ids, attention_mask=None, **kwargs):
        out = self.model(input_ids, attention_mask, **kwargs)
        self.calls.append(dict(ids=tuple(input_ids.shape), out=tuple(out.shape), **kwargs))
        return out

    def check_token_ids(self, input_ids):
        self.model.check_token_ids(input_ids)


@pytest.fixture
def spy(tiny_model):
    return Spy(tiny_model)


def test_t2i_one_forward_per_step_with_code_logits_of_masked_cells(spy, golden):
    prompts = [golden["t2i_cfg.prompt"][0], golden["t2i_cfg.prompt"][0, 3:]]  # two prompt lengths
    uncond = [golden["t2i_cfg.uncond"][0], golden["t2i_cfg.uncond"][0, :5]]
    sample_image(spy, prompts, uncond_ids=uncond, timesteps=8, temperature=0.0, cfg_scale=2.5)
    tok = spy.config.special_tokens
    codes = (tok["image_offset"], tok["image_offset"] + tok["codebook_size"])
    assert len(spy.calls) == 8
    for call in spy.calls:
        assert call["ids"] == (4, 96), "2 prompts x 2 branches in one padded forward"
        assert call["vocab_range"] == codes
        assert call["out"] == (4, call["logits_for"].shape[1], 8192)
    bounds = masked_upper_bounds([64], keep_masked_table([64], 8))  # masked cells left before each step
    assert [call["logits_for"].shape[1] for call in spy.calls] == [b[0] for b in bounds]
    assert bounds[0] == [64] and bounds[-1] == [12]


def test_cached_steps_run_only_the_recompute_positions(spy, golden):
    sample_image(
        spy,
        golden["t2i_wide_cfg_cache.prompt"],
        uncond_ids=golden["t2i_wide_cfg_cache.uncond"],
        timesteps=10,
        temperature=0.0,
        cfg_scale=4.0,
        use_cache=True,
    )
    schedule = refresh_steps(10, True, 0.3, 5)  # full steps 0-3 and 8
    assert len(spy.calls) == 10
    for step, (full, call) in enumerate(zip(schedule, spy.calls, strict=True)):
        assert call["vocab_range"][1] - call["vocab_range"][0] == 8192
        if full and step + 1 < 10 and not schedule[step + 1]:  # fills the cache: logits of every position
            assert call["ids"] == (2, 56) and call["out"] == (2, 56, 8192) and call.get("logits_for") is None
        elif full:  # nothing to cache: the masked cells only
            assert call["ids"] == (2, 56) and call["out"][1] == call["logits_for"].shape[1] <= 28
        else:  # about 10% of 56 positions, at their true rotary positions
            assert call["ids"][0] == 2 and 4 <= call["ids"][1] <= 8
            assert tuple(call["positions"].shape) == call["ids"]
    assert sum(call["ids"][1] < 56 for call in spy.calls) == schedule.count(False) == 5


def test_understanding_asks_for_the_block_only(spy, golden):
    sample_text(spy, golden["mmu_cfg.prompt"], gen_length=12, block_length=4, steps=6, cfg_scale=1.5)
    assert len(spy.calls) == 6
    for index, call in enumerate(spy.calls):
        block = index // 2
        assert call["ids"] == (2, 56) and call["out"] == (2, 4, 134548)
        assert call["logits_for"][0].tolist() == list(range(43 + 4 * block, 47 + 4 * block))
