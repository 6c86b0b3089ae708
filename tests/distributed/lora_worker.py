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
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.unit.train_support import full_and_resumed_losses  # noqa: E402

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

    result = full_and_resumed_losses(out, common, STEPS)
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
