"""The CUDA backend (NCCL collectives, bf16 by default)."""

from __future__ import annotations

import torch

from dimoo_npu.adapters.base import Availability, Backend


class CudaBackend(Backend):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    default_dtype = torch.bfloat16

    def availability(self) -> Availability:
        if torch.version.cuda is None:
            return Availability(
                False,
                "this torch build has no CUDA support",
                "install a CUDA build of torch==2.13.0 (pip install torch==2.13.0 on Linux x86_64)",
            )
        if not self.runtime().is_available() or self.device_count() == 0:
            return Availability(
                False,
                "no CUDA device is visible",
                "check nvidia-smi, the driver, and CUDA_VISIBLE_DEVICES",
            )
        return Availability(True)

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__, "cuda": str(torch.version.cuda)}
