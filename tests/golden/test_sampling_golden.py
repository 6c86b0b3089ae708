"""Sampling cases of the tiny-dimoo fixtures, token for token at temperature 0 (fp32 CPU), and the schedules."""

from __future__ import annotations

import json

import pytest
import torch

from dimoo_npu.sampling import cosine_keep_masked, sample_image, sample_text, transfer_tokens

IMAGE_CASES = ["t2i_nocfg", "t2i_cfg", "t2i_wide_cfg", "t2i_wide_cfg_cache", "t2i_many_steps", "inpaint"]
TEXT_CASES = ["mmu", "mmu_cfg"]


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_image_case(tiny_model, golden, cases, name):
    case = cases["cases"][name]
    prompt = golden[f"{name}.prompt"]
    out = sample_image(
        tiny_model,
        prompt,
        uncond_ids=golden[f"{name}.uncond"],
        timesteps=case["timesteps"],
        temperature=case["temperature"],
        cfg_scale=case["cfg_scale"],
        use_cache=case.get("use_cache", False),
        cache_ratio=case.get("cache_ratio", 0.9),
        warmup_ratio=case.get("warmup_ratio", 0.3),
        refresh_interval=case.get("refresh_interval", 5),
    )
    assert out.shape == (1, case["grid_h"] * case["grid_w"])
    assert torch.equal(out, golden[f"{name}.vq_ids"])
    assert torch.equal(prompt, golden[f"{name}.prompt"]), "the sampler must not modify its input"


def test_image_case_code_start_given(tiny_model, golden, cases):
    case = cases["cases"]["t2i_cfg"]
    out = sample_image(
        tiny_model,
        [golden["t2i_cfg.prompt"][0]],
        uncond_ids=[golden["t2i_cfg.uncond"][0]],
        code_start=case["code_start"],
        timesteps=case["timesteps"],
        temperature=0.0,
        cfg_scale=case["cfg_scale"],
    )
    assert torch.equal(out, golden["t2i_cfg.vq_ids"])


def test_editing_dual_cfg(tiny_model, golden, cases):
    case = cases["cases"]["i2i"]
    out = sample_image(
        tiny_model,
        golden["i2i.prompt"],
        uncond_ids=golden["i2i.uncond_text"],
        uncond_image_ids=golden["i2i.uncond_image"],
        timesteps=case["timesteps"],
        temperature=case["temperature"],
        cfg_scale=case["cfg_scale"],
        cfg_img=case["cfg_img"],
    )
    assert torch.equal(out, golden["i2i.vq_ids"])


def test_cache_changes_the_cached_case(golden):
    """Guard: the cached case differs from the same settings without cache, so its test checks the cache."""
    assert not torch.equal(golden["t2i_wide_cfg.vq_ids"], golden["t2i_wide_cfg_cache.vq_ids"])


@pytest.mark.parametrize("name", TEXT_CASES)
def test_understanding_case(tiny_model, golden, cases, name):
    case = cases["cases"][name]
    out = sample_text(
        tiny_model,
        golden[f"{name}.prompt"],
        gen_length=case["gen_length"],
        block_length=case["block_length"],
        steps=case["steps"],
        temperature=case["temperature"],
        cfg_scale=case["cfg_scale"],
    )
    assert torch.equal(out, golden[f"{name}.output"])


def test_understanding_case_as_list(tiny_model, golden, cases):
    case = cases["cases"]["mmu_cfg"]
    out = sample_text(
        tiny_model,
        [golden["mmu_cfg.prompt"][0]],
        code_start=case["code_start"],
        gen_length=case["gen_length"],
        block_length=case["block_length"],
        steps=case["steps"],
        cfg_scale=case["cfg_scale"],
    )
    assert isinstance(out, list) and torch.equal(out[0], golden["mmu_cfg.output"][0])


@pytest.fixture(scope="module")
def schedules(fixture_dir):
    return json.loads((fixture_dir / "schedules.json").read_text())


def test_cosine_keep_masked(schedules):
    for entry in schedules["cosine_keep_masked"]:
        assert cosine_keep_masked(entry["vq_len"], entry["timesteps"]) == entry["keep_masked"]


def test_cosine_keep_masked_is_float32():
    """SPEC: in float64, N=1024, T=18, s=11 gives 512; the reference (float32) gives 511."""
    assert cosine_keep_masked(1024, 18)[11] == 511


def test_transfer_tokens(schedules):
    for entry in schedules["transfer_tokens"]:
        assert transfer_tokens(entry["masked"], entry["steps"]) == entry["per_step"]
