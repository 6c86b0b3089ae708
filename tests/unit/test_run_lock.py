"""One writer per run folder: a second process is refused while the first holds it, a dead holder blocks nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dimoo_npu.files.run_lock import OWNER_NAME, RunFolderBusyError, hold_run_folder
from tests.unit.train_support import tiny_run_config

REPO = Path(__file__).resolve().parents[2]

HOLD = """
import sys, time
from dimoo_npu.files.run_lock import hold_run_folder
lock = hold_run_folder(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock on tmp_path/run."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_second_process_is_refused_with_who_holds_it(holder, tmp_path):
    with pytest.raises(RunFolderBusyError, match=f"in use by a training run \\(pid {holder.pid} on .*started .*"):
        hold_run_folder(tmp_path / "run")
    assert str(holder.pid) in (tmp_path / "run" / OWNER_NAME).read_text()


def test_a_lock_left_by_a_killed_process_does_not_block(holder, tmp_path):
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    lock = hold_run_folder(tmp_path / "run")
    assert lock.is_locked and str(os.getpid()) in (tmp_path / "run" / OWNER_NAME).read_text()
    lock.release()


def test_train_refuses_a_run_folder_in_use_before_touching_it(holder, tmp_path):
    from dimoo_npu.train.trainer import Trainer

    config = tiny_run_config(tmp_path)  # output_dir is tmp_path/run, the held folder
    (tmp_path / "run" / "checkpoints").mkdir()
    (tmp_path / "run" / "checkpoints" / ".tmp-step-00000002").mkdir()  # the live run's save in progress
    with pytest.raises(RunFolderBusyError, match="in use by a training run"):
        Trainer(config)
    assert (tmp_path / "run" / "checkpoints" / ".tmp-step-00000002").is_dir()


RANK = """
import os, sys
import torch.distributed as dist
from dimoo_npu.files.run_lock import RunFolderBusyError, hold_run_folder
dist.init_process_group("gloo")
try:
    hold_run_folder(sys.argv[1], dist.get_rank(), dist.get_world_size())
except RunFolderBusyError as err:
    print(err, flush=True)
    dist.destroy_process_group()
    sys.exit(2)
"""


def test_under_torchrun_every_rank_is_refused_with_the_same_message(holder, tmp_path):
    from tests.distributed.conftest import _free_port

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(tmp_path / "run")],
            cwd=REPO,
            text=True,
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdout=subprocess.PIPE,
        )  # fmt: skip
        for rank in range(2)
    ]
    start = time.monotonic()
    outputs = [proc.communicate(timeout=120)[0] for proc in ranks]
    assert [proc.returncode for proc in ranks] == [2, 2], outputs
    assert outputs[0] == outputs[1] and f"pid {holder.pid}" in outputs[0]
    assert time.monotonic() - start < 60, "no rank waited at a barrier"
