"""Peak resident memory of `load_model` against the bytes of the weights it produced.

Writes a random DiMOO checkpoint of at least 1 GB (bf16 on disk, sharded, real vocabulary), then loads it in a fresh
process per target dtype and reports (peak RSS during loading - RSS just before loading) / (weights' bytes in the
target dtype), with every weight touched once after loading. Goal: at most 1.3.

    python benchmarks/bench_load_memory.py [--workdir /tmp/dimoo-load-bench] [--layers 18]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_checkpoint(folder: Path, layers: int) -> int:
    from dimoo_npu.checkpoint import save_pretrained
    from dimoo_npu.model import DiMOOModel
    from dimoo_npu.modeling.config import DiMOOConfig

    config = DiMOOConfig(d_model=1024, n_layers=layers, n_heads=16, mlp_hidden_size=2816, embedding_size=134548)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DiMOOModel(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for k, shape in shapes.items()}
    save_pretrained(state, config, folder, max_shard_bytes=512 << 20)
    return sum(t.numel() * t.element_size() for t in state.values())


def measure(folder: str, dtype_name: str) -> dict:
    """Runs in a fresh process: RSS before, peak (VmHWM) after loading and touching every weight."""
    import dimoo_npu

    dtype = getattr(torch, dtype_name)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    model = dimoo_npu.load_model(folder, dtype=dtype)
    # Read every weight once, in 4M-element slices so the reading itself adds no sizeable copy.
    touched = sum(float(part.float().sum()) for p in model.parameters() for part in p.detach().view(-1).split(1 << 22))
    peak = _status_kib("VmHWM")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"dtype": dtype_name, "weights_bytes": weights, "growth_bytes": (peak - before) * 1024, "checksum": touched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        sys.stdout.write(json.dumps(measure(*args.measure)) + "\n")
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp) / "random-dimoo"
        disk = write_checkpoint(folder, args.layers)
        rows = []
        for dtype in ("float32", "bfloat16"):
            out = subprocess.run(
                [sys.executable, __file__, "--measure", str(folder), dtype], check=True, capture_output=True, text=True
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    sys.stdout.write(f"checkpoint on disk: {disk / 1e9:.3f} GB (bf16, shards of 512 MiB)\n\n")
    sys.stdout.write("| target dtype | weights (GB) | peak RSS growth (GB) | ratio | goal |\n|---|---|---|---|---|\n")
    for row in rows:
        weights, growth = row["weights_bytes"], row["growth_bytes"]
        ratio = growth / weights
        sys.stdout.write(f"| {row['dtype']} | {weights / 1e9:.3f} | {growth / 1e9:.3f} | {ratio:.3f} | <= 1.3 |\n")


if __name__ == "__main__":
    main()
