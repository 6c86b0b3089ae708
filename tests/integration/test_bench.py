"""``dimoo bench geneval|dpg`` on the tiny fixture checkpoint and the hand-written prompt samples under
tests/fixtures/bench: the evaluators' layouts, resuming a killed run, and refusals (nothing written)."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from dimoo_npu.batch.prompt_sets import read_geneval
from dimoo_npu.cli import build_parser, main
from dimoo_npu.commands.bench import sample_requests
from dimoo_npu.files.outputs import read_png_text

TINY = ["--preset", "checkpoint", "--device", "cpu", "--timesteps", "2", "--width", "16", "--height", "16"]


@pytest.fixture(scope="module")
def prompts(fixture_dir):
    return fixture_dir.parent / "bench"


@pytest.fixture
def bench(checkpoint, caplog):
    def run(*argv: str, ckpt=checkpoint) -> tuple[int, str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dimoo"):
            code = main(["bench", *argv, "--checkpoint", str(ckpt)])
        return code, caplog.text

    return run


def test_geneval_layout_and_resume(bench, prompts, tmp_path):
    out = tmp_path / "geneval"
    geneval = str(prompts / "geneval_metadata.jsonl")
    args = ["geneval", geneval, "--output-dir", str(out), *TINY, "--samples", "2", "--seed", "7"]
    assert bench(*args)[0] == 0
    lines = (prompts / "geneval_metadata.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):
        with (out / f"{i:05d}" / "metadata.jsonl").open() as file:
            assert json.load(file) == json.loads(line)  # the evaluator reads it with json.load
        assert sorted(p.name for p in (out / f"{i:05d}" / "samples").iterdir()) == ["0000.png", "0001.png"]
        assert [read_png_text(out / f"{i:05d}/samples/{j:04d}.png")["seed"] for j in (0, 1)] == [
            str(7 + 2 * i),
            str(8 + 2 * i),
        ]
    assert bench(*args)[0] == 2  # a second run refuses the folder without --resume or --overwrite

    # Killed part-way: one sample and one metadata file missing, a temporary file left.
    kept = out / "00000" / "samples" / "0000.png"
    stamp = kept.stat().st_mtime_ns
    reference = np.asarray(Image.open(out / "00002/samples/0001.png"))
    (out / "00002/samples/0001.png").unlink()
    (out / "00002/metadata.jsonl").unlink()
    (out / "00002/samples/.0001.png.tmp-abcdef.png").write_bytes(b"torn")
    code, log = bench(*args, "--resume")
    assert code == 0 and "1 done, 5 skipped, 0 failed" in log
    assert np.array_equal(np.asarray(Image.open(out / "00002/samples/0001.png")), reference)
    assert (out / "00002/metadata.jsonl").exists() and kept.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (out / "00002" / "samples").iterdir()) == ["0000.png", "0001.png"]

    # Another benchmark, checkpoint or setting: refused, naming what differs.
    code, log = bench("dpg", str(prompts / "dpg_prompts"), "--output-dir", str(out), *TINY, "--resume")
    assert code == 2 and "made with another benchmark (made with geneval, this run asks for dpg)" in log
    code, log = bench(*args, "--resume", "--cfg-scale", "1.0")
    assert code == 2 and "differs in cfg_scale" in log


def test_dpg_grid_and_resume(bench, prompts, tmp_path, checkpoint):
    out = tmp_path / "dpg"
    args = ["dpg", str(prompts / "dpg_prompts"), "--output-dir", str(out), *TINY]
    assert bench(*args)[0] == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["coco3.png", "partiprompts12.png"]
    grid = np.asarray(Image.open(out / "coco3.png").convert("RGB"))
    assert grid.shape == (32, 32, 3)
    for k in range(4):
        sample = np.asarray(Image.open(out / ".samples" / "coco3" / f"{k}.png").convert("RGB"))
        row, col = divmod(k, 2)
        assert np.array_equal(grid[16 * row : 16 * row + 16, 16 * col : 16 * col + 16], sample)
    meta = read_png_text(out / "coco3.png")
    assert meta["prompt"].startswith("A wooden table") and len(json.loads(meta["seeds"])) == 4

    shutil.rmtree(out / ".samples")  # finished grids are skipped whole on resume
    (out / "partiprompts12.png").unlink()
    code, log = bench(*args, "--resume")
    assert code == 0 and "1 of 2 grid(s) already done" in log and (out / "partiprompts12.png").exists()

    other = tmp_path / "other-ckpt"
    shutil.copytree(checkpoint, other)
    code, log = bench(*args, "--resume", ckpt=other)
    assert code == 2 and "made with another checkpoint" in log


def test_ranks_take_whole_prompts(bench, prompts, tmp_path, monkeypatch):
    """Under torchrun (RANK / WORLD_SIZE) each rank samples and grids whole prompts: together every grid once."""
    out = tmp_path / "dpg"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        code, log = bench("dpg", str(prompts / "dpg_prompts"), "--output-dir", str(out), *TINY)
        assert code == 0 and f"rank {rank} of 2: 4 done, 0 skipped, 0 failed" in log
        assert (out / ("partiprompts12.png" if rank else "coco3.png")).exists()
    assert sorted(p.name for p in out.glob("*.png")) == ["coco3.png", "partiprompts12.png"]


BAD_FORMATS = {
    "geneval: plain text": ("geneval", "p.txt", {"p.txt": "a cat\na dog\n"}, "p.txt:1 is not valid JSON"),
    "geneval: no tag": (
        "geneval",
        "m.jsonl",
        {"m.jsonl": '{"tag": "x", "prompt": "a"}\n{"prompt": "b"}\n'},
        "m.jsonl:2 has no tag",
    ),
    "geneval: a folder": ("geneval", "dpg", {"dpg/a.txt": "a cat\n"}, "is a folder"),
    "dpg: a file": ("dpg", "m.jsonl", {"m.jsonl": '{"tag": "x", "prompt": "a"}\n'}, "is not a folder"),
    "dpg: two prompts": ("dpg", "dpg", {"dpg/a.txt": "a cat\n\na dog\n"}, "a.txt:3 is a second prompt"),
    "dpg: empty": ("dpg", "dpg", {"dpg/a.txt": "  \n"}, "a.txt:1 is empty"),
    "dpg: no txt": ("dpg", "dpg", {"dpg/a.json": "{}"}, "holds no .txt files"),
}


@pytest.mark.parametrize("case", BAD_FORMATS.values(), ids=BAD_FORMATS)
def test_wrong_prompt_format_writes_nothing(bench, tmp_path, case):
    benchmark, given, files, message = case
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    out = tmp_path / "out"
    code, log = bench(benchmark, str(tmp_path / given), "--output-dir", str(out), *TINY)
    assert code == 2 and message in log
    assert not out.exists()


def test_lumina_dimoo_preset_is_the_public_scripts(prompts, checkpoint_dir):
    geneval = prompts / "geneval_metadata.jsonl"
    args = build_parser().parse_args(["bench", "geneval", str(geneval), "--output-dir", "x"])
    args.checkpoint = str(checkpoint_dir)  # its generation_defaults (small sizes) lie under the preset
    requests = sample_requests(args, read_geneval(geneval), 4)
    assert len(requests) == 12 and [item.index for item in requests] == list(range(12))
    r = requests[5].request
    assert (r.width, r.height, r.timesteps, r.cfg_scale) == (1024, 1024, 64, 4.0)
    assert (r.temperature, r.use_cache) == (1.0, False)
    assert [item.request.seed for item in requests[:2]] == [65513, 65514]
    assert r.output == "00001/samples/0001.png"
