"""Parallel degrees (pp, dp, tp) and the DeviceMesh they name.

The degrees arrive checked: `dimoo_npu.train.layout.plan_layout` owns every layout rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIM_NAMES = ("pp", "dp", "tp")


@dataclass
class ParallelDims:
    """Pipeline, data and tensor parallel degrees; their product is the world size.

    The mesh is laid out (pp, dp, tp) with tp innermost, so tensor-parallel peers are neighbouring ranks
    (the same node, the fastest links), as Megatron and MindSpeed order them.
    """

    pp: int = 1
    dp: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh | None:
    """The (pp, dp, tp) DeviceMesh over the initialised default process group; None for a single process."""
    if dims.world_size == 1:
        return None
    return init_device_mesh(device_type, (dims.pp, dims.dp, dims.tp), mesh_dim_names=MESH_DIM_NAMES)


def pipeline_stage(dims: ParallelDims, mesh: DeviceMesh | None) -> int:
    """This rank's pipeline stage (0 without pipeline parallelism)."""
    return mesh.get_local_rank("pp") if dims.pp > 1 else 0
