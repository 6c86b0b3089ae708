"""LoRA fine-tuning with peft: adapters injected into the blocks' projections of a `DiMOOModel`, base frozen.

peft's ``inject_adapter_in_model`` keeps the model a `DiMOOModel` (``dimoo_npu.parallel`` and the training step
see the module tree they know); each targeted ``nn.Linear`` becomes a peft layer whose weight is renamed
``<module>.base_layer.weight`` with ``<module>.lora_A.default.weight`` and ``lora_B`` beside it. `saved_name`
maps those names back, so DCP checkpoints keep the base weights under their plain names and the adapters under
peft's saved names; the adapter folder (`save_adapter`) is peft's own format, loadable with ``PeftModel`` or
merged at load by `dimoo_npu.files.lora`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dimoo_npu.files.lora import ADAPTER_WEIGHTS, PEFT_PREFIX
from dimoo_npu.files.safetensors_io import atomic_save_file
from dimoo_npu.train.config import LoraArgs
from dimoo_npu.utils.errors import CheckpointError, ConfigError

ADAPTER_NAME = "default"  # peft's name of the one adapter
LORA_DIR = "lora"  # the adapter folder in output_dir and beside each checkpoint
_ADAPTER_KEY = re.compile(rf"\.(lora_[AB])\.{ADAPTER_NAME}\.")


def saved_name(name: str) -> str:
    """peft's parameter (or optimizer-state) name -> the checkpoint's: base weights keep their plain names."""
    return _ADAPTER_KEY.sub(r".\1.", name.replace(".base_layer.", "."))


def is_adapter(name: str) -> bool:
    """A LoRA weight (peft's or saved name), which a base checkpoint does not hold."""
    return ".lora_A." in name or ".lora_B." in name


def target_pattern(targets: list[str]) -> str:
    """The regex peft full-matches module names against: the blocks' projections only, never the head."""
    return rf"model\.transformer\.blocks\.\d+\.({'|'.join(re.escape(name) for name in targets)})"


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Every target names a linear layer of the blocks; one that matches nothing is refused with the choices."""
    block_linear = re.compile(r"model\.transformer\.blocks\.\d+\.(\w+)")
    found = {
        match.group(1)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (match := block_linear.fullmatch(name))
    }
    for name in targets:
        if name not in found:
            raise ConfigError(
                f"lora.target_modules entry {name!r} matches no projection of the blocks: choose among "
                f"{', '.join(sorted(found))}"
            )


def check_same_adapters(path: Path, saved_run_config: dict, args: LoraArgs) -> None:
    """A checkpoint resumes only with the LoRA rank and targets it was saved with (or none, if it had none)."""
    saved = saved_run_config.get("lora") or {}
    before = (saved.get("rank"), saved.get("target_modules") if saved.get("rank") is not None else None)
    now = (args.rank, list(args.target_modules) if args.enabled else None)
    if before != now:
        said = lambda rank, targets: f"lora rank {rank} on {targets}" if rank is not None else "no lora"  # noqa: E731
        raise CheckpointError(
            f"{path} was trained with {said(*before)}, this run has {said(*now)}: choose a new output_dir, or "
            "restore the lora section it was trained with"
        )


def lora_config(args: LoraArgs, base: str | None = None):
    """peft's LoraConfig of this run (``base``: the folder the run starts from, recorded in the adapter)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ConfigError("LoRA training needs peft: pip install -e '.[lora]'") from None
    return LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha if args.alpha is not None else args.rank,
        lora_dropout=args.dropout,
        target_modules=target_pattern(args.target_modules),
        base_model_name_or_path=base,
    )


def apply_lora(model: nn.Module, args: LoraArgs, frozen_dtype: torch.dtype | None) -> nn.Module:
    """Inject the adapters (before `parallelize`, on any device, meta included) and hold the frozen base in
    ``frozen_dtype`` (None: as built), so only the adapters carry fp32 master weights and optimizer state."""
    check_targets(model, args.target_modules)
    config = lora_config(args)
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and not param.requires_grad and frozen_dtype is not None:
                module._parameters[name] = nn.Parameter(param.detach().to(frozen_dtype), requires_grad=False)
    return model


def initial_adapters(part: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Whole initial adapter weights, equal on every rank: A uniform in +-1/sqrt(fan_in) (peft's default
    Kaiming bound), B zero, so training starts at the base model's outputs."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in sorted(part.named_parameters()):
        if not param.requires_grad:
            continue
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(param.shape[1])
            state[name] = torch.empty(param.shape).uniform_(-bound, bound, generator=generator)
        else:
            state[name] = torch.zeros(param.shape)
    return state


def init_adapters(part: nn.Module, seed: int) -> None:
    """Fill the adapters of this rank's part (plain or FSDP-sharded) with `initial_adapters`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = initial_adapters(part, seed)
    set_model_state_dict(part, full, options=StateDictOptions(full_state_dict=True, strict=False))


def adapter_tensors(part: nn.Module) -> dict[str, torch.Tensor]:
    """The trained adapters, whole and in fp32 on the CPU, under peft's saved names (a collective under FSDP)."""
    tensors = {}
    for name, param in part.named_parameters():
        if param.requires_grad:
            value = param.full_tensor() if isinstance(param, DTensor) else param
            tensors[PEFT_PREFIX + saved_name(name)] = value.detach().float().cpu()
    return tensors


def save_adapter(folder: Path, tensors: dict[str, torch.Tensor], args: LoraArgs, base: str | None) -> None:
    """peft's adapter folder: adapter_config.json + adapter_model.safetensors (into a folder being built)."""
    folder.mkdir(parents=True, exist_ok=True)
    lora_config(args, base).save_pretrained(str(folder))
    atomic_save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
