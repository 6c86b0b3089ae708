"""Shared fixtures: the copied tiny-dimoo goldens and small random models."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "tiny-dimoo"
SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tiny-dimoo"
CHECKPOINT = FIXTURES / "checkpoint"
FAKES = Path(__file__).parent / "fakes"
# Tests that compare runs exactly (tokens, or values computed two ways) where the SIMD width (ATEN_CPU_CAPABILITY)
# or the thread count could change a result: .ci/run runs them again under a second capability at 1 thread.
BITWISE_SENSITIVE = (
    "golden/",
    "unit/test_fused_layout.py",
    "unit/test_sampling_batch.py",
    "unit/test_step_groups.py",
    "unit/test_cached_steps.py",
    "unit/test_sampling_steps.py",
    "unit/test_load_options.py",
    "unit/test_graph_mode.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = Path(__file__).parent
    for item in items:
        where = Path(item.path).relative_to(tests).as_posix() if Path(item.path).is_relative_to(tests) else ""
        if where.startswith(BITWISE_SENSITIVE):
            item.add_marker(pytest.mark.bitwise)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def checkpoint_dir() -> Path:
    return CHECKPOINT


@pytest.fixture(scope="session")
def golden() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / "golden.safetensors"))


@pytest.fixture(scope="session")
def cases() -> dict:
    return json.loads((FIXTURES / "cases.json").read_text())


@pytest.fixture(scope="session")
def tiny_model():
    """The fixture checkpoint in fp32 on CPU (read-only: tests must not modify it)."""
    import dimoo_npu

    return dimoo_npu.load_model(CHECKPOINT)


@pytest.fixture(scope="session")
def tok(tiny_model) -> dict[str, int]:
    """The fixture checkpoint's special-token ids."""
    return tiny_model.config.special_tokens


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors (``pytestmark = pytest.mark.usefixtures("one_thread")``): a second thread gains
    nothing there, and on a shared machine its barriers stall every op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _forget_fake_torch_npu() -> None:
    """Drop the fake torch_npu and torchair from sys.modules and ``torch.npu`` (real ones are left alone)."""

    def is_fake(module) -> bool:
        return str(getattr(module, "__file__", "") or "").startswith(str(FAKES))

    for name in [n for n in sys.modules if n.split(".")[0] in ("torch_npu", "torchair")]:
        if is_fake(sys.modules[name]):
            del sys.modules[name]
    if is_fake(sys.modules.get("torch.npu")):
        del sys.modules["torch.npu"]
    if is_fake(getattr(torch, "npu", None)):
        del torch.npu


@pytest.fixture
def fake_torch_npu_path(monkeypatch):
    """tests/fakes first on sys.path (nothing imported yet); set FAKE_TORCH_NPU_MODE before importing torch_npu."""
    monkeypatch.syspath_prepend(str(FAKES))
    monkeypatch.delenv("FAKE_TORCH_NPU_MODE", raising=False)
    _forget_fake_torch_npu()
    yield FAKES
    _forget_fake_torch_npu()


@pytest.fixture
def fake_torch_npu(fake_torch_npu_path):
    """The documented fake torch_npu (tests/fakes/torch_npu), imported; ``torch.npu`` is its device module."""
    return importlib.import_module("torch_npu")
