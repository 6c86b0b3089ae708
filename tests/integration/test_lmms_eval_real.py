"""The real ``lmms_eval`` command, offline, on the local shapes task with the bundled model: its accuracy is
``dimoo eval shapes --task qa`` on the same items. Runs where the eval extra is installed (its own venv, README
"lmms-eval"); a couple of minutes on 2 CPU cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval", reason='needs lmms-eval 0.7.3 in its own venv (README "lmms-eval")')

from dimoo_npu.integrations import shapes_task  # noqa: E402

OBJECTS = 2  # held-out objects, 4 questions each


def run(command: list[str], env: dict, cwd) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_lmms_eval_accuracy_equals_dimoo_eval_shapes_qa(tmp_path):
    folder = shapes_task.write_task(tmp_path / "task", limit=OBJECTS)
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    lmms = [sys.executable, "-m", "lmms_eval", "--model", "dimoo", "--device", "cpu", "--batch_size", "8"]
    lmms += ["--tasks", shapes_task.TASK_NAME, "--include_path", str(folder), "--output_path", str(tmp_path / "out")]
    run([*lmms, "--log_samples"], env, tmp_path)
    (results,) = (tmp_path / "out").rglob("*_results.json")
    theirs = json.loads(results.read_text())["results"][shapes_task.TASK_NAME][f"{shapes_task.METRIC},none"]
    (samples,) = (tmp_path / "out").rglob("*_samples_*.jsonl")
    logged = [json.loads(line) for line in samples.read_text().splitlines()]
    ordered = sorted(logged, key=lambda s: s["doc_id"])
    missed = [(s["target"], s["filtered_resps"]) for s in ordered if not s["accuracy"]]

    dimoo = [sys.executable, "-m", "dimoo_npu.cli", "eval", "shapes", "--task", "qa", "--limit", str(OBJECTS)]
    run([*dimoo, "--batch-size", "8", "--output", str(tmp_path / "report.json")], env, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["qa"]["count"] == len(logged) == 4 * OBJECTS
    assert theirs == pytest.approx(report["qa"]["overall"])
    assert missed == [(f["expected"], f["answer"]) for f in report["failures"]["qa"]]  # the same answers missed
