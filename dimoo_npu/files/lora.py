"""LoRA adapters in peft's folder format, merged into a DiMOO state dict; no peft needed to read them.

A folder holds ``adapter_config.json`` (peft's LoraConfig) and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module>.lora_A.weight`` (rank x in) and ``...lora_B.weight`` (out x rank). Merging adds
``scale * B @ A`` to ``<module>.weight``, computed in fp32 and cast to the weight's dtype, so sampling with an
adapter and sampling its merged export run the same weights. The sampling layout fuses projections, which a
peft-wrapped model cannot run: adapters are merged at load, never kept as separate modules.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dimoo_npu.utils.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# peft options whose adapters are not a plain scale * B @ A on each target's weight
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "lora_bias": False}


@dataclass
class Adapter:
    """The update of each targeted module: module name -> (A, B), and their common scale."""

    folder: Path
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scales: dict[str, float]


def read_adapter(folder: str | os.PathLike) -> Adapter:
    """An adapter folder's LoRA pairs, refusing a missing config or options a plain merge cannot honour."""
    from dimoo_npu.files.safetensors_io import iter_tensors

    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise CheckpointError(
            f"LoRA adapter folder {folder} has no {ADAPTER_CONFIG}: pass the folder `dimoo train` wrote "
            f"(output_dir/lora, or lora/ beside a checkpoint) or one saved by peft's save_pretrained"
        )
    if not weights_path.is_file():
        raise CheckpointError(f"LoRA adapter folder {folder} has no {ADAPTER_WEIGHTS}: copy the whole adapter folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err}): copy the adapter folder again") from None
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_path} is a {config.get('peft_type')!r} adapter; only LORA adapters merge")
    for key, plain in _UNSUPPORTED.items():
        if config.get(key, plain) not in (plain, False, None, {}, []):
            raise CheckpointError(
                f"{config_path} sets {key}={config[key]!r}, which DiMOO cannot merge: retrain without"
            )
    tensors = dict(iter_tensors(weights_path, lambda e: torch.empty(e.shape, dtype=torch.float32)))
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        b = tensors.get(name.replace(".lora_A.", ".lora_B."))
        if b is None or a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise CheckpointError(f"{weights_path}: {module} has no matching lora_B of rank {a.shape[0]}: re-save it")
        pairs[module] = (a, b)
    if not pairs:
        raise CheckpointError(f"{weights_path} holds no lora_A/lora_B weights: it is not a LoRA adapter")
    return Adapter(folder, pairs, {module: _scale(config, module, a.shape[0]) for module, (a, _) in pairs.items()})


def _scale(config: dict, module: str, rank: int) -> float:
    """peft's scaling: alpha / rank (alpha / sqrt(rank) with rsLoRA); per-module alpha/rank patterns win."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith(f".{pattern}"):
            alpha = value
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def check_adapter(adapter: Adapter, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse, before any weight is touched, an adapter whose targets or shapes this model does not have."""
    for module, (a, b) in adapter.pairs.items():
        shape = shapes.get(f"{module}.weight")
        if shape is None:
            raise CheckpointError(
                f"LoRA adapter {adapter.folder} targets {module}, which this checkpoint does not have: the adapter "
                "was trained on another model; pass the checkpoint it was trained from"
            )
        if tuple(shape) != (b.shape[0], a.shape[1]):
            raise CheckpointError(
                f"LoRA adapter {adapter.folder} updates {module} as {b.shape[0]}x{a.shape[1]}, but this checkpoint's "
                f"weight is {tuple(shape)}: the adapter was trained on another model size"
            )


def merge_adapter(state: dict[str, torch.Tensor], adapter: Adapter) -> None:
    """Add the adapter into ``state`` (module weights by name) in place, after checking every target fits."""
    check_adapter(adapter, {name: tuple(t.shape) for name, t in state.items()})
    for module, (a, b) in adapter.pairs.items():
        weight = state[f"{module}.weight"]
        merged = weight.float() + adapter.scales[module] * (b.to(weight.device) @ a.to(weight.device))
        state[f"{module}.weight"] = merged.to(weight.dtype)
