"""Shared pieces of the Self-GRPO tests: a tiny random model with the tiny CPU config's special tokens, and
recorded image rollouts of it."""

from __future__ import annotations

import torch

from dimoo_npu import sequences
from dimoo_npu.config import DiMOOConfig
from dimoo_npu.model import DiMOOModel
from dimoo_npu.sampling import sample_image
from tests.unit.train_support import tiny_special_tokens

GRID = (2, 3)


def tiny_policy(seed: int = 0) -> DiMOOModel:
    special = tiny_special_tokens()
    config = DiMOOConfig(
        d_model=16, n_layers=1, n_heads=2, mlp_hidden_size=32, embedding_size=special["vocab"],
        rope_theta=1e4, max_sequence_length=64, special_tokens=special,
    )  # fmt: skip
    torch.manual_seed(seed)
    return DiMOOModel(config)


def image_prompts(lengths=(3, 5)) -> list[torch.Tensor]:
    """One text-to-image prompt per length (different lengths: the batch is padded)."""
    tokens = tiny_special_tokens()
    cells = sequences.masked_cells(GRID, tokens)
    return [sequences.generation_prompt(torch.arange(1, 1 + n), None, cells, tokens).prompt for n in lengths]


def image_rollout(model, steps: int = 3, seed: int = 0):
    prompts = image_prompts()
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return sample_image(model, prompts, timesteps=steps, temperature=1.0, generator=generators, record=True)
