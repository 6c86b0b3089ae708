"""Launch N gloo processes running a worker script, on a free port, one CPU thread each."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(procs: list[subprocess.Popen], timeout: float) -> int | None:
    """Wait for every rank; return the first failed rank (the others are killed: they would hang)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [proc.poll() for proc in procs]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed or all(code == 0 for code in codes):
            return failed[0] if failed else None
        time.sleep(0.1)
    return next(rank for rank, proc in enumerate(procs) if proc.poll() is None)


def launch(script: Path, nprocs: int, out_dir: Path, args: list[str], timeout: float = 240.0) -> list[dict]:
    """Run ``script`` as ranks 0..nprocs-1 (torchrun's environment variables); return each rank{R}.json."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(nprocs))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    logs = [out_dir / f"rank{rank}.log" for rank in range(nprocs)]
    procs = []
    for rank, log in enumerate(logs):
        with log.open("w") as sink:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(script), "--out", str(out_dir), *args],
                    env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            )
    try:
        failed = _wait(procs, timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if failed is not None:
        pytest.fail(f"rank {failed} of {nprocs} failed or timed out:\n{logs[failed].read_text()[-4000:]}")
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(nprocs)]


@pytest.fixture(scope="module")
def run_distributed():
    return launch
