"""Every DIMOO_* environment variable, documented in one place and read through these functions.

- ``DIMOO_OPS``: force op implementations for debugging: ``reference`` (all ops) or
  ``attention=reference,rms_norm=torch``; implementations are ``reference``, ``torch``, ``npu``.
- ``DIMOO_DEVICE``: the device ``auto`` resolves to when set (``cpu``, ``cuda``, ``npu``).
- ``DIMOO_LOG_LEVEL``: logging level of the ``dimoo`` command (default ``INFO``).
"""

from __future__ import annotations

import os


def ops_override() -> str:
    return os.environ.get("DIMOO_OPS", "")


def device_override() -> str:
    return os.environ.get("DIMOO_DEVICE", "").strip()


def log_level() -> str:
    return os.environ.get("DIMOO_LOG_LEVEL", "INFO").upper()
