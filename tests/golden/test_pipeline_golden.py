"""The pipeline's sampling plumbing on the fixture's own inputs: which uncond branches it passes and how it
lays out the codes must reproduce the golden codes (greedy, fp32) for t2i, editing and inpainting."""

from __future__ import annotations

import pytest
import torch

from dimoo_npu.pipeline import DiMOOPipeline
from dimoo_npu.settings.generation_settings import ImageSettings
from dimoo_npu.tokens.image_tokenizer import ImageTokenizer
from dimoo_npu.tokens.sequences import ImagePrompt


@pytest.fixture(scope="module")
def pipeline(tiny_model, checkpoint_dir):
    """No text tokenizer: the fixture's inputs are token ids already."""
    return DiMOOPipeline(tiny_model, None, ImageTokenizer.from_pretrained(checkpoint_dir), tiny_model.config, "cpu")


@pytest.mark.parametrize("case", ["t2i_wide_cfg_cache", "i2i", "inpaint"])
def test_pipeline_reproduces_golden_images(case, pipeline, golden, cases):
    settings = cases["cases"][case]
    editing = case == "i2i"
    request = ImagePrompt(
        prompt=golden[f"{case}.prompt"][0],
        uncond=golden[f"{case}.uncond_text" if editing else f"{case}.uncond"][0],
        uncond_image=golden[f"{case}.uncond_image"][0] if editing else None,
        grid=(settings["grid_h"], settings["grid_w"]),
        code_start=settings["code_start"],
    )
    sampling = ImageSettings(
        timesteps=settings["timesteps"],
        temperature=0.0,
        cfg_scale=settings["cfg_scale"],
        cfg_img=settings.get("cfg_img", 0.0),
        use_cache=settings.get("use_cache", False),
    )
    codes = pipeline.sample_grids([request], sampling, seeds=[0])[0]
    assert torch.equal(codes.reshape(-1) + pipeline.tokens["image_offset"], golden[f"{case}.vq_ids"][0])
