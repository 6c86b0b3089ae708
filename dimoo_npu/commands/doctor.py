"""``dimoo doctor``: what can run here, what cannot and the one-line fix, versions, ops, collectives.

Nothing is imported from a vendor unless its package is installed; ``--require npu`` exits 1 when the
NPU cannot be used (handy as a container health check).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
from pathlib import Path

from dimoo_npu.commands import emit
from dimoo_npu.utils import envs

PACKAGES = ("torch", "torch_npu", "onnx", "onnxruntime", "onnxscript", "diffusers", "transformers", "safetensors")
# Where CANN installs put ascend_<component>_install.info (torch_npu's collect_env reads the same files).
CANN_ROOTS = ("/usr/local/Ascend/cann", "/usr/local/Ascend/ascend-toolkit/latest")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--json", help="also write the findings as JSON here")
    parser.add_argument("--require", help="exit 1 unless this backend is available (cpu, cuda, npu, onnxruntime)")


def run(args: argparse.Namespace) -> int:
    from dimoo_npu.utils.errors import InputError

    findings = collect()
    emit(format_findings(findings))
    if args.json:
        import json

        from dimoo_npu.files.atomic import write_text_atomically

        write_text_atomically(args.json, json.dumps(findings, indent=2))
        emit(f"wrote {args.json}")
    if args.require:
        if args.require not in findings["backends"]:
            raise InputError(f"--require {args.require!r}: choose one of {', '.join(findings['backends'])}")
        return 0 if findings["backends"][args.require]["available"] else 1
    return 0


def collect() -> dict:
    """Backends (availability, reason, fix, devices, collectives, ops), versions and relevant environment."""
    from dimoo_npu.adapters import BACKENDS
    from dimoo_npu.numerics.backends import TARGETS

    backends = {name: _backend_findings(cls()) for name, cls in BACKENDS.items()}
    ort = TARGETS["onnxruntime"].availability()
    backends["onnxruntime"] = {"available": ort.ok, "reason": ort.reason, "fix": ort.fix}
    return {
        "backends": backends,
        "auto": _auto_backend(),
        "versions": versions(),
        "environment": envs.reported(),
    }


def _backend_findings(backend) -> dict:
    import torch

    status = backend.availability()
    found = {
        "available": status.ok,
        "reason": status.reason,
        "fix": status.fix,
        "default_dtype": str(backend.default_dtype).removeprefix("torch."),
        "distributed": backend.dist_backend,
        "distributed_available": torch.distributed.is_available()
        and status.ok
        and torch.distributed.is_backend_available(backend.dist_backend),
    }
    if status.ok:
        found["devices"] = backend.device_count()
        found["ops"] = _ops_for(backend.device_type)
    return found


def _ops_for(device_type: str) -> dict[str, str]:
    """The implementation each op resolves to on this device (honours DIMOO_OPS); ``quantized_matmul=none``
    where it has no int8 kernel (int8 models are refused there)."""
    from dimoo_npu.ops import has_quantized_matmul, resolve_ops

    try:
        ops = resolve_ops(device_type)
        return {**ops.names, **({} if has_quantized_matmul(ops, device_type) else {"quantized_matmul": "none"})}
    except (ImportError, ValueError) as err:
        return {"error": f"{err} (fix DIMOO_OPS or install the kernels' package)"}


def _auto_backend() -> str:
    from dimoo_npu.adapters import BackendUnavailableError, get_backend

    try:
        return get_backend("auto").name
    except (BackendUnavailableError, ValueError) as err:
        return f"none ({err})"


def versions() -> dict[str, str | None]:
    """Installed versions (None = not installed), read from package metadata, plus CUDA and CANN."""
    import torch

    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    found["cuda"] = torch.version.cuda
    found["cann"] = cann_version()
    return found


def cann_version() -> str | None:
    """The CANN version from ``ascend_*_install.info`` under ASCEND_HOME_PATH / ASCEND_TOOLKIT_HOME / default roots."""
    for root in [*envs.cann_homes(), *CANN_ROOTS]:
        for info in sorted(Path(root).glob("ascend_*_install.info")) + sorted(
            Path(root).glob("*/ascend_*_install.info")
        ):
            for line in info.read_text(errors="replace").splitlines():
                key, sep, value = line.partition("=")
                if sep and key.strip().endswith("version") and value.strip():
                    return f"{value.strip()} ({info})"
    return None


def format_findings(findings: dict) -> str:
    lines = [f"{'backend':<12} {'status':<12} {'devices':>7}  {'dtype':<9} {'collectives':<16} ops"]
    for name, found in findings["backends"].items():
        status = "ok" if found["available"] else "unavailable"
        collectives = ""
        if "distributed" in found:
            collectives = f"{found['distributed']} ({'ok' if found['distributed_available'] else 'n/a'})"
        ops = ", ".join(f"{op}={impl}" for op, impl in found.get("ops", {}).items()) or "-"
        devices = found.get("devices", "-")
        lines.append(
            f"{name:<12} {status:<12} {devices!s:>7}  {found.get('default_dtype', '-'):<9} {collectives:<16} {ops}"
        )
        if not found["available"]:
            lines += [f"{'':<12} why: {found['reason']}", f"{'':<12} fix: {found['fix']}"]
    lines.append(f"auto backend: {findings['auto']}")
    shown = {key: value or "not installed" for key, value in findings["versions"].items()}
    shown["cuda"] = findings["versions"]["cuda"] or "none (CPU or NPU build of torch)"
    shown["cann"] = findings["versions"]["cann"] or "not found (set ASCEND_HOME_PATH or source CANN's set_env.sh)"
    lines.append("versions: " + "; ".join(f"{key} {value}" for key, value in shown.items()))
    if findings["environment"]:
        lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in findings["environment"].items()))
    return "\n".join(lines)
