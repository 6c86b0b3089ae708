"""The README's fine-tuning walk-through, every CPU-runnable line as written, the bundled model standing in for
the real checkpoint. The cluster lines run only as far as --check / --plan: a stand-in `torchrun` fails the test
if the launcher ever reaches it, so nothing contacts the example address."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dimoo_npu.shapes.embedded import EMBEDDED_CHECKPOINT

ROOT = Path(__file__).resolve().parents[2]
REAL_CHECKPOINT = "/data/models/Lumina-DiMOO"
BUNDLED = "dimoo_npu/assets/shapes-dimoo"

pytestmark = pytest.mark.skipif(
    not (EMBEDDED_CHECKPOINT / "model.safetensors").is_file(), reason="the bundled model's weights are not installed"
)


def walkthrough_blocks() -> list[list[str]]:
    """The bash blocks of the README's fine-tuning section: their command lines, comments and blanks dropped."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Fine-tuning: from a manifest to an exported checkpoint")[1].split("\n#")[0]
    blocks = [part.split("```")[0] for part in section.split("```bash\n")[1:]]
    return [[line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
            for block in blocks]  # fmt: skip


@pytest.fixture
def repo_like(tmp_path: Path) -> Path:
    """A working folder that looks like the repository root (configs/, scripts/, the bundled model) and a PATH
    whose `torchrun` fails loudly."""
    for name in ("configs", "scripts", "dimoo_npu"):
        (tmp_path / name).symlink_to(ROOT / name)
    bin_dir = tmp_path / "stand-in-bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text("#!/bin/sh\necho 'torchrun reached: a job was started' >&2\nexit 99\n")
    (bin_dir / "torchrun").chmod(0o755)
    return tmp_path


@pytest.fixture
def run(repo_like, monkeypatch, capsys):
    """Run one README line in the repository-like folder: `dimoo ...` in this process (its flags and leading
    VAR=value assignments as bash would pass them: no interpreter start per line), anything else through bash."""
    from dimoo_npu.cli import main

    path = os.pathsep.join([str(repo_like / "stand-in-bin"), str(Path(sys.executable).parent), os.environ["PATH"]])

    def run_line(line: str) -> str:
        words = shlex.split(line, comments=True)
        assignments = words[: next(i for i, w in enumerate(words) if "=" not in w)]
        if words[len(assignments)] != "dimoo":
            env = {**os.environ, "PATH": path}
            done = subprocess.run(["bash", "-c", line], cwd=repo_like, env=env, capture_output=True, text=True)
            assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            return done.stdout + done.stderr
        with monkeypatch.context() as scoped:
            scoped.chdir(repo_like)
            for name, _, value in (a.partition("=") for a in assignments):
                scoped.setenv(name, value)
            capsys.readouterr()
            code = main(words[len(assignments) + 1 :])
            printed = capsys.readouterr()
        assert code == 0, f"{line}\n{printed.out[-2000:]}\n{printed.err[-2000:]}"
        return printed.out + printed.err

    return run_line


def with_argument(line: str, extra: str) -> str:
    """``line`` with an argument added before any trailing comment."""
    return f"{line.partition('  #')[0].rstrip()} {extra}"


def test_cpu_walkthrough_runs_as_written(repo_like, run):
    *_, cpu = walkthrough_blocks()
    for line in cpu:
        words = shlex.split(line, comments=True)
        if words[:2] == ["dimoo", "train"] and "--check" not in words:
            line = with_argument(line, "gpt_args.train_iters=2")  # the recipe's 100 steps are minutes; 2 prove it
        run(line)
    assert (repo_like / "runs/shapes-finetune/hf/config.json").is_file()
    assert (repo_like / "finetuned.png").stat().st_size > 0


def test_cluster_lines_run_as_far_as_a_cpu_can(repo_like, run):
    pretokenize, train, export, _ = walkthrough_blocks()
    run("python scripts/make_shapes_manifest.py data --mix-scale 0.001")  # step 1: the user's manifest
    (line,) = pretokenize
    assert REAL_CHECKPOINT in line and "--workers 8" in line
    run(line.replace(REAL_CHECKPOINT, BUNDLED).replace("--workers 8", "--workers 1"))
    check, plan, launch = train
    assert "--check" in check and "ok: world 16" in run(check)
    assert "--plan" in plan and run(plan)
    assert "ok: world 16" in run(with_argument(launch, "--check"))
    assert export == ["dimoo export-hf runs/dimoo-8b-ft/checkpoints runs/dimoo-8b-ft/hf"], "needs the cluster run"
