"""One rank of the checkpoint tests: the tiny run at tp=2 (saving every 2 steps), and the same run resumed.

Launched by ``conftest.run_distributed`` with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; writes
rank{R}.json: {"full": losses of the uninterrupted run, "resumed": losses of a run stopped after step 2
and resumed}. The process group is made once and kept across the runs.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    dist.init_process_group("gloo")
    common = [f"data.shards={out / 'shards'}", "peak_tflops=1", "tensor_model_parallel_size=2", "keep_checkpoints=0",
              f"lr_decay_iters={STEPS}"]  # fmt: skip

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
