"""Op registry: device defaults, DIMOO_OPS / overrides forcing one op at a time, clear errors; import hygiene."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dimoo_npu.adapters import BackendUnavailableError
from dimoo_npu.ops import OP_NAMES, available_implementations, reference, resolve_ops, torch_impl
from dimoo_npu.ops.registry import parse_overrides
from tests.conftest import CHECKPOINT

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch):
    monkeypatch.delenv("DIMOO_OPS", raising=False)


@pytest.mark.parametrize(
    ("device", "impl"), [("cpu", "torch"), ("cuda", "torch"), ("meta", "reference"), ("xla", "reference")]
)
def test_device_defaults(device, impl):
    ops = resolve_ops(device)
    assert dict(ops.names) == dict.fromkeys(OP_NAMES, impl)


def test_npu_device_defaults_to_npu_kernels(fake_torch_npu):
    ops = resolve_ops("npu")
    assert dict(ops.names) == dict.fromkeys(OP_NAMES, "npu")
    assert ops.describe() == (
        "attention=npu, rms_norm=npu, rotary=npu, swiglu=npu, add_rms_norm=npu, swiglu_packed=npu, quantized_matmul=npu"
    )


@pytest.mark.parametrize("op", OP_NAMES)
def test_dimoo_ops_forces_one_op(monkeypatch, op):
    monkeypatch.setenv("DIMOO_OPS", f"{op}=reference")
    ops = resolve_ops("cpu")
    assert ops.names[op] == "reference" and getattr(ops, op) is getattr(reference, op)
    others = [name for name in OP_NAMES if name != op]
    assert all(ops.names[name] == "torch" and getattr(ops, name) is getattr(torch_impl, name) for name in others)


def test_dimoo_ops_forces_every_op_and_explicit_overrides_win(monkeypatch):
    monkeypatch.setenv("DIMOO_OPS", "reference")
    assert dict(resolve_ops("cpu").names) == dict.fromkeys(OP_NAMES, "reference")
    ops = resolve_ops("cpu", {"swiglu": "torch"})
    assert ops.names["swiglu"] == "torch" and ops.names["attention"] == "reference"
    assert resolve_ops("cpu", "attention=torch, rms_norm=torch").names["rms_norm"] == "torch"


def test_parse_overrides():
    assert parse_overrides("") == {}
    assert parse_overrides(" torch ") == dict.fromkeys(OP_NAMES, "torch")
    assert parse_overrides("attention=npu,swiglu=reference") == {"attention": "npu", "swiglu": "reference"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("attn=torch", r"unknown op 'attn' in op overrides; known ops: attention, rms_norm, rotary, swiglu"),
        ("attention=cuda", r"unknown implementation 'cuda' for op 'attention'; choose one of reference, torch, npu"),
        ("flash", r"unknown implementation 'flash' for op 'attention'"),
        ("attention=torch,rms_norm", r"DIMOO_OPS entry 'rms_norm' is not op=implementation"),
    ],
)
def test_bad_names_give_clear_errors(monkeypatch, spec, message):
    monkeypatch.setenv("DIMOO_OPS", spec)
    with pytest.raises(ValueError, match=message):
        resolve_ops("cpu")


def test_available_implementations():
    assert available_implementations() == ("reference", "torch", "npu")


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="a real torch_npu is installed here")
def test_forcing_npu_without_torch_npu_fails_at_build_with_the_fix(monkeypatch):
    monkeypatch.setenv("DIMOO_OPS", "attention=npu")
    with pytest.raises(
        BackendUnavailableError, match="'npu' \\(for attention\\) needs torch_npu.*not installed.*Fix: pip"
    ):
        resolve_ops("cpu")


_HYGIENE_SCRIPT = """
import json, sys
import torch
import dimoo_npu
import dimoo_npu.ops.npu  # choosing the module must not load torch_npu
model = dimoo_npu.load_model(sys.argv[1])
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]), torch.tensor([[True, True, False]]))
watched = {"ops", "adapters", "parallel", "torch_npu"}
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in watched)))
"""


def test_only_namespaced_packages_are_imported():
    """After import, loading and one forward, no bare ``ops``/``adapters``/``parallel`` (nor torch_npu) is loaded.

    A fresh interpreter started in the repository root, where the bare folders would be importable by mistake.
    """
    result = subprocess.run(
        [sys.executable, "-c", _HYGIENE_SCRIPT, str(CHECKPOINT)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("DIMOO_")}, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
