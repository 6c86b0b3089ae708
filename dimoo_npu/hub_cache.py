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

from dimoo_npu import envs
from dimoo_npu.errors import CheckpointError

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
    snapshot = repo / "snapshots" / ref.read_text().strip()
    if not (snapshot / "config.json").is_file():
        raise CheckpointError(
            f"the cached snapshot {snapshot} of {repo_id} has no config.json (an interrupted or partial download): "
            f"download it again with {download}"
        )
    logger.info("checkpoint %s: %s", repo_id, snapshot)
    return snapshot
