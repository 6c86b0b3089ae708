"""Header validation of the memory-bounded safetensors reader: as strict as the safetensors library.

Every file here is written byte by byte, so each test states exactly which rule it breaks.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch

from dimoo_npu.files.safetensors_io import atomic_save_file, iter_tensors, read_header, read_metadata
from dimoo_npu.utils.errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit on the JSON header


def _raw_file(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(path, lambda entry: torch.empty(entry.shape, dtype=entry.dtype)))


def test_well_formed_file_round_trips(tmp_path):
    path = tmp_path / "ok.safetensors"
    atomic_save_file({"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, path)
    tensors = _read_all(path)
    assert torch.equal(tensors["a"], torch.arange(6.0).view(2, 3))
    assert torch.equal(tensors["b"], torch.ones(4, dtype=torch.bfloat16))


def test_zero_sized_tensor_is_allowed(tmp_path):
    header = {
        "empty": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    path = _raw_file(tmp_path / "z.safetensors", header, _f32(1, 2))
    assert _read_all(path)["empty"].shape == (0, 3)


@pytest.mark.parametrize(
    ("header", "data", "expected"),
    [
        pytest.param(  # the bug of issue 12: 2 floats of bytes for 4 floats of shape, half left uninitialised
            {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}},
            _f32(1, 2),
            r"'w'.*8 bytes.*shape \[4\] of F32 needs 16",
            id="span-shorter-than-shape",
        ),
        pytest.param(
            {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}},
            _f32(1, 2),
            r"'w'.*8 bytes.*needs 4",
            id="span-longer-than-shape",
        ),
        pytest.param(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            _f32(1, 2, 3),
            r"'b'.*overlaps 'a'",
            id="overlap",
        ),
        pytest.param(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            },
            _f32(1, 2),
            r"overlaps",
            id="same-bytes-twice",
        ),
        pytest.param(
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            _f32(1, 2, 3),
            r"'b'.*starts at byte 8.*bytes 4\.\.8 belong to no tensor",
            id="gap",
        ),
        pytest.param(
            {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
            _f32(1, 2),
            r"4 byte\(s\) after its last tensor",
            id="trailing-bytes",
        ),
        pytest.param(
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}},
            b"",
            r"'w'.*data_offsets \[-8, 0\]",
            id="negative-offset",
        ),
        pytest.param(
            {"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}},
            _f32(1, 2),
            r"'w'.*data_offsets \[8, 0\]",
            id="end-before-start",
        ),
        pytest.param(
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}},
            _f32(1, 2),
            r"'w'.*data_offsets",
            id="one-offset",
        ),
        pytest.param(
            {"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}},
            _f32(1, 2),
            r"'w'.*shape \[2\.0\]",
            id="float-shape",
        ),
        pytest.param(
            {"w": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}},
            _f32(1, 2),
            r"'w'.*shape \[\"2\"\]",
            id="string-shape",
        ),
        pytest.param(
            {"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
            _f32(1, 2),
            r"'w'.*shape \[-2\]",
            id="negative-dim",
        ),
        pytest.param(
            {"w": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}},
            _f32(1, 2),
            r"'w'.*shape \[true, 2\]",
            id="bool-dim",
        ),
        pytest.param(
            {"w": {"dtype": "F32", "shape": [2]}},
            _f32(1, 2),
            r"'w'.*data_offsets",
            id="no-offsets",
        ),
        pytest.param(
            {"w": [0, 8]},
            _f32(1, 2),
            r"'w'.*not an object",
            id="entry-not-object",
        ),
        pytest.param(
            {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
            _f32(1, 2),
            r"truncated.*download or copy it again",
            id="runs-past-file",
        ),
    ],
)
def test_bad_layout_is_refused_naming_file_and_tensor(tmp_path, header, data, expected):
    from safetensors import SafetensorError, safe_open

    path = _raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=expected) as caught:
        read_header(path)
    assert str(path) in str(caught.value)
    with pytest.raises(SafetensorError), safe_open(str(path), "pt"):  # the library refuses the same file
        pass


def test_header_that_is_not_an_object(tmp_path):
    path = _raw_file(tmp_path / "list.safetensors", [1, 2], b"")  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_header(path)


def test_huge_header_length_is_refused_before_reading_it(tmp_path):
    """A header length past the library's limit fails at once, even when the (sparse) file is long enough."""
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1))
    os.truncate(path, MAX_HEADER_BYTES + 64)  # sparse: costs no disk
    with pytest.raises(CheckpointError, match=r"header of \d+ bytes.*limit of 100000000.*corrupt"):
        read_header(path)


def test_refused_before_any_destination_is_made(tmp_path):
    """Validation runs on the whole header before the first tensor is allocated."""
    header = {
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [4, 8]},
    }
    path = _raw_file(tmp_path / "late.safetensors", header, _f32(1, 2))
    made: list[str] = []

    def destination(entry):
        made.append(entry.name)
        return torch.empty(entry.shape, dtype=entry.dtype)

    with pytest.raises(CheckpointError, match="'b'"):
        list(iter_tensors(path, destination))
    assert made == []


def test_metadata_is_read_from_a_checked_file_only(tmp_path):
    path = tmp_path / "shard.safetensors"
    atomic_save_file({"a": torch.arange(4.0)}, path, metadata={"format": "x", "digest": "d"})
    assert read_metadata(path) == {"format": "x", "digest": "d"}
    whole = path.read_bytes()
    path.write_bytes(whole[:-4])  # a shard cut short keeps its header: its digest must not be trusted
    with pytest.raises(CheckpointError, match="truncated"):
        read_metadata(path)
    bad = _raw_file(tmp_path / "bad.safetensors", {"__metadata__": {"n": 1}, **_one_f32()}, _f32(1))
    with pytest.raises(CheckpointError, match="not a map of strings"):
        read_metadata(bad)


def _one_f32() -> dict:
    return {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
