"""``--resume`` of batch runs on the tiny fixture checkpoint: a rank killed part-way (some outputs written, a
temporary file left, a torn file) and a relaunch at another world size do every request exactly once; outputs
made otherwise are refused naming the field."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from dimoo_npu.cli import main
from dimoo_npu.files.outputs import read_png_text

SIZE = ["--device", "cpu", "--timesteps", "2", "--width", "16", "--height", "16", "--batch-size", "2"]
UNDERSTAND = ["--device", "cpu", "--gen-length", "4", "--block-length", "4", "--steps", "2", "--image-budget", "32"]


@pytest.fixture
def dimoo(checkpoint, caplog, monkeypatch):
    """Run ``dimoo`` in-process as rank RANK of WORLD (a torchrun process without a process group)."""

    def run(*argv: str, rank: int = 0, world: int = 1, ckpt=checkpoint) -> tuple[int, str]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dimoo"):
            code = main([*argv, "--checkpoint", str(ckpt)])
        return code, caplog.text

    return run


def t2i_batch(tmp_path, count: int = 5) -> str:
    path = tmp_path / "batch.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"a red cat {i}", "output": f"{i}.png"}) + "\n" for i in range(count))
    )
    return str(path)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_killed_rank_then_resume_at_another_world_size(dimoo, tmp_path):
    batch = t2i_batch(tmp_path)
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert dimoo("t2i", *SIZE, "--batch-file", batch, "--output-dir", str(reference))[0] == 0
    # Rank 0 of 2 finished (requests 0, 2, 4); rank 1 was killed: request 1 torn, a temporary file of request 3.
    assert dimoo("t2i", *SIZE, "--batch-file", batch, "--output-dir", str(out), rank=0, world=2)[0] == 0
    (out / "1.png").write_bytes((reference / "1.png").read_bytes()[:60])
    (out / ".3.png.tmp-x1y2z3.png").write_bytes(b"half a png")
    before = {name: (out / name).stat().st_mtime_ns for name in ("0.png", "2.png", "4.png")}

    code, log = dimoo("t2i", *SIZE, "--batch-file", batch, "--output-dir", str(out), "--resume")
    assert code == 0, log
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "2.png", "3.png", "4.png"]
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before  # skipped, not rewritten
    for name in ("1.png", "3.png"):
        assert np.array_equal(pixels(out / name), pixels(reference / name))
    assert "1.png is unreadable" in log and "rank 0 of 1: 2 done, 3 skipped, 0 failed" in log
    assert "ETA" in log

    code, log = dimoo("t2i", *SIZE, "--batch-file", batch, "--output-dir", str(out), "--resume")
    assert code == 0 and "rank 0 of 1: 0 done, 5 skipped, 0 failed" in log


def test_resume_refuses_other_settings_and_checkpoints(dimoo, tmp_path, checkpoint):
    batch = t2i_batch(tmp_path, count=1)
    out = str(tmp_path / "out")
    assert dimoo("t2i", *SIZE, "--batch-file", batch, "--output-dir", out)[0] == 0
    code, log = dimoo("t2i", *SIZE, "--cfg-scale", "1.5", "--batch-file", batch, "--output-dir", out, "--resume")
    assert code == 2 and "differs in cfg_scale (made with 4.0, this run asks for 1.5)" in log
    other = tmp_path / "other-ckpt"
    shutil.copytree(checkpoint, other)
    code, log = dimoo("t2i", *SIZE, "--batch-file", batch, "--output-dir", out, "--resume", ckpt=other)
    assert code == 2 and "differs in checkpoint" in log and str(other) in log
    Image.new("RGB", (16, 16)).save(tmp_path / "out" / "0.png")  # someone else's picture
    code, log = dimoo("t2i", *SIZE, "--batch-file", batch, "--output-dir", out, "--resume")
    assert code == 2 and "not written by dimoo" in log


def test_resume_misuse(dimoo, tmp_path, capsys):
    with pytest.raises(SystemExit):
        dimoo("t2i", *SIZE, "--batch-file", t2i_batch(tmp_path), "--resume", "--overwrite")
    assert "not allowed with argument" in capsys.readouterr().err
    code, log = dimoo("t2i", *SIZE, "--prompt", "a cat", "--resume")
    assert code == 2 and "--resume continues a --batch-file run" in log
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "what is in the picture ?", "image": "x.png"}\n')
    code, log = dimoo("understand", *UNDERSTAND, "--batch-file", str(questions), "--resume")
    assert code == 2 and "--resume reads the answers an earlier run wrote: pass its --output file" in log


def rows(*paths) -> list[dict]:
    """The complete rows (a torn last line left by a kill is not one)."""
    return [json.loads(line) for path in paths for line in path.read_text().split("\n")[:-1]]


def test_understanding_answers_resume_from_rank_files(dimoo, tmp_path, fixture_dir):
    image = str(fixture_dir / "image_96x64.png")
    batch = tmp_path / "q.jsonl"
    batch.write_text("".join(json.dumps({"question": f"what is in the picture {i} ?"}) + "\n" for i in range(5)))
    answers = tmp_path / "answers.jsonl"
    args = ["understand", *UNDERSTAND, "--image", image, "--batch-file", str(batch), "--output", str(answers)]
    dimoo(*args, "--batch-size", "1", rank=1, world=2)  # answers 1 and 3, appended one batch at a time
    rank_file = tmp_path / "answers.rank1-of-2.jsonl"
    assert [row["index"] for row in rows(rank_file)] == [1, 3]
    with rank_file.open("a") as file:
        file.write('{"index": 0, "answ')  # killed while appending request 0's row (torn line)

    code, log = dimoo(*args, "--resume")
    done, failed = map(int, re.search(r"rank 0 of 1: (\d+) done, 2 skipped, (\d+) failed", log).groups())
    assert done + failed == 3  # a random model's answer may decode to nothing: a failed row
    indices = sorted(row["index"] for row in rows(answers, rank_file))
    assert indices == [0, 1, 2, 3, 4]  # each once
    code, log = dimoo(*args, "--resume", "--steps", "4")
    assert code == 2 and "differs in steps (made with 2, this run asks for 4)" in log


def launch(checkpoint, batch: str, out, world: int, *extra: str) -> list:
    """``world`` processes as torchrun starts them (RANK / WORLD_SIZE, no process group)."""
    command = [
        sys.executable,
        "-m",
        "dimoo_npu.cli",
        "t2i",
        *SIZE,
        "--batch-size",
        "1",
        "--checkpoint",
        str(checkpoint),
    ]
    command += ["--batch-file", batch, "--output-dir", str(out), *extra]
    env = {**os.environ, "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
    return [
        subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]


@pytest.mark.slow  # five interpreter starts with torch: about a minute on 2 busy cores
def test_kill_9_of_a_rank_then_relaunch_on_three(checkpoint, tmp_path):
    batch, out = t2i_batch(tmp_path, count=8), tmp_path / "out"
    ranks = launch(checkpoint, batch, out, 2)
    deadline = time.monotonic() + 300
    while not (out / "1.png").exists() and ranks[1].poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    ranks[1].send_signal(signal.SIGKILL)  # as soon as it wrote its first output (requests 1, 3, 5, 7 are its)
    ranks[0].communicate(timeout=300)
    ranks[1].communicate(timeout=60)
    assert ranks[0].returncode == 0 and ranks[1].returncode == -signal.SIGKILL
    before = {p.name for p in out.glob("*.png")}
    assert {"0.png", "1.png", "2.png", "4.png", "6.png"} <= before

    relaunch = launch(checkpoint, batch, out, 3, "--resume")
    logs = [process.communicate(timeout=300)[1] for process in relaunch]
    assert [process.returncode for process in relaunch] == [0, 0, 0], logs
    counts = [re.search(r"rank \d of 3: (\d+) done, (\d+) skipped, 0 failed", log).groups() for log in logs]
    assert sum(int(done) for done, _ in counts) == 8 - len(before)  # each missing request made once
    assert sum(int(skipped) for _, skipped in counts) == len(before)  # and none made twice
    assert sorted(p.name for p in out.iterdir()) == [f"{i}.png" for i in range(8)]  # no temporary file left
    assert [read_png_text(out / f"{i}.png")["seed"] for i in range(8)] == [str(i) for i in range(8)]
