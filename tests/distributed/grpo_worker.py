"""One rank of the Self-GRPO data-parallel test: the tiny run on 2 FSDP2 ranks, uninterrupted and resumed, and one
self-rewarded step (the sharded policy answers the questions).

Launched by ``conftest.run_distributed``; writes rank{R}.json: {"full": losses, "resumed": losses of a run stopped
after step 1 and resumed, "rewards": mean rewards of the full run, "self": the self-rewarded step's metrics line,
"lopsided": {"all" / "skip": [first, last] weight digests} of runs at beta 0 where rank 0's groups all score
alike, updated in full and with rl.skip_uniform_groups (rank 0 then has nothing to learn from, yet must run rank 1's
forwards)}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dimoo_npu.rl.trainer import GRPOTrainer  # noqa: E402
from tests.unit.rl_support import tiny_grpo_config  # noqa: E402

REWARD = "rl.reward_function=tests.unit.rl_rewards:redness"
STEPS = 2


def weights_digest(model: torch.nn.Module) -> list[float]:
    """Per parameter, the float64 sum of its whole (unsharded) value weighted by position: moves with any update."""
    digest = []
    for param in model.parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        flat = full.detach().double().flatten()
        digest.append(float((flat * torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)).sum()))
    return digest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    dist.init_process_group("gloo")

    def run(folder: str, *extra: str, digests: list | None = None) -> list[float]:
        common = ["keep_checkpoints=0", f"lr_decay_iters={STEPS}", f"train_iters={STEPS}",
                  "rl.answer_parallel_threshold=null"]  # fmt: skip
        trainer = GRPOTrainer(tiny_grpo_config(out / folder, *common, *extra))
        if digests is not None:
            digests.append(weights_digest(trainer.model))
        losses = trainer.train()
        if digests is not None:
            digests.append(weights_digest(trainer.model))
        if trainer.lock is not None:  # rank 0 holds the run folder; the process group stays for the next run
            trainer.lock.release()
        return losses

    result = {
        "full": run("full", REWARD, "save_interval=1"),
        "resumed": run("resumed", REWARD, "train_iters=1") + run("resumed", REWARD),
    }
    run("self", "train_iters=1")
    rewards = GRPOTrainer._rewards
    if os.environ["RANK"] == "0":
        GRPOTrainer._rewards = lambda self, rollout, items: rewards(self, rollout, items).fill_(0.5)
    result["lopsided"] = {}
    for mode in ("all", "skip"):
        digests = result["lopsided"][mode] = []
        run(f"lopsided-{mode}", REWARD, "rl.beta=0", f"rl.skip_uniform_groups={mode == 'skip'}", digests=digests)
    GRPOTrainer._rewards = rewards
    if os.environ["RANK"] == "0":
        lines = (out / "full" / "run" / "metrics.jsonl").read_text().splitlines()
        result["rewards"] = [json.loads(line)["reward_mean"] for line in lines]
        result["self"] = json.loads((out / "self" / "run" / "metrics.jsonl").read_text())
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
