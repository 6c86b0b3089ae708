"""The one loop that owns the model: admits requests into running groups at step boundaries (continuous batching).

A request becomes a task of the step-level samplers (`dimoo_npu.sampling.image.ImageGroup`, `...text.TextGroup`).
Tasks with the same grid and sampling settings (their ``key``) share a group: one forward per step for all of
them, each task at its own step index with its own schedule, leaving when done. A task joins a group that
``accepts`` it (without ML-Cache: at any step boundary; with ML-Cache: only where the group's next step is a full
refresh and every running task's remaining kinds of step (full / cached) equal the joiner's, since a cached step
needs every row's K/V current and a row must take the steps its schedule asks for to give its seeded output).

Policy for other grids and settings: the request starts its own group and the loop steps all groups in turn, one
step each. Waiting for the running group to drain would starve a grid behind a steady stream of joiners of another
grid; a step of a smaller group costs one forward either way, and rows of different grids cannot share a forward
(the sampler takes one grid per batch). The batch limit (``max_batch``, prompt rows over all groups) is checked
when a request is admitted, never mid-batch; admission is first in, first out. With ``buckets`` (graph mode), each
group pads its rows to the next bucket with inert rows, so compiled graphs are reused across group sizes.

Seeds: every row draws its noise from its own generator (seed + its index), so a request's output equals
`dimoo t2i` (and the other tasks) with the same seed and settings, whatever else runs beside it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue of waiting requests is at ``max_queue``: the client should retry later (HTTP 429)."""


class NotAccepting(Exception):
    """The server is starting (model not loaded) or draining after SIGTERM (HTTP 503)."""


@dataclass(eq=False)
class Job:
    """One admitted request: how to make its task (on the loop, which owns the model) and where events go.

    ``make`` returns (task, kind); ``post(event, value)`` is called from the loop with ``("block", text)``,
    ``("done", result)`` or ``("error", exception)``; ``finish(task)`` turns a done task into its result.
    """

    rows: int
    make: Callable[[], Any]
    finish: Callable[[Any], Any]
    post: Callable[[str, Any], None]
    on_block: Callable[[Any], Any] | None = None
    task: Any = None
    cancelled: bool = False
    admitted: float = field(default_factory=time.monotonic)


class Scheduler:
    """Owns the model in one thread; `submit` queues a job, `cancel` drops it, `stop` drains and ends the loop."""

    def __init__(self, load: Callable[[], Any], max_batch: int, max_queue: int, buckets=(), metrics=None):
        self.load, self.max_batch, self.max_queue, self.buckets = load, max_batch, max_queue, tuple(buckets)
        self.metrics = metrics
        self.model = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.pending: deque[Job] = deque()
        self.groups: list = []
        self.lock = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._main, name="dimoo-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop admitting; the loop finishes every queued and running job, then ends."""
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.stopping or not self.ready.is_set():
                raise NotAccepting("shutting down" if self.stopping else "the model is still loading")
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are waiting (--max-queue {self.max_queue})")
            self.pending.append(job)
            self._observe()
            self.lock.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: drop a waiting job now; a running one's rows are freed at its group's next rebuild."""
        with self.lock:
            job.cancelled = True
            if job.task is not None:
                job.task.cancelled = True
            elif job in self.pending:
                self.pending.remove(job)
            self._observe()

    def busy_rows(self) -> int:
        return sum(group.rows() for group in self.groups)

    # ---- the loop ----

    def _main(self) -> None:
        try:
            self.model = self.load()
        except BaseException as err:  # reported by /ready and every request; the process keeps serving /health
            logger.error("the model did not load: %s", err)
            self.load_error = err
            return
        self.ready.set()
        logger.info("model loaded; serving")
        while True:
            with self.lock:
                self._admit()
                if not self.groups:
                    if self.stopping and not self.pending:
                        return
                    self.lock.wait(0.2)
                    continue
                groups = list(self.groups)
            for group in groups:
                self._step(group)

    def _admit(self) -> None:
        """Move waiting jobs into groups, first in first out, while their rows fit under ``max_batch``."""
        while self.pending:
            job = self.pending[0]
            if self.busy_rows() + job.rows > self.max_batch:
                break
            self.pending.popleft()
            try:
                job.task = job.make()
            except Exception as err:  # a bad input found when laying out its rows: refused, nothing ran
                job.post("error", err)
                continue
            group = next((g for g in self.groups if g.accepts(job.task)), None)
            if group is None:
                group = _group_type(job.task)(self.model, job.task.key, self.buckets)
                group.jobs = []
                self.groups.append(group)
            group.join(job.task)
            group.jobs.append(job)
        self._observe()

    def _step(self, group) -> None:
        started = time.perf_counter()
        try:
            ended = group.step()
        except Exception as err:  # a bug, not the client's: every job of the group fails with it, the loop goes on
            logger.exception("a sampling step failed")
            with self.lock:
                for job in group.jobs:
                    job.post("error", err)
                self.groups.remove(group)
            return
        if self.metrics is not None:
            self.metrics.step_seconds.observe(time.perf_counter() - started)
        jobs = {id(job.task): job for job in group.jobs}
        for task in ended:
            job = jobs[id(task)]
            if job.cancelled:
                continue
            try:
                if getattr(task, "finished", True):
                    job.post("done", job.finish(task))
                elif job.on_block is not None:
                    job.post("block", job.on_block(task))
            except Exception as err:
                logger.exception("turning a finished request into its response failed")
                job.post("error", err)
        with self.lock:
            group.jobs = [job for job in group.jobs if not (job.cancelled or _finished(job.task))]
            if not group.jobs and not group.rows():
                self.groups.remove(group)
            self._observe()

    def _observe(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.pending))
            self.metrics.batch_rows.set(self.busy_rows())


def _finished(task) -> bool:
    return bool(getattr(task, "finished", False) or getattr(task, "done", False))


def _group_type(task):
    """The step-level group of a task's sampler (imported here: the loop is the only place that needs torch)."""
    from dimoo_npu.sampling.image import ImageGroup, ImageTask
    from dimoo_npu.sampling.text import TextGroup

    return ImageGroup if isinstance(task, ImageTask) else TextGroup
