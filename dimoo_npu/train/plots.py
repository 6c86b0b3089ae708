"""Loss and throughput curves of a run as one PNG (matplotlib is imported only when a plot is asked for)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dimoo_npu.files.atomic import write_atomically
from dimoo_npu.utils.errors import InputError


def plot_curves(metrics: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Read ``metrics.jsonl`` and write (reward,) loss, lr and tokens/s against step into ``output`` (PNG)."""
    metrics, output = Path(metrics), Path(output)
    records = (
        [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    )
    if not records:
        raise InputError(f"no metrics in {metrics}: train for at least one step first")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install -e '.[plot]' (matplotlib)") from None
    steps = [r["step"] for r in records]
    panels = (("loss", "loss"), ("tokens_per_s", "tokens / s"), ("lr", "learning rate"))
    if "reward_mean" in records[0]:  # a Self-GRPO run (dimoo_npu.rl)
        panels = (("reward_mean", "reward (mean)"), *panels)
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), constrained_layout=True)
    for axis, (key, label) in zip(axes, panels, strict=True):
        axis.plot(steps, [r[key] for r in records], linewidth=1.2)
        axis.set_xlabel("step")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{metrics.parent.name}: {len(records)} steps")
    try:
        return write_atomically(output, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(figure)
