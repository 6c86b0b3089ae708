"""Every environment variable this package reads, documented in one place and read through these functions only.

- ``DIMOO_OPS``: force op implementations for debugging: ``reference`` (all ops) or
  ``attention=reference,rms_norm=torch``; implementations are ``reference``, ``torch``, ``npu``.
- ``DIMOO_DEVICE``: the device ``auto`` resolves to when set (``cpu``, ``cuda``, ``npu``).
- ``DIMOO_LOG_LEVEL``: logging level of the ``dimoo`` command (default ``INFO``).
- ``DIMOO_COMPILE``: ``1`` runs the sampling forward in graph mode (``torch.compile(fullgraph=True)``: inductor on
  CPU/CUDA, torchair on Ascend), like ``--compile``; see `dimoo_npu.sampling.graph`.
- ``DIMOO_API_KEY``: the key `dimoo serve` requires (``Authorization: Bearer <key>``), as ``--api-key``; unset: none.
- ``DIMOO_DEBUG``: ``1`` prints the full traceback of an unexpected error instead of writing it to a log file.
- ``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ``XDG_CACHE_HOME``/huggingface/hub (``~/.cache``): the Hugging
  Face cache where a checkpoint given as ``owner/name`` is looked up (`dimoo_npu.files.hub_cache`; never downloaded).
- ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (set by torchrun): this process's rank, the number of ranks (also what
  ``dimoo train --check/--plan`` lays out; default 1) and the device index on its node (default: the rank).
  ``MASTER_ADDR``/``MASTER_PORT`` are read by torch.distributed's ``env://`` rendezvous itself, never here
  (``scripts/train_ascend.sh`` turns NNODES, NODE_RANK, NPUS_PER_NODE, MASTER_ADDR, MASTER_PORT into torchrun flags).
- ``ASCEND_RT_VISIBLE_DEVICES``: the NPUs torch_npu sees (empty: none, reported by the npu backend with the fix);
  ``ASCEND_HOME_PATH``/``ASCEND_TOOLKIT_HOME``: the CANN install `dimoo doctor` reads its version from.
- ``DIMOO_MAX_LENGTH``: the longest sequence (tokens) to run, as ``--max-length`` (default: 8192, or the
  checkpoint's max_sequence_length when that is larger).
- ``DIMOO_MAX_CONCURRENT_TOKENS``: the tokens of work `dimoo serve` holds at a time, as ``--max-concurrent-tokens``.
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


def api_key() -> str | None:
    """DIMOO_API_KEY for `dimoo serve`; None when unset or empty."""
    return os.environ.get("DIMOO_API_KEY", "").strip() or None


def log_level() -> str:
    return os.environ.get("DIMOO_LOG_LEVEL", "INFO").upper()


def max_length() -> int | None:
    """DIMOO_MAX_LENGTH as a number of tokens; None when unset. Not a whole number in [1, 2^20]: refused."""
    raw = os.environ.get("DIMOO_MAX_LENGTH", "").strip()
    if not raw:
        return None
    from dimoo_npu.utils.validate import MAX_LENGTH_LIMIT, parse_int

    return parse_int("DIMOO_MAX_LENGTH", raw, 1, MAX_LENGTH_LIMIT)


def world_size() -> int:
    """Ranks of the job: torchrun's WORLD_SIZE, or the one a user sets to plan a cluster from a laptop."""
    from dimoo_npu.utils.errors import ConfigError

    text = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"WORLD_SIZE={text!r} is not a positive integer: set it to the number of ranks, e.g. 16")
    return int(text)


def torchrun_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a process run alone."""
    from dimoo_npu.utils.errors import ConfigError

    world = world_size()
    rank_text = os.environ.get("RANK", "0").strip()
    local_text = os.environ.get("LOCAL_RANK", rank_text).strip()
    for name, text in (("RANK", rank_text), ("LOCAL_RANK", local_text)):
        if not text.isdigit() or (name == "RANK" and int(text) >= world):
            raise ConfigError(
                f"{name}={text!r} is not an integer in [0, WORLD_SIZE={world}): launch through torchrun, "
                "which sets RANK, LOCAL_RANK and WORLD_SIZE"
            )
    return int(rank_text), world, int(local_text)


def ascend_visible_devices() -> str | None:
    """ASCEND_RT_VISIBLE_DEVICES as set (``""`` hides every NPU), or None when unset."""
    return os.environ.get("ASCEND_RT_VISIBLE_DEVICES")


def cann_homes() -> list[str]:
    """The CANN install folders named by ASCEND_HOME_PATH, then ASCEND_TOOLKIT_HOME (those set)."""
    return [path for path in (os.environ.get("ASCEND_HOME_PATH"), os.environ.get("ASCEND_TOOLKIT_HOME")) if path]


REPORTED = ("DIMOO_DEVICE", "DIMOO_OPS", "ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "ASCEND_HOME_PATH")


def reported() -> dict[str, str]:
    """The variables that change which device and kernels run, those set (`dimoo doctor` prints them)."""
    return {name: os.environ[name] for name in REPORTED if name in os.environ}


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, found as huggingface_hub finds it (HUGGINGFACE_HUB_CACHE: its old name)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def max_concurrent_tokens() -> int | None:
    """DIMOO_MAX_CONCURRENT_TOKENS for `dimoo serve`; None when unset. Not a whole number: refused by name."""
    raw = os.environ.get("DIMOO_MAX_CONCURRENT_TOKENS", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        from dimoo_npu.utils.errors import InputError

        raise InputError(f"DIMOO_MAX_CONCURRENT_TOKENS={raw[:40]!r} must be a positive whole number of tokens")
    return int(raw)
