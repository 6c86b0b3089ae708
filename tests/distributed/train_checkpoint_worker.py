"""One rank of the checkpoint tests: the tiny run at tp=2 (saving every 2 steps), and the same run resumed.

Launched by ``conftest.run_distributed`` with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; writes
rank{R}.json: {"full": losses of the uninterrupted run, "resumed": losses of a run stopped after step 2
and resumed}. The process group is made once and kept across the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.unit.train_support import full_and_resumed_losses  # noqa: E402

STEPS = 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    dist.init_process_group("gloo")
    common = [f"data.shards={out / 'shards'}", "peak_tflops=1", "tensor_model_parallel_size=2", "keep_checkpoints=0",
              f"lr_decay_iters={STEPS}"]  # fmt: skip

    result = full_and_resumed_losses(out, common, STEPS)
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
