"""Per-rank progress of batch jobs: the ETA from the pace so far, and the final done / skipped / failed line."""

from __future__ import annotations

import logging

from dimoo_npu.batch.batch_progress import BatchProgress, format_duration
from dimoo_npu.batch.resume import first_difference


def test_eta_from_the_pace_of_the_requests_done_here(caplog):
    now = [100.0]
    with caplog.at_level(logging.INFO, logger="dimoo"):
        progress = BatchProgress(total=10, skipped=4, rank=1, world=3, clock=lambda: now[0])
        now[0] += 60.0
        progress.update(2)  # 30 s per request, 4 left: 2 minutes
        now[0] += 30.0
        progress.update(1, failed=1)
        line = progress.finish()
    assert "rank 1 of 3: 4 of 10 request(s) already done, skipped" in caplog.text
    assert "rank 1 of 3: 6/10 done (4 skipped), 30.0 s/request, ETA 0:02:00" in caplog.text
    assert "7/10 done (4 skipped), 30.0 s/request, ETA 0:01:30" in caplog.text
    assert line == "rank 1 of 3: 2 done, 4 skipped, 1 failed"
    assert format_duration(3725) == "1:02:05"


def test_first_difference_names_the_command_and_checkpoint_before_settings():
    made = {"task": "t2i", "seed": "3", "settings": '{"checkpoint": "/a", "timesteps": 64}', "software": "x 1"}
    assert first_difference(made, {**made, "software": "x 2"}) is None  # a newer version is not stale
    asked = {"task": "edit", "seed": 3, "settings": {"checkpoint": "/b", "timesteps": 8}}
    assert first_difference(made, asked).startswith("task (made with t2i, this run asks for edit)")
    assert first_difference(made, {**asked, "task": "t2i"}).startswith("checkpoint")
    assert first_difference(made, {**made, "settings": '{"checkpoint": "/a"}'}) == (
        "timesteps (made with 64, this run asks for nothing)"
    )
