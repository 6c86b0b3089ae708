"""`run_check`: the same inputs through several targets, every layer compared with the first target's.

Targets run one after another and only the reference's outputs (real positions, fp32) are kept
between them, so at most one copy of the weights is in memory (see `ModelSlot`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dimoo_npu.checkpoint import with_max_layers
from dimoo_npu.files.hub_cache import resolve_checkpoint
from dimoo_npu.modeling.block_outputs import layer_names
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.numerics.backends import ModelSlot, Target, check_onnx_plan, require_available, run_target
from dimoo_npu.numerics.compare import LayerDiff, compare_runs, first_failure, real_positions
from dimoo_npu.numerics.tolerances import Tolerance, tolerance_for
from dimoo_npu.quantization import check_scheme, spec_of
from dimoo_npu.tokens.lengths import length_cap
from dimoo_npu.utils import envs
from dimoo_npu.utils.errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_name(text: str) -> str:
    name = DTYPE_ALIASES.get(text, text)
    if name not in DTYPES:
        raise InputError(f"unknown dtype {text!r}; choose one of {', '.join(DTYPES)} (or fp32, bf16, fp16)")
    return name


def make_check_inputs(
    config: DiMOOConfig, batch: int = 2, length: int = 64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ids shaped like a generation step: text, then image codes with some MASK; last row right-padded.

    Returns input_ids (B, L) int64 and attention_mask (B, L) int64 (1 = real token).
    """
    cap = length_cap(config.max_sequence_length)
    if batch < 1 or not 2 <= length <= cap:
        raise InputError(f"--batch must be >= 1 and --length in [2, {cap}] (the length cap, DIMOO_MAX_LENGTH)")
    tokens = config.special_tokens
    generator = torch.Generator().manual_seed(seed)
    text_length = length // 2
    text = torch.randint(0, tokens["mask"], (batch, text_length), generator=generator)
    codes = torch.randint(0, tokens["codebook_size"], (batch, length - text_length), generator=generator)
    image = codes + tokens["image_offset"]
    masked = torch.rand(image.shape, generator=generator) < 0.3
    input_ids = torch.cat([text, image.masked_fill(masked, tokens["mask"])], dim=1)  # (B, L)
    attention_mask = torch.ones(batch, length, dtype=torch.int64)
    if batch > 1:
        padded = max(1, length // 4)
        attention_mask[-1, -padded:] = 0
        input_ids[-1, -padded:] = tokens["eos"]
    return input_ids, attention_mask


@dataclass
class Comparison:
    """One target against the reference."""

    target: str
    note: str
    diffs: list[LayerDiff]

    @property
    def first_failure(self) -> str | None:
        return first_failure(self.diffs)

    @property
    def passed(self) -> bool:
        return self.first_failure is None


@dataclass
class CheckReport:
    checkpoint: str
    dtype: str
    tolerance: Tolerance
    reference: str
    reference_note: str
    inputs: dict[str, int]
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(comparison.passed for comparison in self.comparisons)

    def as_dict(self) -> dict:
        return {
            "checkpoint": self.checkpoint,
            "dtype": self.dtype,
            "tolerance": asdict(self.tolerance),
            "reference": {"backend": self.reference, "note": self.reference_note},
            "inputs": self.inputs,
            "passed": self.passed,
            "backends": {
                c.target: {
                    "passed": c.passed,
                    "first_failing_layer": c.first_failure,
                    "note": c.note,
                    "layers": [diff.as_dict() for diff in c.diffs],
                }
                for c in self.comparisons
            },
        }


def run_check(
    checkpoint: str | os.PathLike,
    targets: list[Target],
    dtype: str = "float32",
    tolerance: Tolerance | None = None,
    *,
    batch: int = 2,
    length: int = 64,
    seed: int = 0,
    onnx_file: str | os.PathLike | None = None,
    max_layers: int | None = None,
    compile: bool | None = None,
    quantize: str | None = None,
) -> CheckReport:
    """Run ``targets`` in order on one seeded batch and compare each with ``targets[0]`` layer by layer.

    ``max_layers=N`` checks the first N blocks and the head only, reading only their weights. An int8 check
    (``quantize``, or an int8 checkpoint, see `int8_plan`) runs the reference on the float weights in fp32 and
    the other targets quantized, judged by the ``int8`` row of the tolerance table.
    """
    folder = resolve_checkpoint(checkpoint)
    config = with_max_layers(DiMOOConfig.from_json(folder), max_layers)
    dtype = dtype_name(dtype)
    scheme, reference_folder = int8_plan(folder, config, quantize, dtype)
    if scheme and any(target.runtime == "onnxruntime" for target in targets):
        raise InputError("the onnxruntime backend runs no int8 graph: drop it from --backends for an int8 check")
    require_available(targets)
    onnx_path = Path(onnx_file) if onnx_file else None
    check_onnx_plan(targets, config, folder, DTYPES[dtype], onnx_path)
    tolerance = tolerance or tolerance_for(dtype, scheme=scheme)
    inputs = make_check_inputs(config, batch, length, seed)
    names = layer_names(config.n_layers)
    compile = envs.compile_enabled() if compile is None else compile
    slot = ModelSlot(folder, max_layers, compile, quantize, reference_folder)
    report = None
    try:
        for target in tqdm(targets, desc="backends", unit="backend", disable=len(targets) < 3):
            outputs, note = run_target(target, slot, inputs, DTYPES[dtype], onnx_path, reference=report is None)
            outputs = real_positions(outputs, inputs[1])
            if report is None:
                reference = outputs
                meta = {"batch": batch, "length": length, "seed": seed, "real_tokens": int(inputs[1].sum())}
                meta["layers"] = config.n_layers
                report = CheckReport(str(folder), dtype, tolerance, target.name, note, meta)
                continue
            report.comparisons.append(Comparison(target.name, note, compare_runs(reference, outputs, names, tolerance)))
            del outputs
    finally:
        slot.release()
    return report


def int8_plan(folder: Path, config: DiMOOConfig, quantize: str | None, dtype: str) -> tuple[str | None, Path | None]:
    """(the int8 scheme under check or None, the float folder the reference runs): an int8 folder's reference is
    its unquantized source, which must be here."""
    spec = spec_of(config)
    if quantize is None and spec is None:
        return None, None
    if dtype != "float32":
        raise InputError(f"an int8 check compares with fp32: use --dtype float32 (got {dtype})")
    if spec is None:
        return check_scheme(quantize), None
    if quantize is not None:
        raise InputError(f"{folder} is already quantized ({spec.scheme}): drop --quantize")
    if not spec.source or not (Path(spec.source) / "config.json").is_file():
        raise InputError(
            f"the fp32 reference of int8 checkpoint {folder} is its unquantized source "
            f"({spec.source or 'not recorded'}), which is not here: check the source with --quantize instead"
        )
    return spec.scheme, Path(spec.source)


def int8_scheme_of(checkpoint: str | os.PathLike) -> str | None:
    """The scheme of an int8 checkpoint folder, None for a float one."""
    spec = spec_of(DiMOOConfig.from_json(resolve_checkpoint(checkpoint)))
    return spec.scheme if spec else None
