"""The backend interface: the one place that knows what a device kind needs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from dimoo_npu.utils.errors import BackendUnavailableError


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here; when not, why and the one-line fix."""

    ok: bool
    reason: str = ""
    fix: str = ""

    def __bool__(self) -> bool:
        return self.ok


class Backend(ABC):
    """A device kind: availability, devices, dtype, collectives, sync, memory and random generators.

    Runtime calls go to the device's torch module (`torch.get_device_module`), whose API is CUDA's on every device.
    """

    name: str
    device_type: str
    dist_backend: str
    default_dtype: torch.dtype

    @abstractmethod
    def availability(self) -> Availability: ...

    def require(self) -> Backend:
        """Return self, or raise with the reason and the fix when this backend cannot run here."""
        status = self.availability()
        if not status.ok:
            raise BackendUnavailableError(f"backend {self.name!r} is not available: {status.reason}. Fix: {status.fix}")
        return self

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device(self.device_type, local_rank)

    def runtime(self):
        """The torch device module (``torch.cpu``, ``torch.cuda``) whose runtime calls every backend makes."""
        return torch.get_device_module(self.device_type)

    def device_count(self) -> int:
        return self.runtime().device_count()

    def set_device(self, local_rank: int = 0) -> None:
        """Bind this process to its local device (a no-op on CPU)."""
        self.runtime().set_device(local_rank)

    def synchronize(self) -> None:
        """Wait for queued device work (timings must call this)."""
        self.runtime().synchronize()

    def memory_stats(self) -> dict[str, int]:
        """Bytes allocated / reserved / peak on the device."""
        runtime = self.runtime()
        return {
            "allocated": runtime.memory_allocated(),
            "reserved": runtime.memory_reserved(),
            "peak_allocated": runtime.max_memory_allocated(),
        }

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window."""
        self.runtime().reset_peak_memory_stats()

    def generator(self, seed: int, local_rank: int = 0) -> torch.Generator:
        """A seeded generator on this backend's device, independent of the global RNG."""
        return torch.Generator(device=self.device(local_rank)).manual_seed(seed)

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    def compile_backend(self):
        """What ``torch.compile(backend=...)`` takes for graph mode on this device."""
        return "inductor"
