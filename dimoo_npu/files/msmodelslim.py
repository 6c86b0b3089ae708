"""msModelSlim W8A8-dynamic exports (Huawei's quantization tool for Ascend), read as this package's int8 w8a8.

The layout, as msmodelslim 26.1.0's ``Calibrator.save(..., save_type=["safe_tensor"])`` writes it (checked on its
own output, tests/fixtures/msmodelslim-w8a8): ``quant_model_description_w8a8_dynamic.json`` names the scheme
(``model_quant_type``) and the type of every tensor ("W8A8_DYNAMIC" or "FLOAT"); the safetensors file holds, per
quantized linear, ``<linear>.weight`` int8 (N, K), ``<linear>.weight_scale`` and ``<linear>.weight_offset`` float
(N, 1), and every other tensor in float. W8A8_DYNAMIC is symmetric int8 per output channel with int8 activations
per token, rounded at run time: our ``w8a8`` exactly, its offsets all zero. The folder needs the source model's
config.json beside them (msModelSlim's export steps copy it there).

Other schemes are refused by name; a description and weights that disagree are refused before anything loads.
`write_export` writes our w8a8 in the same layout (`dimoo quantize --format msmodelslim`), for the Ascend tools.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dimoo_npu.files.atomic import write_text_atomically
from dimoo_npu.files.safetensors_io import TensorEntry, atomic_save_file, iter_tensors, read_header
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.utils.errors import CheckpointError, InputError

SCHEME = "W8A8_DYNAMIC"  # the one msModelSlim scheme that is our w8a8
DESCRIPTION_GLOB = "quant_model_description*.json"
DESCRIPTION_NAME = "quant_model_description_w8a8_dynamic.json"  # the names msModelSlim's save() defaults to
WEIGHTS_NAME = "quant_model_weight_w8a8_dynamic.safetensors"
SCALE, OFFSET = ".weight_scale", ".weight_offset"
# Why each other msModelSlim scheme cannot run as our w8a8/w8a16 (names from its QuantType).
REFUSED = {
    "W8A8": "static W8A8: activations rounded with calibrated input_scale/input_offset and deq_scale per layer, "
    "which our kernels do not take",
    "W8A8S": "sparse W8A8",
    "W8A8SC": "sparse compressed W8A8",
    "W16A16S": "sparse float weights",
    "W4A8_DYNAMIC": "4-bit weights",
    "W4A16": "4-bit weights",
    "W8A16": "weight-only int8 with per-channel offsets (asymmetric)",
}


@dataclass(frozen=True)
class SlimExport:
    """A checked export: its files, and the linears it quantized (module names, without ``.weight``)."""

    description: Path
    shards: tuple[Path, ...]
    quantized: tuple[str, ...]
    entries: dict[str, TensorEntry]


def find_description(folder: Path) -> Path | None:
    found = sorted(folder.glob(DESCRIPTION_GLOB))
    if len(found) > 1:
        raise CheckpointError(f"{folder} holds several msModelSlim descriptions {[p.name for p in found]}: keep one")
    return found[0] if found else None


def read_export(folder: Path) -> SlimExport:
    """The export in ``folder``, checked: scheme, per-tensor types against the safetensors headers, zero offsets."""
    description = find_description(folder)
    if description is None:
        raise CheckpointError(f"no {DESCRIPTION_GLOB} in {folder}: not a msModelSlim export")
    try:
        types = json.loads(description.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{description} is not valid JSON ({err}): re-export it with msModelSlim") from None
    scheme = types.pop("model_quant_type", None)
    if scheme != SCHEME:
        why = REFUSED.get(str(scheme), "a scheme this package does not know")
        raise InputError(
            f"{description.name} has msModelSlim scheme {scheme!r} ({why}); this package runs {SCHEME} exports only: "
            "quantize with is_dynamic=True, w_bit=8, a_bit=8 (or use `dimoo quantize`)"
        )
    types = {name: kind for name, kind in types.items() if "." in name}  # tensor names; the rest is metadata
    odd = sorted({kind for kind in types.values()} - {SCHEME, "FLOAT"})
    if odd:
        raise InputError(f"{description.name} mixes in msModelSlim type(s) {odd}: only {SCHEME} and FLOAT load here")
    shards = tuple(sorted(folder.glob("*.safetensors")))
    entries = {entry.name: entry for shard in shards for entry in read_header(shard)}
    _agree(description.name, types, entries)
    quantized = tuple(
        sorted(
            name.removesuffix(".weight") for name, kind in types.items() if kind == SCHEME and name.endswith(".weight")
        )
    )
    export = SlimExport(description, shards, quantized, entries)
    _check_offsets_zero(export)
    return export


def _agree(description: str, types: dict[str, str], entries: dict[str, TensorEntry]) -> None:
    """Every described tensor in the weights and back; quantized ones int8 (N, K) with float (N, 1) scale/offset."""
    missing, undescribed = sorted(set(types) - set(entries)), sorted(set(entries) - set(types))
    if missing or undescribed:
        raise CheckpointError(
            f"{description} and the safetensors disagree: described but absent {missing[:3]}, present but not "
            f"described {undescribed[:3]}: the files come from different exports"
        )
    for name, kind in types.items():
        entry = entries[name]
        if kind == "FLOAT" and not entry.dtype.is_floating_point:
            raise CheckpointError(f"{name} is described FLOAT but stored as {entry.dtype}: the export is damaged")
        if kind != SCHEME or not name.endswith(".weight"):
            continue
        base = name.removesuffix(".weight")
        rows = entry.shape[0] if len(entry.shape) == 2 else None
        parts = [entries.get(base + suffix) for suffix in (SCALE, OFFSET)]
        if (
            entry.dtype != torch.int8
            or rows is None
            or any(part is None or part.shape != (rows, 1) or not part.dtype.is_floating_point for part in parts)
        ):
            raise CheckpointError(
                f"{name} is described {SCHEME} but stored as {entry.dtype} {entry.shape} with scale/offset "
                f"{[None if p is None else (p.dtype, p.shape) for p in parts]}; expected int8 (N, K) and float (N, 1)"
            )


def _check_offsets_zero(export: SlimExport) -> None:
    offsets = {base + OFFSET for base in export.quantized}
    for shard in export.shards:

        def only_offsets(entry: TensorEntry) -> torch.Tensor | None:
            return torch.empty(entry.shape, dtype=torch.float32) if entry.name in offsets else None

        for name, offset in iter_tensors(shard, only_offsets):
            if bool(offset.any()):
                raise InputError(
                    f"{name} is not zero: asymmetric int8 weights, which this package's symmetric kernels cannot "
                    "honour; export with w_sym=True"
                )


def load_export_state(
    export: SlimExport, expected: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The state dict of a model built for the export (``expected``: its meta state): int8 weights as they are,
    scales (N, 1) -> fp32 (N,), offsets dropped (checked zero), float tensors in ``dtype``."""
    wanted = {name for name in export.entries if not name.endswith(OFFSET)}
    if wanted != set(expected):
        extra, lacking = sorted(wanted - set(expected)), sorted(set(expected) - wanted)
        raise CheckpointError(
            f"{export.description.parent} does not fit config.json: extra {extra[:3]}, missing {lacking[:3]} "
            "(copy the quantized model's own config.json into the export folder)"
        )

    def destination(entry: TensorEntry) -> torch.Tensor | None:
        if entry.name not in wanted:
            return None
        target = expected[entry.name]
        shape = (target.shape[0], 1) if entry.name.endswith(SCALE) else tuple(target.shape)
        if tuple(entry.shape) != shape:
            raise CheckpointError(f"{entry.name} is {entry.shape} in the export, config.json asks for {shape}")
        kind = torch.int8 if target.dtype == torch.int8 else torch.float32 if entry.name.endswith(SCALE) else dtype
        return torch.empty(shape, dtype=kind, device=device)

    state = {}
    for shard in export.shards:
        for name, tensor in iter_tensors(shard, destination):
            state[name] = tensor[:, 0] if name.endswith(SCALE) else tensor
    return state


def write_export(state: dict[str, torch.Tensor], config: DiMOOConfig, folder: Path) -> None:
    """Our w8a8 state dict (int8 ``weight``, fp32 ``weight_scale`` (N,)) as msModelSlim writes W8A8_DYNAMIC:
    scale and a zero offset as (N, 1), the description naming every tensor, and the float config.json."""
    tensors: dict[str, torch.Tensor] = {}
    description = {"model_quant_type": SCHEME}
    for name, tensor in state.items():
        if name.endswith(SCALE):
            continue
        if tensor.dtype == torch.int8:
            base = name.removesuffix(".weight")
            scale = state[base + SCALE].float()[:, None]
            tensors.update({name: tensor, base + SCALE: scale, base + OFFSET: torch.zeros_like(scale)})
            description.update(dict.fromkeys((name, base + SCALE, base + OFFSET), SCHEME))
        else:
            tensors[name] = tensor
            description[name] = "FLOAT"
    atomic_save_file({name: t.contiguous() for name, t in tensors.items()}, folder / WEIGHTS_NAME)
    write_text_atomically(folder / DESCRIPTION_NAME, json.dumps(description, indent=2))
    plain = dataclasses.replace(config, quantization_config={})  # the description says how it is quantized
    write_text_atomically(folder / "config.json", json.dumps(plain.to_hf_dict(), indent=2))
