"""Named targets for `dimoo check`: which device, which op implementations, which runtime.

A target is a device backend (`dimoo_npu.adapters`) plus one op implementation forced for every op
(`dimoo_npu.ops`), or the exported ONNX graph run in onnxruntime. ``*-ref`` targets run the
reference kernels on the device, which separates a fused kernel's error from the device's own.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from dimoo_npu.adapters import BACKENDS, Availability, BackendUnavailableError
from dimoo_npu.modeling.block_outputs import LOGITS, run_with_capture
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.utils.errors import InputError

logger = logging.getLogger(__name__)

ONNX_FIX = "pip install -e '.[onnx]' (onnx, onnxruntime, onnxscript)"


@dataclass(frozen=True)
class Target:
    name: str
    device: str  # adapter backend name: cpu, cuda, npu
    ops: str | None  # implementation forced for every op; None when the graph runs outside torch
    runtime: str = "torch"  # torch or onnxruntime
    summary: str = ""

    def availability(self) -> Availability:
        if self.runtime == "onnxruntime":
            missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]
            if missing:
                return Availability(False, f"{', '.join(missing)} not installed", ONNX_FIX)
        return BACKENDS[self.device]().availability()


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target("cpu-ref", "cpu", "reference", summary="CPU, reference kernels (fp32 accumulation): ground truth"),
        Target("cpu", "cpu", "torch", summary="CPU, torch kernels (SDPA, F.rms_norm)"),
        Target("cuda", "cuda", "torch", summary="CUDA, torch kernels"),
        Target("cuda-ref", "cuda", "reference", summary="CUDA, reference kernels"),
        Target("npu", "npu", "npu", summary="Ascend NPU, torch_npu fused kernels"),
        Target("npu-ref", "npu", "reference", summary="Ascend NPU, reference kernels (device error without fusion)"),
        Target("onnxruntime", "cpu", None, "onnxruntime", "exported ONNX graph (fp32) in onnxruntime, CPU"),
    )
}


def parse_targets(spec: str) -> list[Target]:
    """``"cpu-ref,cpu,onnxruntime"`` -> targets, the first being the reference the others are compared to."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in TARGETS]
    if unknown:
        raise InputError(f"unknown backend {unknown[0]!r} in --backends; choose from {', '.join(TARGETS)}")
    if len(set(names)) != len(names):
        raise InputError(f"--backends {spec!r} names a backend twice; list each once")
    if len(names) < 2:
        raise InputError("--backends needs at least two backends: the reference first, then those compared to it")
    return [TARGETS[name] for name in names]


def require_available(targets: list[Target]) -> None:
    """Raise `BackendUnavailableError` with the adapter's reason and fix for the first target that cannot run."""
    for target in targets:
        status = target.availability()
        if not status:
            raise BackendUnavailableError(
                f"backend {target.name!r} is not available here: {status.reason}. Fix: {status.fix}"
            )


class ModelSlot:
    """Holds at most one model; targets on the same device and dtype share it, switching only the ops.

    This keeps one copy of the weights in memory at a time, so an 8B checkpoint can be checked on a
    machine that holds it once. An int8 check (``quantize``, or an int8 ``checkpoint``) runs the reference target
    on the float weights (``reference_checkpoint``: the int8 folder's source) and the others quantized.
    """

    def __init__(
        self,
        checkpoint: Path,
        max_layers: int | None = None,
        compile: bool = False,
        quantize: str | None = None,
        reference_checkpoint: Path | None = None,
    ):
        self.checkpoint = checkpoint
        self.max_layers = max_layers
        self.compile = compile  # graph mode: the fused layout under torch.compile, as sampling runs it
        self.quantize = quantize  # quantize the float checkpoint while it loads, for every target but the reference
        self.reference_checkpoint = reference_checkpoint or checkpoint
        self._key: tuple | None = None
        self._model = None

    def get(self, device: str, dtype: torch.dtype, ops: str, reference: bool = False):
        from dimoo_npu.checkpoint import load_model
        from dimoo_npu.ops import resolve_ops

        op_set = resolve_ops(device, ops)
        folder, quantize = (self.reference_checkpoint, None) if reference else (self.checkpoint, self.quantize)
        if self._key != (device, dtype, folder, quantize):
            self.release()
            logger.info("loading %s on %s in %s%s", folder, device, dtype, f" ({quantize})" if quantize else "")
            self._model = load_model(
                folder, device=device, dtype=dtype, ops=op_set, max_layers=self.max_layers, quantize=quantize
            )
            if self.compile:
                from dimoo_npu.sampling.graph import prepare_for_sampling

                prepare_for_sampling(self._model, compile=True)
            self._key = (device, dtype, folder, quantize)
        return self._model.use_ops(op_set)

    def release(self) -> None:
        self._model, self._key = None, None
        gc.collect()


def run_target(
    target: Target,
    slot: ModelSlot,
    inputs: tuple[torch.Tensor, torch.Tensor],
    dtype: torch.dtype,
    onnx_file: Path | None = None,
    reference: bool = False,
) -> tuple[dict[str, torch.Tensor], str]:
    """Every block output and the logits of ``target`` on ``inputs`` (fp32 CPU), and a note on how it ran."""
    input_ids, attention_mask = inputs
    if target.runtime == "onnxruntime":
        return _run_onnxruntime(slot, inputs, onnx_file)
    model = slot.get(target.device, dtype, target.ops, reference)
    device = next(model.parameters()).device
    outputs = run_with_capture(model, input_ids.to(device), attention_mask.to(device))
    scheme = model.config.quantization_config.get("scheme")
    return outputs, f"{device.type}, {model.ops.describe()}" + (f", {scheme}" if scheme else "")


def check_onnx_plan(
    targets: list[Target], config: DiMOOConfig, checkpoint: Path, dtype: torch.dtype, onnx_file: Path | None
) -> None:
    """Refuse, before anything runs, an onnxruntime plan that cannot work (dtype, a file for another model)."""
    uses_ort = any(target.runtime == "onnxruntime" for target in targets)
    if onnx_file is not None and not uses_ort:
        raise InputError("--onnx is for the onnxruntime backend: add onnxruntime to --backends")
    if not uses_ort:
        return
    if dtype != torch.float32:
        raise InputError(f"the onnxruntime backend runs the fp32 graph only; use --dtype float32 (got {dtype})")
    if onnx_file is not None:
        from dimoo_npu.numerics.onnx_check import validate_transformer_onnx

        signature = validate_transformer_onnx(onnx_file, config, checkpoint)
        if signature.outputs[LOGITS][-1] != config.embedding_size:
            raise InputError(f"{onnx_file} returns part of the vocabulary; `dimoo check` needs full-vocabulary logits")


def _run_onnxruntime(slot: ModelSlot, inputs, onnx_file: Path | None):
    from dimoo_npu.export.onnx import export_transformer
    from dimoo_npu.numerics.onnx_check import read_signature, run_transformer_onnx

    if onnx_file is not None:  # validated by check_onnx_plan
        blocks = read_signature(onnx_file).block_outputs
        return run_transformer_onnx(onnx_file, *inputs), str(onnx_file) + ("" if blocks else " (logits only)")
    with tempfile.TemporaryDirectory(prefix="dimoo-check-") as folder:
        path = export_transformer(slot.get("cpu", torch.float32, "reference"), Path(folder) / "model.onnx")
        slot.release()  # the session loads its own copy of the weights
        return run_transformer_onnx(path, *inputs), "exported from the checkpoint (fp32, reference ops)"
