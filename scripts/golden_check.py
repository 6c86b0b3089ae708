"""Run the tiny-dimoo golden fixtures on a device and print each check's max error.

The goldens were produced by the public Lumina-DiMOO reference code (tests/fixtures/tiny-dimoo/README.md).
Use it to prove a new machine or backend gives the reference numbers:

    python scripts/golden_check.py [--device auto|cpu|cuda|npu] [--ops reference|torch|npu] [--compile]

``--compile`` also runs every sampling golden case, greedy, on the model as the sampling commands prepare it for
graph mode (`dimoo_npu.sampling.graph.prepare_for_sampling`: fused layout, torch.compile with the device's backend),
and requires the exact golden tokens. Inductor compiles a few graphs per case: minutes on a small CPU.

Exit status 1 when a check is beyond its tolerance (fp32: cases.json; other dtypes: see tests/golden).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import dimoo_npu
from dimoo_npu.adapters import resolve_device
from dimoo_npu.numerics.golden import forward_errors
from dimoo_npu.ops import resolve_ops

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-dimoo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ops", default=None, help="force one op implementation: reference, torch or npu")
    parser.add_argument("--compile", action="store_true", help="also the sampling goldens in graph mode")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    _, device = resolve_device(args.device)
    cases = json.loads((FIXTURES / "cases.json").read_text())["cases"]
    model = dimoo_npu.load_model(
        FIXTURES / "checkpoint", device=device, dtype=torch.float32, ops=resolve_ops(device.type, args.ops)
    )
    errors = forward_errors(model, load_file(str(FIXTURES / "golden.safetensors")), device)
    tolerance = {key: cases["loss" if key == "loss" else "forward"]["atol_fp32"] for key in errors}
    sys.stdout.write(f"golden forward on {device} (fp32, ops: {model.ops.describe()})\n")
    for key, error in errors.items():
        verdict = "ok" if error <= tolerance[key] else "FAIL"
        sys.stdout.write(f"  {key:<18} max abs error {error:.3e}  (tolerance {tolerance[key]:.0e})  {verdict}\n")
    passed = all(errors[k] <= tolerance[k] for k in errors)
    if args.compile:
        passed &= _compiled_sampling(model, cases)
    return 0 if passed else 1


def _compiled_sampling(model, cases: dict) -> bool:
    """Every sampling golden case, greedy, in graph mode: True when every token equals the golden."""
    from dimoo_npu.numerics.golden import greedy_sampling_case
    from dimoo_npu.sampling.graph import prepare_for_sampling

    golden = load_file(str(FIXTURES / "golden.safetensors"))
    model = prepare_for_sampling(model, compile=True)
    device = next(model.parameters()).device
    sys.stdout.write(f"golden sampling on {device}, compiled (fullgraph, static shapes), greedy\n")
    passed = True
    for name, case in cases.items():
        ran = greedy_sampling_case(model, golden, name, case)
        if ran is None:
            continue
        out, expected = ran
        same = torch.equal(out.cpu(), expected)
        passed &= same
        sys.stdout.write(f"  {name:<18} tokens {'equal' if same else 'DIFFER'}\n")
    return passed


if __name__ == "__main__":
    sys.exit(main())
