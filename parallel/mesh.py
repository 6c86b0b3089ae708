"""Parallel degrees (pp, dp, tp), their validation against a model, and the DeviceMesh they name."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dimoo_npu.config import DiMOOConfig
from dimoo_npu.errors import ConfigError

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

    def validate(self, config: DiMOOConfig, world_size: int) -> None:
        """Raise `ConfigError` naming the problem and the fix for a layout this model or world cannot take."""
        for name in MESH_DIM_NAMES:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel degree {name}={value!r} must be an integer >= 1")
        if self.world_size != world_size:
            raise ConfigError(
                f"pp*dp*tp = {self.pp}*{self.dp}*{self.tp} = {self.world_size} does not match the world size "
                f"{world_size}: launch {self.world_size} processes (torchrun --nproc-per-node ...) or change "
                "tensor_model_parallel_size / pipeline_model_parallel_size so that their product divides the world "
                "(dp = world / (tp*pp))"
            )
        self._validate_tp(config)
        if self.pp > config.n_layers:
            raise ConfigError(
                f"pipeline_model_parallel_size {self.pp} is larger than the model's {config.n_layers} layers: "
                f"every stage needs at least one layer; use at most {config.n_layers}"
            )

    def _validate_tp(self, config: DiMOOConfig) -> None:
        widths = {"n_heads": config.n_heads, "d_model": config.d_model, "mlp_hidden_size": config.mlp_hidden_size}
        for name, width in widths.items():
            if width % self.tp:
                common = math.gcd(*widths.values())
                divisors = [d for d in range(1, common + 1) if common % d == 0]
                raise ConfigError(
                    f"tensor_model_parallel_size {self.tp} does not divide the model's {name} ({width}): "
                    f"tensor parallelism splits heads and MLP columns evenly; choose tp among {divisors}"
                )


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh | None:
    """The (pp, dp, tp) DeviceMesh over the initialised default process group; None for a single process."""
    if dims.world_size == 1:
        return None
    return init_device_mesh(device_type, (dims.pp, dims.dp, dims.tp), mesh_dim_names=MESH_DIM_NAMES)
