"""Int8 inference, applied to the plain model from outside: per-output-channel symmetric int8 weights.

`quantize_model` swaps every ``nn.Linear`` of the blocks (the kept ones aside) for a `QuantizedLinear`, whose
forward is the op registry's ``quantized_matmul``. Names stay the checkpoint's: ``<linear>.weight`` int8 (N, K)
and ``<linear>.weight_scale`` fp32 (N,), as compressed-tensors checkpoints name them, so a quantized folder
loads by name like any other. The model calls ``F.linear`` on its fused ``qkv``/``gate_up`` weights directly;
`fuse_quantized` makes those fused weights `QuantizedLinear`s too, which answer ``F.linear`` themselves.
Embeddings, norms and the output head stay in the model's dtype (the head slices its rows per call).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dimoo_npu.model import DiMOOModel, fuse_projections
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.ops import OpSet, require_quantized_matmul
from dimoo_npu.ops.reference import quantize_rows
from dimoo_npu.utils.errors import InputError

SCHEMES = ("w8a8", "w8a16")
QUANT_METHOD = "dimoo-int8"
SCALE_SUFFIX = ".weight_scale"
# Only the blocks' linears are candidates; these name what stays in the original dtype, for the record and for
# users who keep more (fnmatch patterns on module names, e.g. "*.blocks.0.*" or "*.attn_out").
DEFAULT_KEEP = ("model.transformer.wte", "model.transformer.ln_f", "model.transformer.ff_out", "*_norm")
ROWS_PER_SLICE = 1024  # rows quantized at a time: the float copy a slice needs stays small


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise InputError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    return scheme


@dataclass(frozen=True)
class QuantizationSpec:
    """What ``config.json``'s ``quantization_config`` records: the scheme, the kept modules, the source."""

    scheme: str
    keep: tuple[str, ...] = DEFAULT_KEEP
    source: str | None = None  # the unquantized checkpoint it came from: what training and export-hf need

    def __post_init__(self) -> None:
        check_scheme(self.scheme)

    def to_config(self) -> dict:
        return {
            "quant_method": QUANT_METHOD,
            "scheme": self.scheme,
            "weights": "int8 symmetric per output channel",
            "activations": "int8 symmetric per token, dynamic" if self.scheme == "w8a8" else "unquantized",
            "modules_to_not_convert": list(self.keep),
            **({"source": self.source} if self.source else {}),
        }

    @classmethod
    def from_config(cls, raw: dict) -> QuantizationSpec:
        if raw.get("quant_method") != QUANT_METHOD:
            raise InputError(
                f"config.json's quantization_config has quant_method {raw.get('quant_method')!r}; this package "
                f"reads {QUANT_METHOD!r} (written by `dimoo quantize`) only"
            )
        return cls(str(raw.get("scheme")), tuple(raw.get("modules_to_not_convert") or ()), raw.get("source"))


def spec_of(config: DiMOOConfig) -> QuantizationSpec | None:
    """The checkpoint's quantization, or None for a plain one."""
    return QuantizationSpec.from_config(config.quantization_config) if config.quantization_config else None


def refuse_quantized(config: DiMOOConfig, folder: object, purpose: str) -> None:
    """Training and export-hf need the unquantized weights: name where they are."""
    spec = spec_of(config)
    if spec is None:
        return
    source = f"its unquantized source {spec.source}" if spec.source else "the unquantized checkpoint it came from"
    raise InputError(f"{folder} is an int8 ({spec.scheme}) inference checkpoint; {purpose} needs {source}")


class QuantizedLinear(nn.Module):
    """``y = quantized_matmul(x, weight, weight_scale, scheme)``, no bias; also what ``F.linear(x, self)`` gives.

    ``persistent=False`` (the fused weights) keeps it out of the state dict: its parts are saved under their own
    names, and their buffers are views into its own.
    """

    def __init__(self, in_features: int, out_features: int, scheme: str, ops: OpSet, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = check_scheme(scheme)
        self.ops = ops  # switched by DiMOOModel.use_ops like every op user
        self.persistent = True
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.quantized_matmul(x, self.weight, self.weight_scale, self.scheme)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """``F.linear(x, quantized)``: the model's fused projections call F.linear on a weight directly."""
        kwargs = kwargs or {}
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if func is F.linear and isinstance(args[1], cls) and bias is None:
            return args[1](args[0])
        return NotImplemented

    def set_weight(self, weight: torch.Tensor) -> QuantizedLinear:
        self.weight, self.weight_scale = quantize_weight(weight)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.persistent:
            super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float (N, K) weight as (int8 (N, K), fp32 scale (N,)), ``ROWS_PER_SLICE`` rows at a time, so the float
    copies the rounding makes stay one slice big."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], ROWS_PER_SLICE):
        rows = slice(start, start + ROWS_PER_SLICE)
        q[rows], scale_rows = quantize_rows(weight[rows])
        scale[rows] = scale_rows[:, 0]
    return q, scale


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(module, QuantizedLinear) for module in model.modules())


def _kept(name: str, keep: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in keep)


def quantize_model(model: DiMOOModel, spec: QuantizationSpec, quantize_weights: bool = True) -> DiMOOModel:
    """Swap the blocks' linears (unfused model) for `QuantizedLinear`s, in place, on the weights' device.

    ``quantize_weights=False`` builds the structure only (int8 zeros to load a quantized checkpoint into; on the
    meta device, nothing at all). Refused where the op registry has no int8 kernel for the device.
    """
    device = model.transformer.wte.weight.device
    require_quantized_matmul(model.ops, device.type, spec.scheme)
    for block_name, block in model.transformer.blocks.named_children():
        if block.qkv_weight is not None:
            raise ValueError("quantize_model takes an unfused model: quantize first, then fuse (fuse_for_sampling)")
        for name, linear in list(block.named_children()):
            full = f"model.transformer.blocks.{block_name}.{name}"
            if not isinstance(linear, nn.Linear) or _kept(full, spec.keep):
                continue
            quantized = QuantizedLinear(linear.in_features, linear.out_features, spec.scheme, model.ops, device)
            if quantize_weights and device.type != "meta":
                with torch.no_grad():
                    quantized.set_weight(linear.weight)
            setattr(block, name, quantized)
    model.config = dataclasses.replace(model.config, quantization_config=spec.to_config())
    return model


def fuse_for_sampling(model: DiMOOModel) -> DiMOOModel:
    """`fuse_projections` for a plain model; for a quantized one, the same layout made of `QuantizedLinear`s.

    Per-output-channel quantization is row by row, so the fused int8 weight is exactly the parts' stacked. A group
    with a kept (float) member stays unfused (the model then calls the parts one by one).
    """
    if not is_quantized(model):
        return fuse_projections(model)
    for block in model.transformer.blocks.values():
        if block.qkv_weight is not None:
            continue
        with torch.no_grad():
            block.qkv_weight = _fuse(block.q_proj, block.k_proj, block.v_proj)
            block.gate_up_weight = _fuse(block.ff_proj, block.up_proj)
    return model


def _fuse(*parts: nn.Module) -> QuantizedLinear | None:
    if not all(isinstance(part, QuantizedLinear) for part in parts):
        return None
    first = parts[0]
    fused = QuantizedLinear(first.in_features, sum(p.out_features for p in parts), first.scheme, first.ops, "meta")
    fused.weight = torch.cat([p.weight for p in parts])
    fused.weight_scale = torch.cat([p.weight_scale for p in parts])
    fused.persistent = False
    start = 0
    for part in parts:
        rows = slice(start, start + part.out_features)
        part.weight, part.weight_scale = fused.weight[rows], fused.weight_scale[rows]
        start += part.out_features
    return fused


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: int8 blocks, fp32 scales, the rest in its dtype."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
