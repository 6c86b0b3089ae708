"""Shared pieces of the training tests: the tiny CPU run config and synthetic pre-tokenized shards."""

from __future__ import annotations

from pathlib import Path

import torch

from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.train.config import TrainConfig, load_config
from dimoo_npu.train.shards import Sample, write_shard

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "train" / "tiny_cpu.yaml"


def small_config(**overrides) -> DiMOOConfig:
    """A 4-layer model whose widths take tp 1, 2, 3 and 6 (6 heads of 8)."""
    sizes = dict(d_model=48, n_layers=4, n_heads=6, mlp_hidden_size=96, embedding_size=256, rope_theta=1e4)
    sizes.update(overrides)
    return DiMOOConfig(**sizes, max_sequence_length=32, special_tokens={"mask": 250, "vocab": 256})


def masked_batch(rows: int = 4, length: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of `small_config`'s vocabulary: about half the positions masked and labelled."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 240, (rows, length), generator=gen)
    masked = torch.rand(rows, length, generator=gen) < 0.5
    return torch.where(masked, 250, ids), torch.where(masked, ids, -100)


def tiny_special_tokens() -> dict[str, int]:
    return dict(load_config(TINY_CONFIG).model.config["special_tokens"])


def synthetic_sample(generator: torch.Generator, task: str, special: dict[str, int]) -> Sample:
    """A plausible sequence of the tiny vocabulary: prompt text, then an image (rows + end-of-line) or text answer."""
    prompt_length = int(torch.randint(6, 12, (), generator=generator))
    prompt = torch.randint(0, special["newline"], (prompt_length,), generator=generator)
    if task == "mmu":
        answer = torch.randint(
            0, special["newline"], (int(torch.randint(3, 8, (), generator=generator)),), generator=generator
        )
        pad = torch.full((10 - len(answer),), special["answer_pad"])
        body = torch.cat([torch.tensor([special["boa"]]), answer, pad, torch.tensor([special["eoa"]])])
        marked = torch.zeros(len(body), dtype=torch.bool)
        marked[1:-1] = True
        drop = (0, 0)
    else:
        rows, cols = 3, int(torch.randint(2, 5, (), generator=generator))
        codes = torch.randint(0, special["codebook_size"], (rows, cols), generator=generator) + special["image_offset"]
        grid = torch.cat([codes, torch.full((rows, 1), special["newline"])], dim=1).reshape(-1)
        body = torch.cat(
            [torch.tensor([special["boa"], special["boi"]]), grid, torch.tensor([special["eoi"], special["eoa"]])]
        )
        marked = torch.zeros(len(body), dtype=torch.bool)
        marked[2:-2] = torch.cat(
            [torch.ones(rows, cols, dtype=torch.bool), torch.zeros(rows, 1, dtype=torch.bool)], dim=1
        ).reshape(-1)
        drop = (2, prompt_length - 1)
    loss_mask = torch.cat([torch.zeros(prompt_length, dtype=torch.bool), marked])
    return Sample(torch.cat([prompt, body]), loss_mask, drop, task)


def write_synthetic_shards(folder: Path, count: int = 24, per_shard: int = 10, seed: int = 0) -> Path:
    """``count`` samples of all four tasks in shards of ``per_shard``."""
    special = tiny_special_tokens()
    generator = torch.Generator().manual_seed(seed)
    tasks = ("t2i", "edit", "inpaint", "mmu")
    samples = [synthetic_sample(generator, tasks[i % 4], special) for i in range(count)]
    folder.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, count, per_shard)):
        chunk = samples[start : start + per_shard]
        write_shard(
            folder / f"shard-{index:06d}.safetensors",
            chunk,
            [f"s{start + i}" for i in range(len(chunk))],
            digest="synthetic",
        )
    return folder


def tiny_run_config(tmp: Path, *overrides: str, shards: Path | None = None) -> TrainConfig:
    """The tiny CPU config with its output under ``tmp``; shards from ``shards`` or written once to tmp/shards."""
    if shards is None:
        shards = tmp / "shards"
        if not shards.is_dir():
            write_synthetic_shards(shards)
    base = [f"data.shards={shards}", f"output_dir={tmp / 'run'}", "peak_tflops=1.0"]
    return load_config(TINY_CONFIG, [*base, *overrides])


def full_and_resumed_losses(out: Path, common: list[str], steps: int) -> dict[str, list[float]]:
    """A distributed worker's result: the losses of an uninterrupted tiny run (checkpoint at step 2) and of the same
    run stopped after step 2 and resumed, each under ``out/<name>/run``."""
    from dimoo_npu.train.trainer import Trainer

    def run(folder: str, *extra: str) -> list[float]:
        return Trainer(load_config(TINY_CONFIG, [*common, f"output_dir={out / folder / 'run'}", *extra])).train()

    return {
        "full": run("full", f"train_iters={steps}", "save_interval=2"),
        "resumed": run("resumed", "train_iters=2") + run("resumed", f"train_iters={steps}"),
    }


# A run (tiny config under argv[1], overrides argv[2:], saving every 2 steps) SIGKILLed while saving step 4: DCP has
# written every file, the rename into place is next.
KILL_AT_STEP_4 = """
import os, signal, sys
from pathlib import Path
from dimoo_npu.train import checkpoint
from dimoo_npu.train.trainer import run_training
from tests.unit.train_support import tiny_run_config

commit = checkpoint.Checkpointer._commit
def killed_before_rename(self, tmp, final):
    if final.name == checkpoint.step_name(4):  # DCP has written every file of step 4; the rename is next
        os.kill(os.getpid(), signal.SIGKILL)
    commit(self, tmp, final)
checkpoint.Checkpointer._commit = killed_before_rename
run_training(tiny_run_config(Path(sys.argv[1]), "save_interval=2", *sys.argv[2:]))
"""
