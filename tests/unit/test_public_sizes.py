"""The public checkpoint's own sizes through `sample_image` (the CLI tests run 1024 x 1024 and 768 x 1536):
each is longer than the 4096 tokens its config names."""

from __future__ import annotations

import torch

from dimoo_npu.sampling import sample_image
from dimoo_npu.tokens import sequences


def test_1536x768_samples_past_max_sequence_length(tiny_model):
    width, height = 1536, 768
    tokens = tiny_model.config.special_tokens
    text = torch.randint(0, tokens["eos"], (24,), generator=torch.Generator().manual_seed(0))
    grid = (height // 16, width // 16)
    request = sequences.generation_prompt(text, text[:8], sequences.masked_cells(grid, tokens), tokens)
    # 24 prompt tokens, BOA BOI, rows each with an end-of-line, EOI EOA
    assert len(request.prompt) == 24 + 4 + grid[0] * (grid[1] + 1) > tiny_model.config.max_sequence_length
    codes = sample_image(
        tiny_model, [request.prompt], uncond_ids=[request.uncond], timesteps=2, temperature=0.0, cfg_scale=4.0
    )
    offset = tokens["image_offset"]
    assert codes.shape == (1, grid[0] * grid[1])
    assert bool(((codes >= offset) & (codes < offset + tokens["codebook_size"])).all())
