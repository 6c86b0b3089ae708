"""Print the op-parity table: implementation x dtype x max abs error against the reference, per op.

    python scripts/op_parity_table.py [--device cpu|cuda|npu] [--seed 0]

Inputs and tolerances are `dimoo_npu.numerics.op_parity`'s and `dimoo_npu.numerics.tolerances`' ``op`` row, the ones
tests/unit/test_ops_parity.py checks. Each cell is the largest |implementation - reference| over that op's cases
(odd lengths, B > 1, several heads, key padding of different lengths per row, a row with no real key), both run on
the same inputs in that dtype. The row
"reference, rounding alone" is the reference in that dtype against the fp32 reference on the same rounded inputs:
the error the dtype itself costs, for scale. Without a real torch_npu, the npu rows run the fake torch_npu of
tests/fakes on CPU tensors and are labelled so: they check the calling convention, not Ascend numerics.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

FAKES = Path(__file__).resolve().parents[1] / "tests" / "fakes"


def _npu_label(device: str) -> str:
    if importlib.util.find_spec("torch_npu") is not None and device == "npu":
        return "npu (torch_npu)"
    sys.path.insert(0, str(FAKES))
    return "npu (fake torch_npu, CPU)"


def _rounding_alone(case, dtype, device) -> float:
    from dimoo_npu.numerics.op_parity import cast, outputs
    from dimoo_npu.ops import reference

    rounded = cast(case, dtype, device)
    widened = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in rounded)
    fn = getattr(reference, case.op)
    pairs = zip(outputs(fn(*rounded)), outputs(fn(*widened)), strict=True)
    return max(float((got.float() - expected).abs().max()) for got, expected in pairs)


def _cell(errors: list[float], failures: list[str]) -> str:
    text = f"{max(errors):.2e}"
    return text if not failures else f"**{text} FAIL**"


def parity_rows(device: str, seed: int) -> list[str]:
    from dimoo_npu.numerics.op_parity import DTYPES, max_abs_error, op_cases, parity_failure
    from dimoo_npu.numerics.tolerances import TOLERANCES
    from dimoo_npu.ops import OP_NAMES, resolve_ops

    npu_label = _npu_label(device)
    cases = op_cases(seed)
    impls = {"torch": ("torch", device), npu_label: ("npu", "cpu" if "fake" in npu_label else device)}
    header = "| op | implementation | " + " | ".join(str(d).removeprefix("torch.") for d in DTYPES) + " |"
    rows = [header, "|" + "---|" * (2 + len(DTYPES))]
    for op in OP_NAMES:
        op_cases_ = [c for c in cases if c.op == op]
        cells = [_cell([_rounding_alone(c, d, device) for c in op_cases_], []) for d in DTYPES]
        rows.append(f"| {op} | reference, rounding alone | " + " | ".join(cells) + " |")
        for label, (impl, where) in impls.items():
            fn = getattr(resolve_ops(where, impl), op)
            cells = []
            for dtype in DTYPES:
                errors = [max_abs_error(fn, c, dtype, where) for c in op_cases_]
                cells.append(_cell(errors, [f for c in op_cases_ if (f := parity_failure(fn, c, dtype, where))]))
            rows.append(f"| {op} | {label} | " + " | ".join(cells) + " |")
    tolerances = ", ".join(f"{d} {t.atol:g} + {t.rtol:.2g}*|ref|" for d, t in TOLERANCES["op"].items())
    rows.append("")
    rows.append(f"Max abs error vs the reference on {device} (seed {seed}); tested bound per element: {tolerances}.")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "npu"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print("\n".join(parity_rows(args.device, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
