"""Checkpoint folders (Hugging Face layout) <-> `DiMOOModel`.

Loading builds the model on the meta device, then materialises each weight straight into the target
device and dtype from a memory-mapped shard (`dimoo_npu.files.safetensors_io`), so an 8B model never sits
in host memory twice. Saving writes shards and the index atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dimoo_npu.files.atomic import write_text_atomically
from dimoo_npu.files.hub_cache import resolve_checkpoint
from dimoo_npu.files.lora import Adapter, check_adapter, merge_adapter, read_adapter
from dimoo_npu.files.msmodelslim import SlimExport, find_description, load_export_state, read_export
from dimoo_npu.files.safetensors_io import TensorEntry, atomic_save_file, iter_tensors, read_header
from dimoo_npu.model import DiMOOModel
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.ops import OpSet, require_quantized_matmul, resolve_ops
from dimoo_npu.quantization import (
    DEFAULT_KEEP,
    SCALE_SUFFIX,
    QuantizationSpec,
    quantize_model,
    quantize_weight,
    refuse_quantized,
    spec_of,
)
from dimoo_npu.utils.errors import CheckpointError, InputError

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_BLOCK_KEY = re.compile(r"model\.transformer\.blocks\.(\d+)\.")


def find_shards(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: from the index when there is one, checked to exist."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map)") from None
        shards = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise CheckpointError(
                f"checkpoint {folder} is missing shard(s) {', '.join(missing)} named in {INDEX_NAME}: "
                "download the complete checkpoint again"
            )
        return shards
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        hint = " (.bin/.pt pickles are not loaded: convert them to safetensors)" if any(folder.glob("*.bin")) else ""
        raise CheckpointError(f"no safetensors weights in {folder}{hint}")
    return found


def default_dtype_for(device: torch.device) -> torch.dtype:
    """fp32 on CPU (and on meta, which plans a CPU load), the backend's default elsewhere; never the config's
    ``torch_dtype``."""
    if device.type in ("cpu", "meta"):
        return torch.float32
    from dimoo_npu.adapters import BACKENDS

    return BACKENDS[device.type]().default_dtype


def resolve_target(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device) or str(device) in {"cpu", "meta"}:
        return torch.device(device)
    from dimoo_npu.adapters import resolve_device

    return resolve_device(device)[1]


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    ops: OpSet | None = None,
    max_layers: int | None = None,
    quantize: str | QuantizationSpec | None = None,
    lora: str | os.PathLike | None = None,
) -> DiMOOModel:
    """Load a DiMOO checkpoint folder onto ``device`` in ``dtype`` (None: fp32 on CPU, else the backend's).

    An int8 folder (``quantization_config`` in config.json) loads as one; ``quantize="w8a8"|"w8a16"`` quantizes a
    float folder while it loads, one weight at a time (`dimoo_npu.quantization`): the float model never exists.
    ``dtype`` then applies to what stays unquantized (embedding, norms, head).
    ``lora``: a LoRA adapter folder (peft's format) merged into the float weights as they load (`dimoo_npu.files.lora`).

    ``device="meta"`` checks every weight's name and shape against the headers and reads no data: a model
    to plan memory or sharding with. ``max_layers=N`` builds the embedding, the first N blocks, the final
    norm and the head and reads only their weights (a shard holding only later blocks is never opened):
    a large checkpoint checked or timed part by part, on hardware that cannot hold all of it.
    """
    folder = resolve_checkpoint(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist: pass the folder that holds config.json")
    config = with_max_layers(DiMOOConfig.from_json(folder), max_layers)
    target = resolve_target(device)
    dtype = dtype or default_dtype_for(target)
    slim = read_slim_export(folder, quantize, max_layers) if find_description(folder) else None
    spec = None if slim else quantization_of(folder, config, quantize)
    adapter = None if lora is None else read_lora(folder, config, lora, quantize)
    with torch.device("meta"):
        model = DiMOOModel(config, ops or resolve_ops(target.type))
    if adapter is not None:
        check_adapter(adapter, {name: tuple(p.shape) for name, p in model.state_dict().items()})
    if slim is not None:
        spec = slim_spec(model, slim)
    if spec is not None:
        require_quantized_matmul(model.ops, target.type, spec.scheme)
        quantize_model(model, spec, quantize_weights=False)
    if slim is not None and target.type == "meta":
        return model.eval().requires_grad_(False)
    if slim is not None:
        state = load_export_state(slim, model.state_dict(), target, dtype)
    else:
        state = load_state(find_shards(folder), model, target, dtype, max_layers, quantize_on_load=quantize is not None)
    if adapter is not None and target.type != "meta":
        merge_adapter(state, adapter)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def read_slim_export(folder: Path, quantize: str | QuantizationSpec | None, max_layers: int | None) -> SlimExport:
    """A msModelSlim export folder (`dimoo_npu.files.msmodelslim`), checked before anything loads."""
    if quantize is not None:
        raise InputError(f"{folder} is a msModelSlim int8 export (already quantized): load it without --quantize")
    if max_layers is not None:
        raise InputError(f"{folder} is a msModelSlim export: max_layers is not supported for it; leave it unset")
    return read_export(folder)


def slim_spec(model: DiMOOModel, slim: SlimExport) -> QuantizationSpec:
    """w8a8, keeping in float every block linear the export left FLOAT (and refusing quantized ones we lack)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".blocks." in name]
    unknown = sorted(set(slim.quantized) - set(linears))
    if unknown:
        raise CheckpointError(
            f"{slim.description.name} quantizes {unknown[:3]}, which a DiMOO model of this config.json does not "
            "have as block linears: the export is of another model"
        )
    kept = tuple(name for name in linears if name not in slim.quantized)
    return QuantizationSpec("w8a8", keep=DEFAULT_KEEP + kept)


def quantization_of(
    folder: Path, config: DiMOOConfig, quantize: str | QuantizationSpec | None
) -> QuantizationSpec | None:
    """The folder's own quantization, or the one ``quantize`` asks for; a folder cannot be quantized twice."""
    spec = spec_of(config)
    if quantize is None:
        return spec
    asked = quantize if isinstance(quantize, QuantizationSpec) else QuantizationSpec(quantize, source=str(folder))
    if spec is not None:
        raise InputError(
            f"{folder} is already quantized ({spec.scheme}): load it without --quantize, or quantize its "
            f"unquantized source ({spec.source or 'the checkpoint it came from'})"
        )
    return asked


def read_lora(folder: Path, config: DiMOOConfig, adapter: str | os.PathLike, quantize: object) -> Adapter:
    """The adapter to merge into ``folder``, checked before any weight is read: LoRA merges into float weights."""
    refuse_quantized(config, folder, "merging a LoRA adapter")
    if find_description(folder):
        raise InputError(
            f"{folder} is an msModelSlim int8 export; merging a LoRA adapter needs the float checkpoint it came from"
        )
    if quantize is not None:
        raise InputError(
            f"--lora and --quantize {quantize} cannot load together (an adapter merges into float weights): export "
            "the merged weights (dimoo export-hf RUN/checkpoints OUT --merge-lora), then dimoo quantize OUT"
        )
    return read_adapter(adapter)


def with_max_layers(config: DiMOOConfig, max_layers: int | None) -> DiMOOConfig:
    """``config`` cut to its first ``max_layers`` blocks (None: unchanged), refusing a count it does not have."""
    if max_layers is None:
        return config
    if not 1 <= max_layers <= config.n_layers:
        raise InputError(
            f"max_layers {max_layers} must be between 1 and {config.n_layers} (n_layers in config.json); "
            "leave it unset for every layer"
        )
    return dataclasses.replace(config, n_layers=max_layers)


def load_state(
    shards: Iterable[Path],
    model: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    max_layers: int | None = None,
    quantize_on_load: bool = False,
) -> dict[str, torch.Tensor]:
    """Materialise every parameter of ``model`` (built on meta) from ``shards``, checking keys and shapes.

    Weights of blocks from ``max_layers`` on are left unread. On the meta device nothing is read at all.
    int8 weights load as int8 and their scales as fp32; with ``quantize_on_load`` a float weight where the model
    has an int8 one is read in its own dtype and quantized at once, and its scale is made, not read.
    """
    meta_state = model.state_dict()
    expected = {name: tuple(p.shape) for name, p in meta_state.items()}
    int8 = {name for name, p in meta_state.items() if p.dtype == torch.int8}
    made = {name.removesuffix(".weight") + SCALE_SUFFIX for name in int8} if quantize_on_load else set()
    headers = {shard: [e for e in read_header(shard) if not _is_later_block(e.name, max_layers)] for shard in shards}
    entries = {entry.name: entry for shard_entries in headers.values() for entry in shard_entries}
    _check_keys({name: shape for name, shape in expected.items() if name not in made}, entries)

    def destination(entry: TensorEntry) -> torch.Tensor | None:
        if entry.name not in entries:
            return None  # a block from max_layers on: its bytes are never touched
        if entry.shape != expected[entry.name]:
            raise CheckpointError(
                f"weight {entry.name} has shape {entry.shape} in the checkpoint but the config asks for "
                f"{expected[entry.name]}: config.json and the weights come from different models"
            )
        return torch.empty(
            entry.shape, dtype=_load_dtype(entry, entry.name in int8, quantize_on_load, dtype), device=device
        )

    if device.type == "meta":
        state = {name: destination(entry) for name, entry in entries.items()}
        state.update({name: torch.empty(expected[name], device=device) for name in made})
        return {name: t.to(torch.int8) if name in int8 else t for name, t in state.items()}
    state: dict[str, torch.Tensor] = {}
    with tqdm(total=len(entries), desc="loading weights", unit="tensor", disable=len(entries) < 64) as bar:
        for shard in (shard for shard, shard_entries in headers.items() if shard_entries):
            for name, tensor in iter_tensors(shard, destination):
                if name in int8 and tensor.is_floating_point():
                    state[name], state[name.removesuffix(".weight") + SCALE_SUFFIX] = quantize_weight(tensor)
                else:
                    state[name] = tensor
                bar.update()
    return state


def _load_dtype(entry: TensorEntry, int8: bool, quantize_on_load: bool, dtype: torch.dtype) -> torch.dtype:
    """int8 stays int8, a float weight to quantize is read as it is stored, scales in fp32, the rest in ``dtype``."""
    if int8 and entry.dtype == torch.int8:
        return torch.int8
    if int8 and not (quantize_on_load and entry.dtype.is_floating_point):
        raise CheckpointError(
            f"weight {entry.name} is stored as {entry.dtype} where config.json's quantization_config says int8: "
            "the weights and config.json come from different checkpoints"
        )
    if not entry.dtype.is_floating_point:
        raise CheckpointError(f"weight {entry.name} is stored as {entry.dtype}; a float dtype is required")
    if int8:
        return entry.dtype
    return torch.float32 if entry.name.endswith(SCALE_SUFFIX) else dtype


def _is_later_block(name: str, max_layers: int | None) -> bool:
    match = _BLOCK_KEY.match(name)
    return max_layers is not None and match is not None and int(match.group(1)) >= max_layers


def _check_keys(expected: dict[str, tuple[int, ...]], found: dict[str, TensorEntry]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(
            f"checkpoint lacks {len(missing)} weight(s), e.g. {missing[:3]}: it is incomplete or for another "
            "model size (compare n_layers/d_model in config.json)"
        )
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} weight(s) this model does not, e.g. {unexpected[:3]}: it is not a "
            "DiMOO/LLaDA checkpoint, or config.json has too few layers"
        )


def save_pretrained(
    state: dict[str, torch.Tensor], config: DiMOOConfig, folder: str | os.PathLike, max_shard_bytes: int = 4 << 30
) -> Path:
    """Write weights (sharded, with index) and config.json in the layout `load_model` reads; atomic per file.

    Shards are written first and the index last, so a folder with an index is a complete checkpoint.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else SINGLE_NAME
        atomic_save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    write_text_atomically(folder / "config.json", json.dumps(config.to_hf_dict(), indent=2))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_text_atomically(folder / INDEX_NAME, json.dumps(index, indent=2))
    return folder
