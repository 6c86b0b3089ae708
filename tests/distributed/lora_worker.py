"""One rank of the LoRA test: FSDP2 data parallel over the gloo ranks, from a Hugging Face base folder.

Launched by ``conftest.run_distributed`` with ``--out`` and the base folder as ``--base``; writes rank{R}.json:
{"full": losses of an uninterrupted run (checkpoint at step 2), "resumed": a run stopped after step 2 and
resumed}. No adapter dropout: its masks depend on the rank, and the test compares with one process. The process
group is made once and kept across the runs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch.distributed as dist

from dimoo_npu.train.config import load_config
from dimoo_npu.train.trainer import Trainer

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "train" / "tiny_cpu.yaml"
STEPS = 4
LORA = ["lora.rank=4", "lora.alpha=8", "lora.dropout=0", f"lr_decay_iters={STEPS}", "keep_checkpoints=0"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--base", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    dist.init_process_group("gloo")
    common = [f"data.shards={out / 'shards'}", "peak_tflops=1", f"model.init_from={args.base}", *LORA]

    def run(folder: str, *extra: str) -> list[float]:
        return Trainer(load_config(TINY_CONFIG, [*common, f"output_dir={out / folder / 'run'}", *extra])).train()

    result = {
        "full": run("full", f"train_iters={STEPS}", "save_interval=2"),
        "resumed": run("resumed", "train_iters=2") + run("resumed", f"train_iters={STEPS}"),
    }
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
