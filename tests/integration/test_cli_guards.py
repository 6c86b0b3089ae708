"""Issue 24 on the command line: every number bounded the same way on every surface (flags, environment, batch
files, YAML run configs and overrides), never formatted in full in a message; inputs that used to pass or end in a
traceback (exit 1) are one clear error (exit 2) before the work; a work folder is cleared only when the tool made it."""

from __future__ import annotations

import importlib.util
import json
import logging
import signal
from pathlib import Path

import pytest

from dimoo_npu.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "train" / "tiny_cpu.yaml"
HUGE = 2**63  # past every bound, and a value that used to hang text-to-image (a loop of ~sqrt(max length))


@pytest.fixture
def dimoo(caplog, tmp_path, monkeypatch):
    """Run ``dimoo`` in tmp_path with the model unloadable; returns (exit code, logged text). A run that would
    hang is stopped by an alarm and fails the test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("dimoo_npu.pipeline.DiMOOPipeline.from_pretrained", None)  # loading fails: exit 1

    def expired(*_):
        raise TimeoutError("the command ran past 60 s")

    previous = signal.signal(signal.SIGALRM, expired)

    def run(*argv: str) -> tuple[int, str]:
        caplog.clear()
        signal.alarm(60)
        try:
            with caplog.at_level(logging.INFO, logger="dimoo"):
                code = main(list(argv))
        finally:
            signal.alarm(0)
        return code, caplog.text

    yield run
    signal.signal(signal.SIGALRM, previous)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_a_huge_number_is_refused_the_same_way_on_every_surface(dimoo, tmp_path, monkeypatch):
    surfaces = {
        "flag": ["t2i", "--prompt", "x", "--max-length", str(HUGE)],
        "request flag": ["t2i", "--prompt", "x", "--timesteps", str(HUGE)],
        "batch file": [
            "t2i",
            "--batch-file",
            write(tmp_path / "b.jsonl", json.dumps({"prompt": "x", "timesteps": HUGE})),
        ],
        "run config": [
            "train",
            write(
                tmp_path / "c.yaml", TINY_CONFIG.read_text().replace("keep_checkpoints: 2", f"keep_checkpoints: {HUGE}")
            ),
            "--check",
        ],
        "override": ["train", str(TINY_CONFIG), f"train_iters={HUGE}", "--check"],
        "plan": ["plan", "sample", "--width", str(HUGE * 16)],
    }
    for surface, argv in surfaces.items():
        code, log = dimoo(*argv)
        assert code == 2 and "over the maximum" in log, (surface, log)
    monkeypatch.setenv("DIMOO_MAX_LENGTH", str(HUGE))
    code, log = dimoo("t2i", "--prompt", "x")
    assert code == 2 and f"DIMOO_MAX_LENGTH={HUGE} is over the maximum of 1048576" in log, log


@pytest.mark.parametrize("raw", ["abc", "-5", "0", "1e4", "12.5", "9" * 5000])
def test_the_length_cap_from_the_environment_is_parsed_with_bounds(dimoo, monkeypatch, raw):
    monkeypatch.setenv("DIMOO_MAX_LENGTH", raw)
    code, log = dimoo("t2i", "--prompt", "x")
    assert code == 2 and "DIMOO_MAX_LENGTH" in log and len(log) < 500, log


def test_messages_never_format_an_unbounded_value(dimoo, tmp_path):
    """A YAML alias bomb (a value of 10^6 items in a few lines) and a 10^5-digit number: short messages, fast."""
    levels = ["&a [" + ", ".join(["x"] * 10) + "]"]
    levels += [
        f"&{name} [" + ", ".join([f"*{previous}"] * 10) + "]" for previous, name in zip("abcde", "bcdef", strict=True)
    ]
    bomb = TINY_CONFIG.read_text().replace("output_dir: runs/tiny-cpu", f"output_dir: [{', '.join(levels)}]")
    code, log = dimoo("train", write(tmp_path / "bomb.yaml", bomb), "--check")
    assert code == 2 and "aliases" in log and len(log) < 500, log[:500]
    code, log = dimoo("train", str(TINY_CONFIG), "train_iters=" + "9" * 100_000, "--check")
    assert code == 2 and len(log) < 500, log[:500]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seq_length=[x", "override 'seq_length' is not valid YAML"),
        ("lr=!!python/name:os.system", "override 'lr' is not valid YAML"),
        ("lr=*x", "YAML aliases (*name) are not accepted"),
        ("data.seq_length=-2560", "data.seq_length=-2560 must be at least 1"),
        (
            "global_batch_size=" + "1" + "0" * 40,
            "gpt_args.global_batch_size=<a 133-bit integer> is over the maximum of",
        ),
    ],
)
@pytest.mark.parametrize("mode", ["--check", "--plan"])
def test_bad_run_config_values_exit_2_in_every_mode(dimoo, override, message, mode):
    code, log = dimoo("train", str(TINY_CONFIG), override, mode)
    assert code == 2 and message in log, log


def test_a_key_given_twice_is_refused_naming_it_and_its_line(dimoo, tmp_path):
    text = TINY_CONFIG.read_text() + "\ndata:\n  shards: elsewhere\n"
    first = 1 + next(i for i, line in enumerate(text.splitlines()) if line.startswith("data:"))
    last = len(text.splitlines()) - 1
    code, log = dimoo("train", write(tmp_path / "twice.yaml", text))
    assert code == 2 and f"line {last}: key 'data' is given twice (first on line {first})" in log, log


def test_a_lone_surrogate_in_a_prompt_is_refused(dimoo, tmp_path):
    batch = write(tmp_path / "s.jsonl", '{"prompt": "a \\ud800 cat"}\n')
    code, log = dimoo("t2i", "--batch-file", batch)
    assert code == 2 and "lone surrogate (U+D800) at character 2" in log, log


def test_a_folder_as_the_report_file_is_refused_before_the_run(dimoo, tmp_path, monkeypatch):
    monkeypatch.setattr("dimoo_npu.commands.doctor.run", None)  # the run must not start: calling None fails
    (tmp_path / "folder").mkdir()
    for argv in (["doctor", "--json", "folder"], ["eval", "shapes", "--output", "folder"]):
        code, log = dimoo(*argv)
        assert code == 2 and "folder is a folder: name a file" in log, (argv, log)


def test_plan_refuses_a_negative_guidance_scale(dimoo):
    code, log = dimoo("plan", "sample", "--cfg-scale", "-1")
    assert code == 2 and "guidance scales cannot be negative" in log, log


@pytest.fixture
def train_embedded(monkeypatch):
    """scripts/train_embedded.py as a module, its first stage replaced by a marker (no training here)."""
    spec = importlib.util.spec_from_file_location("train_embedded", REPO / "scripts" / "train_embedded.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def stage(*args):
        raise RuntimeError("reached the VQ stage")

    monkeypatch.setattr(script, "train_vq_stage", stage)
    return script


@pytest.mark.parametrize("bad", [["--threads", "0"], ["--mix-scale", "nan"], ["--workers", "-1"], ["--vq-steps", "0"]])
def test_train_embedded_checks_every_argument_before_deleting_anything(train_embedded, tmp_path, bad):
    work = tmp_path / "checkout"
    work.mkdir()
    (work / "precious.txt").write_text("the user's")
    with pytest.raises(SystemExit) as stopped:
        train_embedded.main(["--work", str(work), "--fresh", "--no-install", *bad])
    assert stopped.value.code == 2 and (work / "precious.txt").read_text() == "the user's"


def test_train_embedded_clears_only_a_folder_it_made(train_embedded, tmp_path):
    foreign = tmp_path / "checkout"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("the user's")
    assert train_embedded.main(["--work", str(foreign), "--fresh", "--no-install"]) == 2
    assert (foreign / "precious.txt").read_text() == "the user's"
    assert train_embedded.main(["--work", write(tmp_path / "a-file", "x"), "--no-install"]) == 2
    ours = tmp_path / "work"
    with pytest.raises(RuntimeError, match="reached the VQ stage"):
        train_embedded.main(["--work", str(ours), "--no-install"])
    (ours / "stale.txt").write_text("from the last run")
    with pytest.raises(RuntimeError, match="reached the VQ stage"):
        train_embedded.main(["--work", str(ours), "--fresh", "--no-install"])
    assert not (ours / "stale.txt").exists() and (ours / train_embedded.MARKER).is_file()


def test_pretokenize_bounds_its_budget_and_answers_by_its_max_length(dimoo):
    from dimoo_npu.shapes.embedded import EMBEDDED_CHECKPOINT

    common = ["pretokenize", "m.jsonl", "out", "--checkpoint", str(EMBEDDED_CHECKPOINT), "--max-length", "256"]
    code, log = dimoo(*common, "--image-budget", "4096")
    assert code == 2 and "--image-budget=4096 is over the maximum of 224 for --max-length 256" in log, log
    code, log = dimoo(*common, "--answer-length", "300")
    assert code == 2 and "--answer-length=300 is over the maximum of 256" in log, log
