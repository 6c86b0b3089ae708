"""Greedy ML-Cache steps guide only the cells they recomputed: same tokens as guiding every masked cell."""

from __future__ import annotations

import torch

from dimoo_npu.sampling import image, sample_image
from dimoo_npu.sampling.step import sample_codes


def _every_masked_cell(run, cache, recompute, slots):
    """The general cached step: guide, sample and score every slot from the cache's logits."""
    positions = run.batch.positions(slots)
    logits = image._forward(run.model, run.batch, positions, cache, "cached", recompute, run.codes)
    guided = run.guide(logits.view(run.batch.branches, -1, *logits.shape[1:]))
    return sample_codes(guided, 0.0, run.generators, [slots.shape[1]] * slots.shape[0])


def _sample(model, golden, cache_ratio: float):
    prompt, uncond = golden["t2i_cfg.prompt"][0], golden["t2i_cfg.uncond"][0]
    return sample_image(
        model,
        [prompt, prompt[4:]],  # two prompt lengths: padded rows
        uncond_ids=[uncond, uncond[:5]],
        timesteps=12,
        temperature=0.0,
        cfg_scale=3.0,
        use_cache=True,
        cache_ratio=cache_ratio,
        warmup_ratio=0.2,
        refresh_interval=4,
    )


def test_greedy_cached_steps_equal_guiding_every_masked_cell(tiny_model, golden, monkeypatch):
    calls = []
    fast_step = image._Run._cached_greedy
    monkeypatch.setattr(image._Run, "_cached_greedy", lambda *a: calls.append(1) or fast_step(*a))
    fast = {ratio: _sample(tiny_model, golden, ratio) for ratio in (0.9, 0.5)}
    assert len(calls) >= 8, "the schedule must have cached steps"
    monkeypatch.setattr(image._Run, "_cached_greedy", _every_masked_cell)
    for ratio, tokens in fast.items():
        assert torch.equal(tokens, _sample(tiny_model, golden, ratio)), ratio
