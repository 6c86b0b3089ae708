"""Every misuse of the generation commands ends in exit 2 with one line naming the problem and the fix, before
any sampling; unexpected errors exit 1 naming the traceback's file; Ctrl-C exits 130; nothing partial is left."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dimoo_npu.cli import main

SMALL = ["--device", "cpu", "--timesteps", "2", "--width", "16", "--height", "16"]


@pytest.fixture
def cli(checkpoint, caplog, tmp_path, monkeypatch):
    """Run ``dimoo`` in tmp_path; returns (exit code, logged text)."""
    monkeypatch.chdir(tmp_path)

    def run(*argv: str) -> tuple[int, str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dimoo"):
            code = main([*argv, "--checkpoint", str(checkpoint)])
        return code, caplog.text

    return run


def write_jsonl(path, *rows: str) -> str:
    path.write_text("".join(row + "\n" for row in rows))
    return str(path)


T2I = ["t2i", "--prompt", "a red cat"]
EDIT = ["edit", "--prompt", "a red cat", "--image", "{source}"]
BAD = {
    "nan guidance": ([*T2I, "--cfg-scale", "nan"], "--cfg-scale=nan is not a finite number"),
    "inf guidance": ([*T2I, "--cfg-scale", "inf"], "--cfg-scale=inf is not a finite number"),
    "inf temperature": ([*T2I, "--temperature", "inf"], "--temperature=inf is not a finite number"),
    "nan cache ratio": ([*T2I, "--cache-ratio", "nan"], "--cache-ratio=nan is not a finite number"),
    "-inf image guidance": ([*EDIT, "--cfg-img=-inf"], "--cfg-img=-inf is not a finite number"),
    "nan box": (["inpaint", "--prompt", "x", "--image", "{source}", "--mask-h-ratio", "nan"], "is not a finite"),
    "NaN in a batch file": (
        ["inpaint", "--image", "{source}", "--batch-file", "{nan_batch}"],
        "mask_w_ratio=nan is not a finite number",
    ),
    "Infinity in a batch file": (
        ["inpaint", "--image", "{source}", "--batch-file", "{inf_batch}"],
        "mask_h_ratio=inf is not a finite number",
    ),
    "negative seed": ([*T2I, "--seed", "-1"], "seed -1 is outside [0, 2^64 - 1]"),
    "seed past 2^64 - n": (["t2i", "--batch-file", "{two}", "--seed", str(2**64 - 1)], "outside [0, 2^64 - 2]"),
    "batch seed too large": (["t2i", "--batch-file", "{big_seed}"], f"seed {2**64} is outside"),
    "zero batch size": ([*T2I, "--batch-size", "0"], "--batch-size=0 must be at least 1"),
    "negative batch size": ([*T2I, "--batch-size", "-1"], "--batch-size=-1 must be at least 1"),
    "zero width": ([*T2I, "--width", "0"], "width of request 1 0 must be a positive number of pixels"),
    "negative height": ([*T2I, "--height", "-16"], "height of request 1 -16 must be a positive number of pixels"),
    "jpg output": ([*T2I, "--out", "x.jpg"], "x.jpg does not end in .png: outputs are PNG files"),
    "whitespace prompt": (["t2i", "--prompt", "   "], "prompt of request 1 is empty or whitespace only"),
    "whitespace question": (["understand", "--image", "{source}", "--question", " \t"], "whitespace only"),
    "unknown device": ([*T2I, "--device", "tpu"], "unknown device 'tpu': use auto, cpu, cuda, npu"),
    "batch file not UTF-8": (["t2i", "--batch-file", "{latin1}"], "is not UTF-8 text"),
    "batch file is a folder": (["t2i", "--batch-file", "{folder}"], "batch file {folder} is a folder: name a file"),
    "image is a folder": (["edit", "--prompt", "x", "--image", "{folder}"], "image {folder} is a folder: name a file"),
    "output parent is a file": ([*T2I, "--output", "{file}/x.png"], "{file} is a file, not a folder"),
    "output is a symlink loop": ([*T2I, "--output", "{loop}"], "is a symlink loop"),
    "image is a symlink loop": (["edit", "--prompt", "x", "--image", "{loop}"], "image {loop} is a symlink loop"),
    "answers parent is a file": (
        ["understand", "--image", "{source}", "--question", "q", "--output", "{file}/a.jsonl"],
        "is a file, not a folder",
    ),
    "unknown cache mode": (
        ["understand", "--image", "{source}", "--question", "q", "--kv-cache", "full"],
        "kv_cache='full' is not a cache mode: use one of none, prefix, dual",
    ),
    "threshold over 1": (
        ["understand", "--image", "{source}", "--question", "q", "--fast", "--parallel-threshold", "1.5"],
        "parallel_threshold=1.5 must be within (0, 1]",
    ),
    "cache mode in a batch file": (
        ["understand", "--image", "{source}", "--batch-file", "{cache_batch}"],
        "kv_cache='all' is not a cache mode",
    ),
    "decompression bomb": (EDIT, "more pixels than Pillow reads safely"),
    "negative image budget": ([*EDIT, "--image-budget", "-32"], "--image-budget=-32 must not be negative"),
    "output name too long": ([*T2I, "--output", "x" * 300 + ".png"], "is longer than 255 bytes"),
    "device file as image": (
        ["edit", "--prompt", "x", "--image", "/dev/zero"],
        "image /dev/zero is not a regular file (a device, pipe or socket)",
    ),
    # issue 24: sizes bounded by the length cap (8192 here) and numbers bounded, before an image is opened
    "image budget past the cap": ([*EDIT, "--image-budget", "4096"], "image_budget of request 1=4096 is over the max"),
    "answer past the cap": (
        ["understand", "--image", "{source}", "--question", "q", "--gen-length", "10240", "--block-length", "10240"],
        "gen_length of request 1=10240 is over the maximum of 8192",
    ),
    "max length past 2^20": ([*T2I, "--max-length", str(2**63 - 1)], f"--max-length={2**63 - 1} is over the maximum"),
    "steps past the cap": ([*T2I, "--timesteps", str(10**30)], f"timesteps of request 1={10**30} is over the maximum"),
    "guidance past its maximum": ([*T2I, "--cfg-scale", "1e300"], "cfg_scale=1e+300 is over the maximum of 10000"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_misuse_is_one_clear_error_before_any_work(case, cli, tmp_path, fixture_dir, monkeypatch):
    names = {
        "source": str(fixture_dir / "image_96x64.png"),
        "nan_batch": write_jsonl(tmp_path / "nan.jsonl", '{"prompt": "x", "mask_w_ratio": NaN}'),
        "inf_batch": write_jsonl(tmp_path / "inf.jsonl", '{"prompt": "x", "mask_h_ratio": Infinity}'),
        "two": write_jsonl(tmp_path / "two.jsonl", '{"prompt": "a"}', '{"prompt": "b"}'),
        "cache_batch": write_jsonl(tmp_path / "cache.jsonl", '{"question": "q", "kv_cache": "all"}'),
        "big_seed": write_jsonl(tmp_path / "seed.jsonl", json.dumps({"prompt": "a", "seed": 2**64})),
        "folder": str(tmp_path),
        "file": str(tmp_path / "plain.txt"),
        "loop": str(tmp_path / "loop.png"),
        "latin1": str(tmp_path / "latin1.jsonl"),
    }
    (tmp_path / "plain.txt").write_text("not a folder")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    if case == "decompression bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 96x64 source is then over twice the limit
    monkeypatch.setattr("dimoo_npu.pipeline.DiMOOPipeline.from_pretrained", None)  # loading would fail: type error
    before = sorted(os.listdir(tmp_path))
    argv, message = BAD[case]
    code, log = cli(*[arg.format(**names) for arg in argv])
    assert code == 2 and message.format(**names) in log, log
    assert log.count("ERROR") == 1 and "Traceback" not in log
    assert sorted(os.listdir(tmp_path)) == before, "nothing written"


def test_other_commands_share_the_flag_checks(cli):
    assert cli("eval", "shapes", "--limit", "-1")[0] == 2
    assert cli("eval", "shapes", "--cfg-scale", "nan")[0] == 2
    code, log = cli("pretokenize", "m.jsonl", "out", "--workers", "0")
    assert code == 2 and "--workers=0 must be at least 1" in log


def test_an_output_folder_that_cannot_be_written_is_refused_before_sampling(cli, tmp_path, monkeypatch):
    """A read-only mount: access(2) says so even to root, so it is simulated through os.access here."""
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: Path(path).resolve() != (tmp_path / "ro").resolve() and real_access(path, mode)
    )
    code, log = cli(*T2I, *SMALL, "--output", "ro/x.png")
    assert code == 2 and "ro is read-only or not yours: choose another folder" in log, log


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a chmod 0500 folder; see the test above")
def test_a_folder_without_write_permission_is_refused_before_sampling(cli, tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    code, log = cli(*T2I, *SMALL, "--output", "ro/x.png")
    assert code == 2 and "is read-only or not yours" in log, log


def test_a_batch_file_with_a_byte_order_mark_is_read(tmp_path):
    from dimoo_npu.batch.batch_requests import build_requests

    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "a red cat"}\n')
    assert build_requests("t2i", {}, str(tmp_path / "bom.jsonl"))[0].request.prompt == "a red cat"


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    from dimoo_npu.tokens.image_prep import load_image

    ramp = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    loaded = np.asarray(load_image(tmp_path / "deep.png"))
    assert loaded.shape == (48, 64, 3) and np.array_equal(loaded[..., 0], (ramp >> 8).astype(np.uint8))


def test_outputs_get_the_umask_mode_not_0600(cli, tmp_path):
    previous = os.umask(0o022)
    try:
        code, log = cli(*T2I, *SMALL, "--output", "cat.png")
    finally:
        os.umask(previous)
    assert code == 0, log
    assert stat.S_IMODE((tmp_path / "cat.png").stat().st_mode) == 0o644


def interrupt_while_writing(error: BaseException):
    """A PNG encoder that writes half a file, then meets ``error``."""

    def save(image, file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            Path(file).write_bytes(b"\x89PNG half")
        else:
            file.write(b"\x89PNG half")
        raise error

    return save


@pytest.mark.parametrize(
    "error, code, message",
    [
        (KeyboardInterrupt(), 130, "interrupted: no partial output was kept"),
        (OSError(errno.ENOSPC, "No space left on device"), 2, "No space left on device: free some space"),
        (OSError(errno.EROFS, "Read-only file system"), 2, "Read-only file system: the file system is read-only"),
        (RuntimeError("boom"), 1, "unexpected error RuntimeError: boom; the full traceback is in "),
    ],
    ids=["ctrl-c", "disk full", "read-only", "bug"],
)
def test_exit_codes_and_nothing_partial_left(error, code, message, cli, tmp_path, monkeypatch):
    monkeypatch.setattr(Image.Image, "save", interrupt_while_writing(error))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", None)
    got, log = cli(*T2I, *SMALL, "--output-dir", "out", "--batch-file", write_jsonl(tmp_path / "b.jsonl", "{}"))
    assert got == code and message in log, log
    assert log.count("ERROR") == 1 and "Traceback" not in log
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == [], "no temporary or partial file"
    if code == 1:
        trace = re.search(r"the full traceback is in (\S+) ", log).group(1)
        assert "Traceback" in open(trace).read() and "boom" in open(trace).read()


def test_a_base_exception_from_a_library_is_still_one_line(cli, monkeypatch):
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    def fail(args):
        raise CheckpointException("load failed", {0: (ValueError("shape"), None)})

    monkeypatch.setattr("dimoo_npu.commands.generate.run", fail)
    code, log = cli(*T2I)
    assert code == 1 and "unexpected error CheckpointException" in log and "Traceback" not in log


def test_debug_prints_the_traceback(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(Image.Image, "save", interrupt_while_writing(RuntimeError("boom")))
    monkeypatch.setenv("DIMOO_DEBUG", "1")
    code, log = cli(*T2I, *SMALL, "--output", "x.png")
    assert code == 1 and "Traceback" in log and "RuntimeError: boom" in log
