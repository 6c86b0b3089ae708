"""The embedded default model: where it ships, its config (own special-token ids) and its checkpoint skeleton.

The vocabulary is laid out as text words (ids below 128), then the special tokens, then the image
codebook, so the embedding table stays small. The skeleton (config.json, tokenizer files, vqvae/) is
what `dimoo pretokenize` needs; training adds the weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from dimoo_npu.files.atomic import write_text_atomically
from dimoo_npu.modeling.config import DiMOOConfig

EMBEDDED_CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "shapes-dimoo"
FIRST_SPECIAL = 128  # word ids stay below this (the world and the task templates use about 100)
_IMAGE_OFFSET = 144
# Understanding answers are trained padded to this many tokens (a two-object caption is 17 words and
# </answer>); sampling uses the same length, one token per step.
ANSWER_LENGTH = 24
# Sampling settings the embedded model is evaluated with, chosen on training-split prompts
# (`dimoo eval shapes --split train`): greedy without guidance (guidance 1-2 lowered it), one image token
# per step (64 steps for 8 x 8 codes). With objects placed anywhere in their third, 16 steps (4 tokens at
# once) mixed two placements into one blob: shape 0.88 at 16 steps, 1.00 at 64 (the model before this one).
# Every image task (text-to-image, editing, painting) uses them; the model never saw an image-dropped
# prompt, so image guidance (cfg_img) is off too.
IMAGE_SETTINGS = {"timesteps": 64, "temperature": 0.0, "cfg_scale": 0.0, "cfg_img": 0.0}
ANSWER_SETTINGS = {
    "gen_length": ANSWER_LENGTH,
    "block_length": ANSWER_LENGTH,
    "steps": ANSWER_LENGTH,
    "temperature": 0.0,
}
# Written into the shipped config.json: what the CLI should default to for this model (its public
# defaults, 1024 x 1024 images and 1024-token answers, do not fit a 256-token model).
GENERATION_DEFAULTS = {"width": 128, "height": 128, "image_budget": 128, **IMAGE_SETTINGS, **ANSWER_SETTINGS}


def special_tokens(codebook_size: int) -> dict[str, int]:
    """The embedded model's own table (same names as DiMOO's, small ids)."""
    names = ("eos", "mask", "newline", "boa", "eoa", "boi", "eoi", "uncondition", "answer_pad")
    table = {name: FIRST_SPECIAL + index for index, name in enumerate(names)}
    table.update(image_offset=_IMAGE_OFFSET, codebook_size=codebook_size, vocab=_IMAGE_OFFSET + codebook_size)
    return table


def model_config(
    codebook_size: int,
    d_model: int = 256,
    n_layers: int = 6,
    n_heads: int = 8,
    mlp_hidden_size: int = 704,
    max_sequence_length: int = 256,
) -> dict[str, Any]:
    """The LLaDA config.json dict of the embedded model."""
    table = special_tokens(codebook_size)
    config = DiMOOConfig(
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        mlp_hidden_size=mlp_hidden_size,
        embedding_size=table["vocab"],
        rope_theta=10000.0,
        max_sequence_length=max_sequence_length,
        special_tokens=table,
    )
    return config.to_hf_dict()


def build_skeleton(folder: str | Path, vq_folder: str | Path, config: dict[str, Any]) -> Path:
    """config.json + word tokenizer + vqvae/ in ``folder``: everything but the transformer weights."""
    from dimoo_npu.shapes import world
    from dimoo_npu.tokens.text_tokenizer import build_word_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(folder / "config.json", json.dumps(config, indent=2))
    build_word_tokenizer(
        world.vocabulary_words(),
        folder,
        special_tokens=config["special_tokens"],
        max_length=config["max_sequence_length"],
    )
    target = folder / "vqvae"
    if Path(vq_folder).resolve() != target.resolve():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(vq_folder, target)
    return folder
