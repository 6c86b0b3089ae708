"""The CPU backend: always available, the reference for every other."""

from __future__ import annotations

import resource

import torch

from dimoo_npu.adapters.base import Availability, Backend


class CpuBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    default_dtype = torch.float32

    def availability(self) -> Availability:
        return Availability(True)

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cpu")

    def memory_stats(self) -> dict[str, int]:
        """torch.cpu keeps no memory statistics: ru_maxrss (KiB on Linux) is the process's peak resident memory."""
        return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    def reset_peak_memory(self) -> None:
        """The peak resident memory of a process cannot be reset."""
