"""Checkpoints named like a Hugging Face repo (``Alpha-VLLM/Lumina-DiMOO``), found in the local hub cache.

Nothing is downloaded, ever: a name resolves to the snapshot that ``huggingface-cli download`` / ``hf download``
left in the cache (``models--Owner--Name/refs/main`` holds the commit, ``snapshots/<commit>/`` the files,
usually symlinks into ``blobs/``), so loading works offline and a missing download is one clear error.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from dimoo_npu.utils import envs
from dimoo_npu.utils.errors import CheckpointError
from dimoo_npu.utils.validate import shown

logger = logging.getLogger(__name__)

# owner/name as the Hub spells repo ids: letters, digits, '-', '_', '.'; exactly one slash.
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def resolve_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """The checkpoint folder for a path or a repo id: an existing path (or one that is no repo id) as given,
    else the repo's snapshot in the local Hugging Face cache; CheckpointError naming the download when absent."""
    text = os.fspath(path_or_name)
    path = Path(text)
    if path.exists() or not REPO_ID.fullmatch(text):
        return path
    return cached_snapshot(text)


def cached_snapshot(repo_id: str) -> Path:
    """``snapshots/<refs/main>`` of ``repo_id`` in the hub cache (it must hold config.json)."""
    cache = envs.hf_hub_cache()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    download = f"`huggingface-cli download {repo_id}` (or `hf download {repo_id}`)"
    if not ref.is_file():
        raise CheckpointError(
            f"checkpoint {repo_id} is not a folder and is not in the Hugging Face cache {cache}: download it with "
            f"{download}, point HF_HUB_CACHE or HF_HOME at the cache that holds it, or pass the checkpoint folder"
        )
    snapshot = _snapshot_of(repo, ref, repo_id)
    if not (snapshot / "config.json").is_file():
        raise CheckpointError(
            f"the cached snapshot {snapshot} of {repo_id} has no config.json (an interrupted or partial download): "
            f"download it again with {download}"
        )
    logger.info("checkpoint %s: %s", repo_id, snapshot)
    return snapshot


# A commit hash as the hub writes it, or a branch-like name: one path component, nothing that climbs out.
REF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _snapshot_of(repo: Path, ref: Path, repo_id: str) -> Path:
    """``snapshots/<ref>`` of ``repo``, only when it stays inside: the ref is one plain name (no ``..``, no
    slash, no absolute path), the folder resolves to a child of the repo's ``snapshots/``, and none of its files
    is a symlink to outside the cache (the hub's point into ``blobs/``)."""
    text = ref.read_text(errors="replace").strip()
    fix = f"delete {repo} and download {repo_id} again"
    if not REF_NAME.fullmatch(text) or ".." in text:
        raise CheckpointError(f"{ref} names {shown(text)}, not a snapshot of {repo_id} (a commit hash): {fix}")
    snapshots = (repo / "snapshots").resolve()
    snapshot = (repo / "snapshots" / text).resolve()
    if snapshot.parent != snapshots:
        raise CheckpointError(f"snapshot {text} of {repo_id} is a link to {snapshot}, outside {snapshots}: {fix}")
    cache = repo.parent.resolve()
    if snapshot.is_dir():
        for entry in snapshot.rglob("*"):
            if not entry.resolve().is_relative_to(cache):
                raise CheckpointError(
                    f"{entry} in the cached snapshot of {repo_id} links to {entry.resolve()}, outside the cache "
                    f"{cache}: {fix}"
                )
    return snapshot
