"""The layering contract (pyproject.toml [tool.importlinter]) holds, and breaking it fails the suite.

import-linter walks the package folder, so it would miss adapters/, ops/ and parallel/ (installed as dimoo_npu.*
through package-dir). The check runs on a copy of the sources in the installed layout, in a subprocess so the
copy, not this checkout's editable install, is the ``dimoo_npu`` it imports.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="needs import-linter: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[2]
MAPPED = ("adapters", "ops", "parallel")  # pyproject's [tool.setuptools.package-dir]


def _installed_layout(target: Path) -> Path:
    skip = shutil.ignore_patterns("__pycache__", "assets", "*.pyc")
    shutil.copytree(ROOT / "dimoo_npu", target / "dimoo_npu", ignore=skip)
    for name in MAPPED:
        shutil.copytree(ROOT / name, target / "dimoo_npu" / name, ignore=skip)
    return target


def _lint(stage: Path) -> subprocess.CompletedProcess:
    command = "from importlinter.cli import lint_imports_command as run; run()"
    return subprocess.run(
        [sys.executable, "-c", command, str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=stage,
        env={"PYTHONPATH": str(stage), "PATH": "/usr/bin:/bin", "NO_COLOR": "1", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_layer_contract_is_kept(tmp_path):
    result = _lint(_installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    stage = _installed_layout(tmp_path)
    with (stage / "dimoo_npu" / "ops" / "registry.py").open("a") as module:
        module.write("\nimport dimoo_npu.pipeline  # an op depending on the generation front-end\n")
    result = _lint(stage)
    assert result.returncode == 1, result.stdout
    assert "Layers: data flows downward BROKEN" in result.stdout
    assert "dimoo_npu.ops.registry -> dimoo_npu.pipeline" in result.stdout


def test_the_readme_states_the_contracts_layers():
    """The README's one-line summary of the layers is the contract's list, in order."""
    import re

    import tomllib

    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    readme = " ".join((ROOT / "README.md").read_text().split())
    stated = re.search(r"Layers, top to bottom: (.*?)\. A module", readme).group(1)
    assert re.findall(r"`([^`]+)`", stated) == contract["layers"]
