"""Batch requests and outputs are refused before any sampling when they would lose or garble an image."""

from __future__ import annotations

import os

import pytest

from dimoo_npu.batch.batch_requests import Numbered, output_paths
from dimoo_npu.settings.requests import TextToImageRequest
from dimoo_npu.utils.errors import InputError


def requests_writing(*names: str) -> list[Numbered]:
    return [Numbered(index, TextToImageRequest(output=name, seed=index)) for index, name in enumerate(names)]


@pytest.mark.parametrize("second", ["./a.png", "sub/../a.png", "link.png", "{out}/a.png", "linked-dir/a.png"], ids=str)
def test_one_file_under_two_spellings_is_refused(second, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "link.png").symlink_to(out / "a.png")  # a link to a file that does not exist yet
    os.symlink(out, tmp_path / "out" / "linked-dir")
    requests = requests_writing("a.png", second.format(out=out))
    with pytest.raises(InputError, match="requests 1 and 2 both write .*a.png"):
        output_paths(requests, "t2i", None, "out")


def test_names_that_differ_only_in_case_are_refused(tmp_path):
    with pytest.raises(InputError, match="requests 1 and 3 both write .*A.png and .*a.png .*case does not count"):
        output_paths(requests_writing("a.png", "b.png", "A.png"), "t2i", None, str(tmp_path))


def test_distinct_files_pass(tmp_path):
    paths = output_paths(requests_writing("a.png", "b.png", "sub/a.png"), "t2i", None, str(tmp_path))
    assert [p.name for p in paths] == ["a.png", "b.png", "a.png"]
