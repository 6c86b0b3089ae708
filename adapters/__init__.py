"""Backends behind one interface. ``get_backend("auto")`` picks npu, then cuda, then cpu."""

from __future__ import annotations

import torch

from dimoo_npu.adapters.base import Availability, Backend, BackendUnavailableError
from dimoo_npu.adapters.cpu import CpuBackend
from dimoo_npu.adapters.cuda import CudaBackend
from dimoo_npu.adapters.npu import NpuBackend

BACKENDS: dict[str, type[Backend]] = {"npu": NpuBackend, "cuda": CudaBackend, "cpu": CpuBackend}
AUTO_ORDER = ("npu", "cuda", "cpu")


def get_backend(name: str = "auto") -> Backend:
    """The backend called ``name`` (checked to be available here), or the first available for ``auto``."""
    from dimoo_npu.utils import envs

    key = (name or "auto").split(":")[0].lower()
    if key == "auto" and envs.device_override():
        key = envs.device_override().split(":")[0].lower()
    if key == "auto":
        for candidate in AUTO_ORDER:
            backend = BACKENDS[candidate]()
            if backend.availability():
                return backend
    if key not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    return BACKENDS[key]().require()


def resolve_device(device: str | torch.device = "auto") -> tuple[Backend, torch.device]:
    """Map a user's device string (``auto``, ``cpu``, ``cuda:1``, ``npu``) to its backend and torch.device."""
    text = str(device)
    backend = get_backend(text)
    index = int(text.split(":")[1]) if ":" in text else 0
    return backend, backend.device(index)


__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "Availability",
    "Backend",
    "BackendUnavailableError",
    "CpuBackend",
    "CudaBackend",
    "NpuBackend",
    "get_backend",
    "resolve_device",
]
