"""A `CheckReport` as a text table, a JSON file and a PNG plot of error by layer (files written atomically)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dimoo_npu.files.atomic import write_atomically
from dimoo_npu.numerics.check import CheckReport


def format_table(report: CheckReport) -> str:
    """One table per compared backend: layer, max abs, max rel, cosine, pass; then its first failing layer."""
    tol = report.tolerance
    lines = [
        f"checkpoint {report.checkpoint}  dtype {report.dtype}  inputs {report.inputs}",
        f"tolerance: max_abs <= {tol.atol:g} + {tol.rtol:g} * max|ref|, cosine >= {tol.min_cosine}",
        f"reference: {report.reference} ({report.reference_note})",
    ]
    for comparison in report.comparisons:
        lines += ["", f"{comparison.target} vs {report.reference} ({comparison.note})"]
        lines.append(f"{'layer':<12} {'max abs':>11} {'max rel':>11} {'cosine':>12}  pass")
        for diff in comparison.diffs:
            mark = "ok" if diff.passed else "FAIL"
            note = f"  {diff.note}" if diff.note else ""
            lines.append(
                f"{diff.layer:<12} {diff.max_abs:>11.3e} {diff.max_rel:>11.3e} {diff.cosine:>12.9f}  {mark}{note}"
            )
        lines.append(f"first failing layer: {comparison.first_failure or 'none'}")
    lines += ["", "PASS" if report.passed else "FAIL: " + ", ".join(_failures(report))]
    return "\n".join(lines)


def _failures(report: CheckReport) -> list[str]:
    return [f"{c.target} from {c.first_failure}" for c in report.comparisons if not c.passed]


def write_json(report: CheckReport, path: str | os.PathLike) -> Path:
    return write_atomically(Path(path), lambda tmp: tmp.write_text(json.dumps(report.as_dict(), indent=2)))


def write_plot(report: CheckReport, path: str | os.PathLike) -> Path:
    """Max abs error (log scale) by layer, one line per backend, failing layers marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = max(([d.layer for d in c.diffs] for c in report.comparisons), key=len, default=[])
    figure, axes = plt.subplots(figsize=(max(6.0, 0.35 * len(names)), 4.0))
    try:
        for comparison in report.comparisons:
            x = [names.index(diff.layer) for diff in comparison.diffs]  # a backend may lack per-layer outputs
            errors = [max(diff.max_abs, 1e-12) for diff in comparison.diffs]  # log scale: no zeros
            (line,) = axes.plot(x, errors, marker="o", label=comparison.target)
            failed = [(xi, err) for xi, err, d in zip(x, errors, comparison.diffs, strict=True) if not d.passed]
            if failed:
                axes.scatter(*zip(*failed, strict=True), marker="x", s=80, color=line.get_color())
        axes.set_xticks(range(len(names)), names)
        axes.set_yscale("log")
        axes.set_xlabel("layer")
        axes.set_ylabel(f"max abs error vs {report.reference}")
        axes.set_title(f"{Path(report.checkpoint).name} ({report.dtype}); x = beyond tolerance")
        axes.tick_params(axis="x", labelrotation=90)
        axes.legend()
        figure.tight_layout()
        return write_atomically(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(figure)
