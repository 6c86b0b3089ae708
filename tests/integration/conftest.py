"""Fixtures of the CLI tests."""

from __future__ import annotations

import shutil

import pytest

from dimoo_npu.tokens.text_tokenizer import build_word_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, checkpoint_dir):
    """A copy of the fixture checkpoint with a small word-level text tokenizer (the fixture ships none)."""
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-dimoo"
    shutil.copytree(checkpoint_dir, folder)
    build_word_tokenizer(["a red cat on a mat", "what is in the picture ?"], folder)
    return folder
