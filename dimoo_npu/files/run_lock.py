"""One writer per run folder: ``dimoo train`` holds a file lock on its output_dir for the whole run.

The lock is an OS file lock (``filelock``), so the kernel frees it when the holder dies: a killed run never
leaves a stale lock. Beside it, ``.dimoo-train.owner.json`` records the holder's pid, host and start time
for the refusal message. Under torchrun rank 0 tries the lock and broadcasts the outcome before any
barrier, so every rank stops with the same message instead of hanging.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from dimoo_npu.files.atomic import write_text_atomically
from dimoo_npu.utils.errors import DimooError

LOCK_NAME = ".dimoo-train.lock"
OWNER_NAME = ".dimoo-train.owner.json"


class RunFolderBusyError(DimooError):
    """Another live process is writing to this run folder."""


def _holder(folder: Path) -> str:
    try:
        owner = json.loads((folder / OWNER_NAME).read_text(encoding="utf-8"))
        return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def try_lock(folder: str | os.PathLike) -> tuple[FileLock | None, str]:
    """(the held lock, "") or (None, the refusal message) without waiting."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_NAME, is_singleton=True)  # a process may hold its own folder twice
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None, (
            f"{folder} is in use by a training run ({_holder(folder)}): wait for it to finish, stop it, "
            "or choose another output_dir"
        )
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    write_text_atomically(folder / OWNER_NAME, json.dumps(owner) + "\n")
    return lock, ""


def hold_run_folder(folder: str | os.PathLike, rank: int = 0, world_size: int = 1) -> FileLock | None:
    """Rank 0 locks ``folder``; every rank raises the same `RunFolderBusyError` when it is taken.

    Returns the lock on rank 0 (release it when the run ends) and None on the other ranks.
    """
    lock, refusal = try_lock(folder) if rank == 0 else (None, "")
    if world_size > 1:
        import torch.distributed as dist

        outcome = [refusal]
        dist.broadcast_object_list(outcome, src=0)
        refusal = outcome[0]
    if refusal:
        raise RunFolderBusyError(refusal)
    return lock
