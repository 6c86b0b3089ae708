"""The generation commands end to end on the tiny fixture checkpoint (random weights: images are noise,
so shapes, files, metadata and determinism are what is checked), plus one clear error per bad input."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dimoo_npu.cli import main
from dimoo_npu.files.outputs import read_png_text

FAST = ["--device", "cpu", "--timesteps", "2"]


@pytest.fixture(scope="module")
def source(fixture_dir):
    return str(fixture_dir / "image_96x64.png")


@pytest.fixture
def cli(checkpoint, caplog):
    """Run ``dimoo`` in-process; returns (exit code, logged text)."""

    def run(*argv: str, with_checkpoint: bool = True) -> tuple[int, str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dimoo"):
            code = main([*argv, *(["--checkpoint", str(checkpoint)] if with_checkpoint else [])])
        return code, caplog.text

    return run


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_t2i_batch_metadata_and_determinism(cli, tmp_path):
    batch = write_jsonl(
        tmp_path / "batch.jsonl",
        [
            {"prompt": "a red cat", "output": "cat.png", "seed": 3},
            {"prompt": "a mat", "width": 32, "height": 16, "output": "mat.png"},
            {"prompt": "a red mat", "output": "red_mat.png"},
        ],
    )
    out = tmp_path / "out"
    code, _ = cli(
        "t2i",
        *FAST,
        "--batch-file",
        batch,
        "--output-dir",
        str(out),
        "--width",
        "48",
        "--height",
        "32",
        "--seed",
        "10",
        "--batch-size",
        "3",
        "--cfg-scale",
        "2.0",
    )
    assert code == 0
    assert Image.open(out / "cat.png").size == (48, 32) and Image.open(out / "mat.png").size == (32, 16)
    meta = read_png_text(out / "red_mat.png")
    settings = json.loads(meta["settings"])
    assert meta["prompt"] == "a red mat" and meta["seed"] == "12" and meta["task"] == "t2i"
    assert (settings["width"], settings["height"], settings["timesteps"], settings["cfg_scale"]) == (48, 32, 2, 2.0)
    # the same request alone, with its seed, gives the same image as inside the batch of three
    code, _ = cli(
        "t2i",
        *FAST,
        "--prompt",
        "a red mat",
        "--width",
        "48",
        "--height",
        "32",
        "--seed",
        "12",
        "--cfg-scale",
        "2.0",
        "--output",
        str(tmp_path / "alone.png"),
    )
    assert code == 0 and np.array_equal(pixels(tmp_path / "alone.png"), pixels(out / "red_mat.png"))
    assert not np.array_equal(pixels(out / "cat.png")[:, :32], pixels(tmp_path / "alone.png")[:, :32])


def test_t2i_with_cache(cli, tmp_path):
    code, _ = cli(
        "t2i",
        "--device",
        "cpu",
        "--timesteps",
        "6",
        "--use-cache",
        "--refresh-interval",
        "2",
        "--prompt",
        "a cat",
        "--width",
        "32",
        "--height",
        "32",
        "--output",
        str(tmp_path / "c.png"),
    )
    assert code == 0 and json.loads(read_png_text(tmp_path / "c.png")["settings"])["use_cache"] is True


def test_edit_every_family(cli, tmp_path, source):
    types = ["edit_add", "canny_control", "depth_pred", "subject_driven", "image_ref_transfer", "multi_view_left"]
    rows = [{"edit_type": name, "output": f"{name}.png"} for name in types]
    rows[-2]["ref_image"] = source
    batch = write_jsonl(tmp_path / "edits.jsonl", rows)
    code, _ = cli(
        "edit",
        *FAST,
        "--batch-file",
        batch,
        "--image",
        source,
        "--prompt",
        "a red cat",
        "--image-budget",
        "64",
        "--output-dir",
        str(tmp_path),
    )
    assert code == 0
    for name in types:
        meta = read_png_text(tmp_path / f"{name}.png")
        assert Image.open(tmp_path / f"{name}.png").size == (64, 32)  # 96x64 -> closest 64-budget bucket
        assert json.loads(meta["settings"])["edit_type"] == name and json.loads(meta["settings"])["cfg_img"] == 4.0


def test_inpaint_box_and_mask_and_outpaint(cli, tmp_path, source):
    mask = Image.new("L", (96, 64))
    mask.paste(255, (0, 0, 32, 32))
    mask.save(tmp_path / "mask.png")
    for task, extra in [("inpaint", []), ("inpaint", ["--mask", str(tmp_path / "mask.png")]), ("outpaint", [])]:
        target = tmp_path / f"{task}{len(extra)}.png"
        code, _ = cli(task, *FAST, "--image", source, "--prompt", "a cat", "--output", str(target), *extra)
        assert code == 0 and Image.open(target).size == (96, 64)
    settings = json.loads(read_png_text(tmp_path / "outpaint0.png")["settings"])
    assert (settings["mask_h_ratio"], settings["mask_w_ratio"]) == (1.0, 0.2)
    assert "mask" in json.loads(read_png_text(tmp_path / "inpaint2.png")["settings"])


def test_understand(cli, tmp_path, source, capsys):
    args = ["--device", "cpu", "--gen-length", "8", "--block-length", "4", "--steps", "4", "--image-budget", "64"]
    batch = write_jsonl(tmp_path / "q.jsonl", [{"question": "what is in the picture ?"}, {"prompt": "a cat ?"}])
    answers = tmp_path / "answers.jsonl"
    code, _ = cli("understand", *args, "--batch-file", batch, "--image", source, "--output", str(answers))
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [row["index"] for row in rows] == [0, 1] and all(isinstance(row["answer"], str) for row in rows)
    # A random model's answer may decode to nothing: that row carries an error and the run exits 1.
    assert code == (1 if any(not row["answer"] for row in rows) else 0)
    assert all(("error" in row) == (not row["answer"]) for row in rows)
    capsys.readouterr()
    code, _ = cli("understand", *args, "--image", source, "--question", "what is in the picture ?")
    answer = rows[0]["answer"]
    assert (code, capsys.readouterr().out) == ((0, answer + "\n") if answer else (1, ""))


def test_two_ranks_share_the_batch(checkpoint, tmp_path):
    """Two processes as torchrun starts them (RANK / WORLD_SIZE set, no process group): every request once."""
    batch = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"cat {i}", "output": f"{i}.png"} for i in range(3)])
    command = [
        sys.executable,
        "-m",
        "dimoo_npu.cli",
        "t2i",
        *FAST,
        "--checkpoint",
        str(checkpoint),
        "--width",
        "16",
        "--height",
        "16",
        "--batch-file",
        batch,
        "--output-dir",
        str(tmp_path / "out"),
    ]
    env = {**os.environ, "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    logs = [process.communicate(timeout=120)[1] for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0], logs
    assert "2 on rank 0 of 2" in logs[0] and "1 on rank 1 of 2" in logs[1]
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert written == ["0.png", "1.png", "2.png"]
    assert [read_png_text(tmp_path / "out" / name)["seed"] for name in written] == ["0", "1", "2"]


@pytest.fixture(scope="module")
def broken_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return str(path)


BAD_INPUTS = {
    "size not a multiple of 16": (
        ["t2i", "--prompt", "a cat", "--width", "1000"],
        "width 1000 is not a multiple of 16 pixels: use 992 or 1008",
    ),
    "prompt does not fit": (
        ["t2i", "--prompt", "cat " * 9000, "--width", "16", "--height", "16"],
        "more than the cap of 8192: shorten the prompt",
    ),
    "image does not fit": (
        ["t2i", "--prompt", "a cat", "--width", "2048", "--height", "2048"],
        "a 2048x2048 image of request 1 (the largest square under this cap is 1424x1424) needs at least 16516 tokens",
    ),
    "image does not fit a lowered cap": (
        ["t2i", "--prompt", "a cat", "--max-length", "4096"],
        "a 1024x1024 image of request 1 (the largest square under this cap is 1008x1008) needs at least 4164 tokens",
    ),
    "missing image": (["edit", "--image", "nowhere.png", "--prompt", "x"], "image nowhere.png does not exist"),
    "unreadable image": (["edit", "--image", "{broken}", "--prompt", "x"], "cannot read image"),
    "mask of the wrong size": (
        ["inpaint", "--image", "{source}", "--prompt", "x", "--mask", "{small}"],
        "mask is 32x32 but the image is 96x64",
    ),
    "unknown edit type": (
        ["edit", "--image", "{source}", "--prompt", "x", "--edit-type", "sketch"],
        "unknown edit type 'sketch'",
    ),
    "style transfer without reference": (
        ["edit", "--image", "{source}", "--edit-type", "image_ref_transfer"],
        "needs a style reference image",
    ),
    "negative guidance": (["t2i", "--prompt", "a cat", "--cfg-scale", "-1"], "guidance scales cannot be negative"),
    "negative image guidance": (
        ["edit", "--image", "{source}", "--prompt", "x", "--cfg-img", "-0.5"],
        "cannot be negative",
    ),
    "zero steps": (["t2i", "--prompt", "a cat", "--timesteps", "0"], "at least 1 step"),
    "zero understanding steps": (
        ["understand", "--image", "{source}", "--question", "q", "--steps", "0"],
        "at least 1 step",
    ),
    "output exists": (["t2i", "--prompt", "a cat", "--output", "{existing}"], "already exists: pass --overwrite"),
    "unknown batch field": (["t2i", "--batch-file", "{bad_batch}"], "unknown field(s) colour"),
    "batch field of the wrong type": (["t2i", "--batch-file", "{typed_batch}"], "width must be an integer, not 'wide'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_one_clear_error(case, cli, tmp_path, source, broken_image, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, but if it were, it lands here
    argv, message = BAD_INPUTS[case]
    Image.new("L", (32, 32)).save(tmp_path / "small.png")
    (tmp_path / "existing.png").write_bytes(b"keep me")
    bad_batch = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a cat", "colour": "red"}])
    typed_batch = write_jsonl(tmp_path / "typed.jsonl", [{"prompt": "a cat", "width": "wide"}])
    names = {
        "source": source,
        "broken": broken_image,
        "small": str(tmp_path / "small.png"),
        "existing": str(tmp_path / "existing.png"),
        "bad_batch": bad_batch,
        "typed_batch": typed_batch,
    }
    code, log = cli(*[arg.format(**names) for arg in argv], "--device", "cpu")
    assert code == 2 and message in log, log
    assert log.count("ERROR") == 1 and "Traceback" not in log
    assert (tmp_path / "existing.png").read_bytes() == b"keep me"


@pytest.mark.parametrize("size", [None, (1536, 768), (768, 1536)])
def test_public_sizes_run_past_max_sequence_length(size, cli, tmp_path):
    """config.json says 4096 tokens; 1024 x 1024 (the default without generation_defaults, run with CFG and
    ML-Cache), 1536 x 768 and 768 x 1536 (without, to keep the suite short) need more: each runs, with one warning
    naming both numbers."""
    target = tmp_path / "big.png"
    flags = ["--width", str(size[0]), "--height", str(size[1]), "--cfg-scale", "0"] if size else ["--use-cache"]
    code, log = cli("t2i", *FAST, "--prompt", "a red cat", *flags, "--output", str(target))
    assert code == 0, log
    assert Image.open(target).size == (size or (1024, 1024))
    assert log.count("longer than the 4096 the checkpoint names as its max_sequence_length") == 1


def test_overwrite_replaces_an_existing_output(cli, tmp_path):
    target = tmp_path / "x.png"
    target.write_bytes(b"old")
    code, _ = cli(
        "t2i", *FAST, "--prompt", "a cat", "--width", "16", "--height", "16", "--output", str(target), "--overwrite"
    )
    assert code == 0 and read_png_text(target)["prompt"] == "a cat"


def test_unknown_task_and_missing_checkpoint(cli, capsys, checkpoint_dir, source, monkeypatch, tmp_path):
    with pytest.raises(SystemExit):
        main(["paint", "--prompt", "x"])
    assert "invalid choice: 'paint'" in capsys.readouterr().err
    monkeypatch.setattr("dimoo_npu.shapes.embedded.EMBEDDED_CHECKPOINT", tmp_path / "not-installed")
    code, log = cli("t2i", "--prompt", "a cat", "--device", "cpu", with_checkpoint=False)
    assert code == 2 and "the bundled model is missing" in log and "pass --checkpoint PATH" in log
    code, log = cli(
        "t2i", "--prompt", "a cat", "--device", "cpu", "--checkpoint", str(checkpoint_dir), with_checkpoint=False
    )
    assert code == 2 and "has no text tokenizer" in log


def test_answers_file_per_rank():
    from dimoo_npu.commands.generate_run import answers_path

    assert answers_path("out/answers.jsonl", 0, 1).name == "answers.jsonl"
    assert answers_path("out/answers.jsonl", 1, 2).name == "answers.rank1-of-2.jsonl"
    assert answers_path(None, 0, 2) is None


def test_mixed_sizes_run_full_batches_with_per_line_settings(cli, tmp_path, monkeypatch):
    """--batch-size counts requests per forward after grouping by grid and settings (mixed sizes used to be
    split first, then grouped: four forwards of one here); a line may set its own sampling settings."""
    import dimoo_npu.sampling

    sampled = dimoo_npu.sampling.sample_image
    calls = []

    def counting(model, prompt_ids, **kwargs):
        calls.append((len(prompt_ids), kwargs["timesteps"]))
        return sampled(model, prompt_ids, **kwargs)

    monkeypatch.setattr(dimoo_npu.sampling, "sample_image", counting)
    sizes = [(16, 16), (32, 16)] * 2
    rows = [{"prompt": "a cat", "width": w, "height": h, "output": f"{i}.png"} for i, (w, h) in enumerate(sizes)]
    rows.append({"prompt": "a mat", "width": 16, "height": 16, "output": "slow.png", "timesteps": 3})
    batch = write_jsonl(tmp_path / "mixed.jsonl", rows)
    code, log = cli("t2i", *FAST, "--batch-file", batch, "--batch-size", "2", "--output-dir", str(tmp_path))
    assert code == 0, log
    assert sorted(calls) == [(1, 3), (2, 2), (2, 2)]
    assert json.loads(read_png_text(tmp_path / "slow.png")["settings"])["timesteps"] == 3


def test_compile_flag_puts_the_loaded_model_in_graph_mode(cli, tmp_path, monkeypatch):
    """--compile reaches the model the command samples with (inductor itself is exercised in test_graph_mode)."""
    compiled = []
    monkeypatch.setattr("dimoo_npu.sampling.graph.compile_forward", lambda model, backend=None: compiled.append(model))
    target = tmp_path / "graph.png"
    code, log = cli("t2i", *FAST, "--prompt", "a cat", "--width", "16", "--height", "16", "--output", str(target))
    assert code == 0 and not compiled, log
    code, log = cli("t2i", *FAST, "--prompt", "a cat", "--width", "16", "--height", "16", "--compile", "--overwrite",
                    "--output", str(target))  # fmt: skip
    assert code == 0 and len(compiled) == 1, log
