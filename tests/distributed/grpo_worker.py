"""One rank of the Self-GRPO data-parallel test: the tiny run on 2 FSDP2 ranks, uninterrupted and resumed, and one
self-rewarded step (the sharded policy answers the questions).

Launched by ``conftest.run_distributed``; writes rank{R}.json: {"full": losses, "resumed": losses of a run stopped
after step 1 and resumed, "rewards": mean rewards of the full run, "self": the self-rewarded step's metrics line}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dimoo_npu.rl.trainer import GRPOTrainer  # noqa: E402
from tests.unit.rl_support import tiny_grpo_config  # noqa: E402

REWARD = "rl.reward_function=tests.unit.rl_rewards:redness"
STEPS = 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    dist.init_process_group("gloo")

    def run(folder: str, *extra: str) -> list[float]:
        common = ["keep_checkpoints=0", f"lr_decay_iters={STEPS}", f"train_iters={STEPS}"]
        trainer = GRPOTrainer(tiny_grpo_config(out / folder, *common, *extra))
        losses = trainer.train()
        if trainer.lock is not None:  # rank 0 holds the run folder; the process group stays for the next run
            trainer.lock.release()
        return losses

    result = {
        "full": run("full", REWARD, "save_interval=1"),
        "resumed": run("resumed", REWARD, "train_iters=1") + run("resumed", REWARD),
    }
    run("self", "train_iters=1")
    if os.environ["RANK"] == "0":
        lines = (out / "full" / "run" / "metrics.jsonl").read_text().splitlines()
        result["rewards"] = [json.loads(line)["reward_mean"] for line in lines]
        result["self"] = json.loads((out / "self" / "run" / "metrics.jsonl").read_text())
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
