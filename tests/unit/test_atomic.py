"""Atomic folder replacement: the new folder swaps in whole; a failed fill keeps the old one, leaves nothing."""

from __future__ import annotations

import pytest

from dimoo_npu.atomic import replace_directory


def test_replace_directory_swaps_in_the_new_folder_and_removes_the_old(tmp_path):
    target = tmp_path / "model"
    replace_directory(target, lambda staging: (staging / "a.txt").write_text("one"))
    replace_directory(target, lambda staging: (staging / "b.txt").write_text("two"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_fill_keeps_the_old_folder_and_leaves_no_staging(tmp_path):
    target = tmp_path / "model"
    replace_directory(target, lambda staging: (staging / "a.txt").write_text("one"))

    def broken(staging):
        (staging / "half.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_directory(target, broken)
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
