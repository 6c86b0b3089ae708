"""Shared pieces of the Self-GRPO tests: a tiny random model with the tiny CPU config's special tokens, recorded
image rollouts of it, and the shipped Self-GRPO run config on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dimoo_npu.model import DiMOOModel
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.sampling import sample_image
from dimoo_npu.shapes.embedded import EMBEDDED_CHECKPOINT
from dimoo_npu.tokens import sequences
from dimoo_npu.train.config import TrainConfig, load_config
from tests.unit.train_support import tiny_special_tokens

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "train" / "shapes_self_grpo.yaml"

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


def tiny_grpo_config(tmp: Path, *overrides: str) -> TrainConfig:
    """The shipped Self-GRPO config on a fresh one-layer model with the bundled model's vocabulary and assets,
    rolling out text-to-image only (the edit and caption tasks have their own test) at temperature 1.0 (the shipped
    1.3 suits the bundled model; on a random one it makes the single-process and two-rank losses, both near 0,
    differ by more than the comparison allows at 2 threads)."""
    model = DiMOOConfig.from_json(EMBEDDED_CHECKPOINT).to_hf_dict()
    model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden_size=64)
    base = [
        f"output_dir={tmp / 'run'}", "model.init_from=null", f"model.config={json.dumps(model)}",
        f"rl.assets={EMBEDDED_CHECKPOINT}", "rl.timesteps=4", "rl.answer_steps=2", "rl.num_generations=2",
        "global_batch_size=4", "micro_batch_size=2", "lr=1e-3", "train_iters=3", "save_interval=0",
        "plot=false", "rl.tasks=[t2i]", "rl.augment=false", "rl.eval_interval=0", "rl.temperature=1.0",
    ]  # fmt: skip
    return load_config(CONFIG, [*base, *overrides])
