"""Bad sampler input: one clear InputError (a ValueError) each, raised before any forward."""

from __future__ import annotations

import pytest
import torch

from dimoo_npu.sampling import sample_image, sample_text
from dimoo_npu.settings.generation_settings import ImageSettings, TextSettings
from dimoo_npu.utils.errors import InputError


@pytest.fixture(scope="module")
def t2i(golden):
    return golden["t2i_wide_cfg.prompt"], golden["t2i_wide_cfg.uncond"]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(cfg_scale=2.0), "needs uncond_ids"),
        (dict(cfg_img=1.0), "needs uncond_image_ids"),
        (dict(cfg_scale=-1.0, with_uncond=True), "cfg_scale=-1.0 is negative"),
        (dict(cfg_img=-0.5, with_uncond=True), "cfg_img=-0.5 is negative"),
        (dict(temperature=-1.0), "temperature=-1.0 is negative"),
        (dict(timesteps=0), "timesteps=0 must be a positive integer"),
        (dict(timesteps=-3), "timesteps=-3 must be a positive integer"),
        (dict(refresh_interval=0, use_cache=True), "refresh_interval=0"),
        (dict(cache_ratio=1.5, use_cache=True), "cache_ratio=1.5"),
        (dict(code_start=5), "not laid out as prompt"),
        (dict(generator=[torch.Generator()] * 2), "list of 1 generators"),
    ],
)
def test_image_settings(tiny_model, t2i, kwargs, words):
    prompt, uncond = t2i
    settings = dict(timesteps=4, temperature=0.0)
    kwargs = dict(kwargs)
    if kwargs.pop("with_uncond", False):
        settings["uncond_ids"] = uncond
    with pytest.raises(InputError, match=words):
        sample_image(tiny_model, prompt, **{**settings, **kwargs})


@pytest.mark.parametrize("cache_ratio, warmup_ratio", [(0.0, 0.0), (1.0, 1.0)])
def test_settings_checked_before_loading_accept_what_the_sampler_accepts(tiny_model, t2i, cache_ratio, warmup_ratio):
    prompt, _ = t2i
    ratios = dict(cache_ratio=cache_ratio, warmup_ratio=warmup_ratio)
    ImageSettings(timesteps=4, temperature=0.0, cfg_scale=0.0, use_cache=True, **ratios).check()
    cells = sample_image(tiny_model, prompt, timesteps=4, temperature=0.0, use_cache=True, **ratios)
    assert cells.shape[0] == 1
    with pytest.raises(InputError, match="cache_ratio=1.5 must be within"):
        ImageSettings(cache_ratio=1.5).check()
    with pytest.raises(InputError, match="steps=7 cannot be split equally over 2 blocks"):
        TextSettings(gen_length=16, block_length=8, steps=7).check()


def test_uncond_rows_must_match_prompts(tiny_model, t2i):
    prompt, uncond = t2i
    with pytest.raises(InputError, match="2 rows for 1 prompts"):
        sample_image(tiny_model, prompt, uncond_ids=uncond.repeat(2, 1), timesteps=4, cfg_scale=1.0)


def test_rows_with_different_grid_sizes(tiny_model, golden, t2i):
    prompt, _ = t2i
    with pytest.raises(ValueError, match="different grid sizes"):
        sample_image(tiny_model, [prompt[0], golden["t2i_cfg.prompt"][0]], timesteps=4)


def test_no_mask_cell_to_sample(tiny_model, tok, t2i):
    prompt = t2i[0].clone()
    prompt[prompt == tok["mask"]] = tok["image_offset"] + 7
    with pytest.raises(InputError, match="no MASK cell"):
        sample_image(tiny_model, prompt, timesteps=4)


def test_prompt_without_boa_boi(tiny_model, tok, t2i):
    prompt = t2i[0].clone()
    prompt[prompt == tok["boi"]] = 5
    with pytest.raises(InputError, match="no BOA immediately followed by BOI"):
        sample_image(tiny_model, prompt, timesteps=4)


def test_prompt_of_wrong_type(tiny_model, t2i):
    with pytest.raises(InputError, match="LongTensor"):
        sample_image(tiny_model, t2i[0][0].tolist(), timesteps=4)
    with pytest.raises(InputError, match="1-D integer"):
        sample_image(tiny_model, [t2i[0][0].float()], timesteps=4)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(gen_length=16, block_length=5, steps=8), "not a multiple of block_length"),
        (dict(gen_length=16, block_length=8, steps=7), "cannot be split equally over 2 blocks"),
        (dict(gen_length=16, block_length=8, steps=0), "steps=0 must be a positive integer"),
        (dict(gen_length=16, block_length=8, steps=8, cfg_scale=-2.0), "cfg_scale=-2.0 is negative"),
        (dict(gen_length=40, block_length=8, steps=10), "too few for a 40-token answer"),
    ],
)
def test_text_settings(tiny_model, golden, kwargs, words):
    with pytest.raises(InputError, match=words):
        sample_text(tiny_model, golden["mmu.prompt"], **kwargs)


def test_text_prompt_without_boa(tiny_model, tok, golden):
    prompt = golden["mmu.prompt"].clone()
    prompt[prompt == tok["boa"]] = 5
    with pytest.raises(InputError, match="no BOA"):
        sample_text(tiny_model, prompt, gen_length=16, block_length=8, steps=8)
