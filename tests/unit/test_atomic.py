"""Atomic writes: files and folders swap in whole, flushed to disk (file and folder), with the umask's mode; a failed
write keeps the old one and leaves nothing."""

from __future__ import annotations

import os
import stat

import pytest

from dimoo_npu.files.atomic import replace_directory, write_text_atomically


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


def _record_fsyncs(monkeypatch) -> list[str]:
    """Patch os.fsync to note what each call flushed: 'dir' or 'file'."""
    seen, real = [], os.fsync

    def fsync(fd):
        seen.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_write_atomically_flushes_the_file_then_its_folder_with_the_umask_mode(tmp_path, monkeypatch):
    seen = _record_fsyncs(monkeypatch)
    old = os.umask(0o027)
    try:
        path = write_text_atomically(tmp_path / "out" / "a.json", "{}")
    finally:
        os.umask(old)
    assert seen == ["file", "dir"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_write_atomically_without_overwrite_keeps_a_file_that_exists(tmp_path):
    path = write_text_atomically(tmp_path / "a.txt", "old")
    with pytest.raises(FileExistsError):
        write_text_atomically(path, "new", overwrite=False)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_replace_directory_flushes_every_file_and_the_folders(tmp_path, monkeypatch):
    seen = _record_fsyncs(monkeypatch)
    replace_directory(tmp_path / "model", lambda staging: (staging / "a.txt").write_text("one"))
    assert seen == ["file", "dir", "dir"]  # a.txt, the staging folder, the parent after the swap
