"""Accelerators the planner knows: memory, peak compute, link bandwidths, and the assumptions behind them.

Every number is an assumption the plan prints; none is measured here. Memory is the datasheet's decimal GB,
reported in GiB. Bandwidths are collective bus bandwidths (what nccl-tests/hccl_test call busbw), per device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dimoo_npu.utils.errors import ConfigError

GIB = 1024**3


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gb: float  # datasheet, decimal GB
    reserve_gib: float  # runtime, collective library buffers, workspace: never available to tensors
    peak_tflops: float  # dense bf16
    utilisation: float  # share of peak that the matmul-bound parts of a step reach (hardware FLOPs)
    hbm_tbps: float  # memory bandwidth (the optimizer step is bound by it)
    devices_per_node: int
    intra_node: str
    intra_gbps: float  # busbw inside a node, GB/s
    inter_node: str
    inter_gbps: float  # busbw across nodes, GB/s per device

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    @property
    def usable_bytes(self) -> float:
        return self.memory_bytes - self.reserve_gib * GIB

    def link_gbps(self, span: int) -> float:
        """Bus bandwidth of a group whose ranks lie within ``span`` consecutive ranks (the mesh is tp-innermost)."""
        return self.intra_gbps if span <= self.devices_per_node else self.inter_gbps

    def assumptions(self) -> list[str]:
        return [
            f"{self.name}: {self.memory_gb:g} GB = {self.memory_bytes / GIB:.1f} GiB per device, "
            f"{self.reserve_gib:g} GiB reserved for the runtime and collective buffers",
            f"compute: {self.peak_tflops:g} TFLOP/s dense bf16 peak at {self.utilisation:.0%} utilisation "
            "(hardware FLOPs, recompute included)",
            f"links: {self.intra_node} {self.intra_gbps:g} GB/s bus bandwidth inside a node of "
            f"{self.devices_per_node}, {self.inter_node} {self.inter_gbps:g} GB/s per device across nodes; "
            f"HBM {self.hbm_tbps:g} TB/s",
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ACCELERATORS: dict[str, Accelerator] = {
    # Atlas 800T A2 (910B): 8 NPUs per node on HCCS, one 200 GbE RoCE port per NPU.
    "910b": Accelerator("910b", 64, 3.0, 313, 0.40, 1.6, 8, "HCCS", 150, "RoCE", 22),
    # HGX H100 / H200 SXM: NVLink 4 via NVSwitch, one 400 Gb/s InfiniBand NIC per GPU.
    "h100": Accelerator("h100", 80, 2.5, 989, 0.45, 3.35, 8, "NVLink", 360, "InfiniBand", 45),
    "h200": Accelerator("h200", 141, 2.5, 989, 0.45, 4.8, 8, "NVLink", 360, "InfiniBand", 45),
}


def accelerator(name: str) -> Accelerator:
    """The named accelerator; `ConfigError` listing the known ones otherwise."""
    key = name.lower()
    if key not in ACCELERATORS:
        raise ConfigError(f"unknown accelerator {name!r}: choose one of {', '.join(ACCELERATORS)}")
    return ACCELERATORS[key]
