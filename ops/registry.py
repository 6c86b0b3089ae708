"""Name -> implementation registry for the fused ops, resolved once per model.

Implementations: ``reference`` (pure PyTorch, fp32 accumulation), ``torch`` (SDPA etc.),
``npu`` (torch_npu fused kernels; imported lazily, only when chosen). A backend names its default;
``DIMOO_OPS`` (see `dimoo_npu.utils.envs`) or an explicit ``overrides`` mapping forces one per op.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

OP_NAMES = ("attention", "rms_norm", "rotary", "swiglu", "add_rms_norm", "swiglu_packed", "quantized_matmul")

_MODULES = {
    "reference": "dimoo_npu.ops.reference",
    "torch": "dimoo_npu.ops.torch_impl",
    "npu": "dimoo_npu.ops.npu",
}

_DEFAULT_FOR_DEVICE = {"cpu": "torch", "cuda": "torch", "npu": "npu", "meta": "reference"}

# The devices each implementation's int8 ``quantized_matmul`` has a kernel for (the reference runs anywhere: it
# dequantises). npu: torch_npu's int8 kernels (`dimoo_npu.ops.npu`); cuda: torch._int_mm (`dimoo_npu.ops.torch_impl`),
# where this torch can load it (`cuda_int8_unavailable`).
QUANTIZED_MATMUL_DEVICES = {"torch": ("cpu", "cuda"), "npu": ("npu",)}


@dataclass(frozen=True)
class OpSet:
    """The op callables a model uses, plus the implementation name each came from.

    ``attention_mask`` is not an op of its own: it comes from the module of the chosen ``attention`` and turns the
    key padding mask into that kernel's form once per forward.
    """

    attention: Callable
    rms_norm: Callable
    rotary: Callable
    swiglu: Callable
    add_rms_norm: Callable
    swiglu_packed: Callable
    quantized_matmul: Callable
    attention_mask: Callable
    names: Mapping[str, str]

    def describe(self) -> str:
        return ", ".join(f"{op}={self.names[op]}" for op in OP_NAMES)


def cuda_int8_unavailable() -> str | None:
    """Why the cuda int8 kernel (torch._int_mm, cuBLASLt) cannot load with this torch, or None where it can."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def has_quantized_matmul(ops: OpSet, device_type: str) -> bool:
    """Whether the chosen ``quantized_matmul`` has a kernel for ``device_type`` (meta: plans, always)."""
    impl = ops.names["quantized_matmul"]
    devices = QUANTIZED_MATMUL_DEVICES.get(impl)
    if impl == "torch" and device_type == "cuda" and cuda_int8_unavailable():
        return False
    return devices is None or device_type in devices or device_type == "meta"


def require_quantized_matmul(ops: OpSet, device_type: str, scheme: str) -> None:
    """Refuse an int8 model where the chosen ``quantized_matmul`` has no kernel, rather than run it another way."""
    if has_quantized_matmul(ops, device_type):
        return
    impl = ops.names["quantized_matmul"]
    from dimoo_npu.utils.errors import InputError

    if device_type in QUANTIZED_MATMUL_DEVICES.get(impl, ()):  # cuda: the table has it, this torch cannot load it
        raise InputError(
            f"{scheme} on {device_type} needs torch._int_mm from a CUDA build of torch with a visible GPU: "
            f"{cuda_int8_unavailable()}. Fix: install a CUDA torch on a GPU machine, or run the quantized model "
            "with --device cpu"
        )
    supported = sorted({device for kernels in QUANTIZED_MATMUL_DEVICES.values() for device in kernels})
    raise InputError(
        f"{scheme} has no int8 kernel on {device_type} yet (op quantized_matmul={impl}); supported: "
        f"{', '.join(supported)}. Fix: run the quantized model with --device {supported[0]}, or load the "
        "unquantized checkpoint on this device"
    )


def available_implementations() -> tuple[str, ...]:
    return tuple(_MODULES)


def parse_overrides(spec: str) -> dict[str, str]:
    """Parse ``"reference"`` (every op) or ``"attention=torch,rms_norm=reference"``."""
    spec = spec.strip()
    if not spec:
        return {}
    if "=" not in spec:
        return dict.fromkeys(OP_NAMES, spec)
    overrides = {}
    for item in spec.split(","):
        op, sep, impl = item.partition("=")
        if not sep:
            raise ValueError(f"DIMOO_OPS entry {item!r} is not op=implementation, e.g. 'attention=reference'")
        overrides[op.strip()] = impl.strip()
    return overrides


def _check(overrides: Mapping[str, str]) -> None:
    for op, impl in overrides.items():
        if op not in OP_NAMES:
            raise ValueError(f"unknown op {op!r} in op overrides; known ops: {', '.join(OP_NAMES)}")
        if impl not in _MODULES:
            raise ValueError(f"unknown implementation {impl!r} for op {op!r}; choose one of {', '.join(_MODULES)}")


def resolve_ops(device_type: str = "cpu", overrides: Mapping[str, str] | str | None = None) -> OpSet:
    """Pick each op's implementation: explicit overrides, then ``DIMOO_OPS``, then the device default."""
    from dimoo_npu.utils import envs

    chosen = dict.fromkeys(OP_NAMES, _DEFAULT_FOR_DEVICE.get(device_type, "reference"))
    for source in (envs.ops_override(), overrides):
        parsed = parse_overrides(source) if isinstance(source, str) else dict(source or {})
        _check(parsed)
        chosen.update(parsed)
    if "npu" in chosen.values():
        _require_torch_npu(chosen)
    fns = {op: getattr(importlib.import_module(_MODULES[impl]), op) for op, impl in chosen.items()}
    mask = importlib.import_module(_MODULES[chosen["attention"]]).attention_mask
    return OpSet(**fns, attention_mask=mask, names=chosen)


def _require_torch_npu(chosen: Mapping[str, str]) -> None:
    """Fail at model build, with the reason and the fix, rather than at the first forward."""
    from dimoo_npu.adapters import BackendUnavailableError, NpuBackend

    status = NpuBackend().availability()
    if not status:
        ops = ", ".join(op for op, impl in chosen.items() if impl == "npu")
        raise BackendUnavailableError(
            f"op implementation 'npu' (for {ops}) needs torch_npu and a visible NPU: {status.reason}. Fix: "
            f"{status.fix}; or choose another implementation, e.g. DIMOO_OPS=torch"
        )
