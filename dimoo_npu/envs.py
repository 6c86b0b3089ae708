"""Every DIMOO_* environment variable, documented in one place and read through these functions.

- ``DIMOO_OPS``: force op implementations for debugging: ``reference`` (all ops) or
  ``attention=reference,rms_norm=torch``; implementations are ``reference``, ``torch``, ``npu``.
- ``DIMOO_DEVICE``: the device ``auto`` resolves to when set (``cpu``, ``cuda``, ``npu``).
- ``DIMOO_LOG_LEVEL``: logging level of the ``dimoo`` command (default ``INFO``).
- ``DIMOO_COMPILE``: ``1`` runs the sampling forward in graph mode (``torch.compile(fullgraph=True)``: inductor on
  CPU/CUDA, torchair on Ascend), like ``--compile``; see `dimoo_npu.sampling.graph`.
- ``DIMOO_DEBUG``: ``1`` prints the full traceback of an unexpected error instead of writing it to a log file.
- ``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ``XDG_CACHE_HOME``/huggingface/hub (``~/.cache``): the Hugging
  Face cache where a checkpoint given as ``owner/name`` is looked up (`dimoo_npu.hub_cache`; never downloaded).
- ``WORLD_SIZE`` (set by torchrun): the number of ranks ``dimoo train --check/--plan`` lays out (default 1).
- ``DIMOO_MAX_LENGTH``: the longest sequence (tokens) to run, as ``--max-length`` (default: 8192, or the
  checkpoint's max_sequence_length when that is larger).
"""

from __future__ import annotations

import os
from pathlib import Path


def ops_override() -> str:
    return os.environ.get("DIMOO_OPS", "")


def device_override() -> str:
    return os.environ.get("DIMOO_DEVICE", "").strip()


def debug() -> bool:
    return os.environ.get("DIMOO_DEBUG", "").strip().lower() in ("1", "true", "yes")


def compile_enabled() -> bool:
    return os.environ.get("DIMOO_COMPILE", "").strip().lower() in ("1", "true", "yes")


def log_level() -> str:
    return os.environ.get("DIMOO_LOG_LEVEL", "INFO").upper()


def max_length() -> int | None:
    """DIMOO_MAX_LENGTH as a number of tokens; None when unset. A value that is not a whole number is refused."""
    raw = os.environ.get("DIMOO_MAX_LENGTH", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        from dimoo_npu.errors import InputError

        raise InputError(f"DIMOO_MAX_LENGTH={raw!r} must be a positive whole number of tokens, e.g. 8192")
    return int(raw)


def world_size() -> int:
    """Ranks of the job: torchrun's WORLD_SIZE, or the one a user sets to plan a cluster from a laptop."""
    from dimoo_npu.errors import ConfigError

    text = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"WORLD_SIZE={text!r} is not a positive integer: set it to the number of ranks, e.g. 16")
    return int(text)


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, found as huggingface_hub finds it (HUGGINGFACE_HUB_CACHE: its old name)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"
