"""Backends: availability with reason and fix, auto order, collectives, generators; npu through the fake torch_npu."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dimoo_npu.adapters import (
    AUTO_ORDER,
    BACKENDS,
    Availability,
    BackendUnavailableError,
    CpuBackend,
    CudaBackend,
    NpuBackend,
    get_backend,
    resolve_device,
)

REAL_TORCH_NPU = importlib.util.find_spec("torch_npu") is not None


@pytest.fixture
def no_device_override(monkeypatch):
    monkeypatch.delenv("DIMOO_DEVICE", raising=False)


def test_cpu_is_always_available():
    backend = get_backend("cpu")
    assert backend.availability() == Availability(True)
    assert backend.device(3) == torch.device("cpu")
    assert (backend.dist_backend, backend.default_dtype) == ("gloo", torch.float32)
    assert backend.memory_stats()["peak_rss"] > 0
    backend.set_device(0)
    backend.synchronize()


def test_cpu_and_cuda_runtime_calls_go_through_their_torch_device_module(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cpu, "synchronize", lambda *a: calls.append("synchronize"))
    monkeypatch.setattr(torch.cpu, "set_device", lambda index: calls.append(("set_device", index)))
    backend = CpuBackend()
    backend.synchronize()
    backend.set_device(0)
    assert calls == ["synchronize", ("set_device", 0)]
    assert backend.device_count() == torch.cpu.device_count()
    assert CudaBackend().runtime() is torch.get_device_module("cuda")


def test_collective_backend_names_and_default_dtypes():
    assert {name: cls.dist_backend for name, cls in BACKENDS.items()} == {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
    assert {name: cls.default_dtype for name, cls in BACKENDS.items()} == {
        "npu": torch.bfloat16,
        "cuda": torch.bfloat16,
        "cpu": torch.float32,
    }


def test_generators_are_seeded_and_independent_of_the_global_rng():
    backend = CpuBackend()
    first = torch.randn(4, generator=backend.generator(1234))
    torch.manual_seed(0)
    torch.randn(100)  # moving the global RNG changes nothing
    assert torch.equal(torch.randn(4, generator=backend.generator(1234)), first)
    assert not torch.equal(torch.randn(4, generator=backend.generator(1235)), first)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here; this checks the reason given without it")
def test_cuda_unavailable_says_why_and_how_to_fix():
    status = CudaBackend().availability()
    assert not status.ok
    expected = "no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
    assert expected in status.reason
    assert status.fix
    with pytest.raises(BackendUnavailableError, match=f"backend 'cuda' is not available: .*{expected}.*Fix: "):
        get_backend("cuda")


@pytest.mark.skipif(REAL_TORCH_NPU, reason="a real torch_npu is installed here")
def test_npu_without_torch_npu():
    status = NpuBackend().availability()
    assert (status.ok, status.reason) == (False, "torch_npu is not installed")
    assert "pip install" in status.fix and "torch-npu" in status.fix


def test_npu_without_cann(fake_torch_npu_path, monkeypatch):
    monkeypatch.setenv("FAKE_TORCH_NPU_MODE", "no_cann")
    status = NpuBackend().availability()
    assert not status.ok
    assert "libhccl.so: cannot open shared object file: No such file or directory" in status.reason
    assert "set_env.sh" in status.fix and "CANN" in status.fix


def test_npu_beside_a_cuda_build_of_torch(fake_torch_npu_path, monkeypatch):
    monkeypatch.setenv("FAKE_TORCH_NPU_MODE", "accelerator_conflict")
    status = NpuBackend().availability()
    assert not status.ok and "Two accelerators" in status.reason
    assert "CPU build of torch" in status.fix


@pytest.mark.parametrize(("mode", "visible", "reason"), [
    ("no_device", None, "no NPU device is visible"),
    ("", "", "ASCEND_RT_VISIBLE_DEVICES is empty"),
    ("", "3,1", "no NPU device is visible"),  # not ascending: torch_npu sees none
])  # fmt: skip
def test_npu_without_a_visible_device(fake_torch_npu, monkeypatch, mode, visible, reason):
    monkeypatch.setenv("FAKE_TORCH_NPU_MODE", mode)
    if visible is not None:
        monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", visible)
    status = NpuBackend().availability()
    assert not status.ok and reason in status.reason
    assert "npu-smi" in status.fix


def test_npu_available_with_the_fake(fake_torch_npu, monkeypatch):
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "0,1")
    backend = get_backend("npu")
    assert backend.availability() == Availability(True)
    assert backend.device_count() == 2
    backend.set_device(1)
    assert torch.npu.current_device() == 1
    backend.synchronize()
    assert backend.memory_stats() == {"allocated": 0, "reserved": 0, "peak_allocated": 0}
    backend.reset_peak_memory()
    assert backend.versions()["torch_npu"] == fake_torch_npu.__version__
    with pytest.raises(RuntimeError, match="invalid NPU device id 2"):
        backend.set_device(2)


def test_auto_prefers_npu_then_cuda_then_cpu(fake_torch_npu_path, monkeypatch, no_device_override):
    assert AUTO_ORDER == ("npu", "cuda", "cpu")
    monkeypatch.setattr(CudaBackend, "availability", lambda self: Availability(False, "test", "test"))
    monkeypatch.setenv("FAKE_TORCH_NPU_MODE", "no_device")
    assert get_backend("auto").name == "cpu"
    monkeypatch.setattr(CudaBackend, "availability", lambda self: Availability(True))
    assert get_backend("auto").name == "cuda"
    monkeypatch.setenv("FAKE_TORCH_NPU_MODE", "")
    assert get_backend("auto").name == "npu"
    assert get_backend().name == "npu"


def test_auto_follows_dimoo_device(fake_torch_npu, monkeypatch):
    monkeypatch.setenv("DIMOO_DEVICE", "cpu")
    assert get_backend("auto").name == "cpu"
    assert get_backend("npu").name == "npu"  # an explicit name wins over DIMOO_DEVICE


def test_unknown_backend_names_the_choices(no_device_override):
    with pytest.raises(ValueError, match="unknown backend 'tpu'; choose one of auto, npu, cuda, cpu"):
        get_backend("tpu")


def test_resolve_device_maps_strings(no_device_override):
    backend, device = resolve_device("cpu")
    assert (backend.name, device) == ("cpu", torch.device("cpu"))
    assert resolve_device("auto")[0].name in AUTO_ORDER
