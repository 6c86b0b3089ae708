"""Fake ``torch_npu.npu`` device module (reachable as ``torch.npu`` once the fake is imported).

Source: Ascend/pytorch torch_npu/npu/__init__.py and torch_npu/npu/utils.py (commit 9e73e708): is_available,
device_count with its ASCEND_RT_VISIBLE_DEVICES parsing, set_device / current_device, synchronize, memory stats.
The "driver" is simulated: ``FAKE_TORCH_NPU_DEVICES`` (default 8) devices, none when
``FAKE_TORCH_NPU_MODE=no_device``. Tensors never leave the CPU, so memory counters stay at zero.
"""

from __future__ import annotations

import os

import torch

DEFAULT_FAKE_DEVICES = 8
FAKE_SOC_NAME = "Ascend910B3"

_current_device = 0


def _driver_device_count() -> int:
    """What drvGetDevNum (libascend_hal.so) would report on the simulated machine."""
    if os.environ.get("FAKE_TORCH_NPU_MODE", "") == "no_device":
        return 0
    return int(os.environ.get("FAKE_TORCH_NPU_DEVICES", DEFAULT_FAKE_DEVICES))


def _parse_visible_devices() -> list[int]:
    """ASCEND_RT_VISIBLE_DEVICES as torch_npu parses it (torch_npu/npu/__init__.py ``_parse_visible_devices``).

    Unset: every device. Empty: none. Parsing stops at the first character that is neither a digit nor a comma,
    and at the first empty item.
    """
    var = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    if var is None:
        return list(range(64))
    valid = 0
    while valid < len(var) and (var[valid].isdigit() or var[valid] == ","):
        valid += 1
    devices: list[int] = []
    for item in var[:valid].split(",") if var else []:
        if not item:
            break
        devices.append(int(item))
    return devices


def device_count() -> int:
    """Visible devices: the list must be strictly ascending (else 0) and is cut at the first id the driver lacks.

    Source: Ascend/pytorch torch_npu/npu/__init__.py ``_device_count_ascend_hal`` / ``device_count``.
    """
    visible = _parse_visible_devices()
    if not visible:
        return 0
    raw = _driver_device_count()
    if raw <= 0:
        return raw
    for index, value in enumerate(visible):
        if index > 0 and value <= visible[index - 1]:
            return 0
        if value >= raw:
            return index
    return len(visible)


def is_available() -> bool:
    """Source: Ascend/pytorch torch_npu/npu/__init__.py ``is_available`` (device_count() > 0)."""
    return device_count() > 0


def _index(device) -> int:
    """int, "npu:1", or an object with ``.type``/``.index`` -> index.

    Source: Ascend/pytorch torch_npu/npu/utils.py ``_get_device_index(device, optional=True)``.
    """
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        kind, _, number = device.partition(":")
        if kind != "npu":
            raise ValueError(f"Expected a npu device, but got: {device}")
        return int(number) if number else _current_device
    if getattr(device, "type", None) != "npu":
        raise ValueError(f"Expected a npu device, but got: {device}")
    return _current_device if device.index is None else device.index


def _require_devices() -> int:
    count = device_count()
    if count <= 0:
        raise RuntimeError("npu device not found: no NPU is visible (fake torch_npu, simulated driver)")
    return count


def set_device(device) -> None:
    """No-op for negative indices; an index past the visible devices fails (torch_npu/npu/utils.py set_device)."""
    global _current_device
    index = _index(device)
    if index < 0:
        return
    count = _require_devices()
    if index >= count:
        raise RuntimeError(f"invalid NPU device id {index}: only {count} visible (fake torch_npu)")
    _current_device = index


def current_device() -> int:
    _require_devices()
    return _current_device


def synchronize(device=None) -> None:
    """CPU tensors are always ready; only the device checks remain."""
    _require_devices()
    if device is not None:
        set_device(device)


def get_device_name(device=None) -> str:
    _require_devices()
    return FAKE_SOC_NAME


def memory_allocated(device=None) -> int:
    return 0


def memory_reserved(device=None) -> int:
    return 0


def max_memory_allocated(device=None) -> int:
    return 0


def reset_peak_memory_stats(device=None) -> None:
    """Nothing to reset: no tensor lives on the fake device."""


def memory_stats(device=None) -> dict[str, int]:
    return {"allocated_bytes.all.current": 0, "reserved_bytes.all.current": 0, "allocated_bytes.all.peak": 0}


def manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


manual_seed_all = manual_seed
