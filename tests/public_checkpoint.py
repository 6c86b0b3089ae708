"""A tiny checkpoint laid out like the public Lumina-DiMOO: the tiny-dimoo weights, config and vqvae/ with the
public-layout text tokenizer (tests/fixtures/public-tokenizer, written by scripts/make_test_tokenizer.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import CHECKPOINT

PUBLIC_TOKENIZER = Path(__file__).parent / "fixtures" / "public-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def assemble_public_checkpoint(folder: Path) -> Path:
    """Write ``folder``: config files and the tokenizer copied (tests may edit them), weights and vqvae/ linked."""
    folder.mkdir(parents=True)
    for entry in CHECKPOINT.iterdir():
        if entry.suffix == ".json":
            shutil.copyfile(entry, folder / entry.name)
        else:
            (folder / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    for name in TOKENIZER_FILES:
        shutil.copyfile(PUBLIC_TOKENIZER / name, folder / name)
    return folder
