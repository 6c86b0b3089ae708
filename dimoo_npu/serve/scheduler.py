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

Memory: every job states its ``tokens`` (the sequence positions its rows put into one forward, guidance copies
included); the tokens of all queued and running jobs stay under ``max_tokens``, so a few long requests are refused
(HTTP 429) where a count of requests alone would let them in. Shutdown: `drain` stops admitting and gives the
running work a grace period; past it every job is cancelled at the next step boundary (HTTP 503) and the loop ends.

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


class TooMuchWork(Exception):
    """One job alone needs more tokens than ``max_tokens``: it could never run here (HTTP 400, not worth a retry)."""


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
    tokens: int = 0
    task: Any = None
    cancelled: bool = False
    admitted: float = field(default_factory=time.monotonic)


class Scheduler:
    """Owns the model in one thread; `submit` queues a job, `cancel` drops it, `drain`/`stop` end the loop."""

    def __init__(
        self,
        load: Callable[[], Any],
        max_batch: int,
        max_queue: int,
        buckets=(),
        metrics=None,
        max_tokens: int | None = None,
    ):
        self.load, self.max_batch, self.max_queue, self.buckets = load, max_batch, max_queue, tuple(buckets)
        self.metrics, self.max_tokens = metrics, max_tokens
        self.deadline: float | None = None  # set by `drain`: running work is cancelled at the first step past it
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

    def drain(self, grace: float | None = None) -> None:
        """Stop admitting; queued and running jobs go on for ``grace`` seconds (None: until done), then are
        cancelled at the next step boundary. A second call never extends the first one's deadline."""
        with self.lock:
            self.stopping = True
            if grace is not None:
                deadline = time.monotonic() + grace
                self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)
            self.lock.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        """`drain` with ``timeout`` as the grace period, then wait for the loop to end (a step in flight finishes)."""
        self.drain(timeout)
        self.thread.join(None if timeout is None else timeout + 1)

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.stopping or not self.ready.is_set():
                raise NotAccepting("shutting down" if self.stopping else "the model is still loading")
            if self.max_tokens is not None and job.tokens > self.max_tokens:
                raise TooMuchWork(
                    f"this request needs {job.tokens} tokens of work (rows x sequence length, guidance copies "
                    f"included), over this server's limit of {self.max_tokens} (--max-concurrent-tokens): ask for "
                    "fewer images, a smaller size or a shorter answer"
                )
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are waiting (--max-queue {self.max_queue})")
            if self.max_tokens is not None and self.tokens_in_flight() + job.tokens > self.max_tokens:
                raise QueueFull(
                    f"{self.tokens_in_flight()} tokens of work are queued or running and this request needs "
                    f"{job.tokens} more (--max-concurrent-tokens {self.max_tokens})"
                )
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

    def tokens_in_flight(self) -> int:
        """Tokens of the queued jobs and of the running ones not yet finished or cancelled."""
        running = (job for group in self.groups for job in group.jobs)
        live = [job for job in running if not (job.cancelled or _finished(job.task))]
        return sum(job.tokens for job in [*self.pending, *live])

    def _overdue(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _cancel_everything(self) -> None:
        """The grace period is over: every queued and running job ends now with a 503, at this step boundary."""
        with self.lock:
            jobs = [*self.pending, *(job for group in self.groups for job in group.jobs)]
            live = [job for job in jobs if not (job.cancelled or _finished(job.task))]
            logger.warning("grace period over: cancelling %d unfinished request(s)", len(live))
            for job in live:
                job.cancelled = True
                if job.task is not None:
                    job.task.cancelled = True
                job.post("error", NotAccepting("the server shut down before this request finished: retry it"))
            self.pending.clear()
            self.groups.clear()
            self._observe()

    # ---- the loop ----

    def _main(self) -> None:
        try:
            self.model = self.load()
        except BaseException as err:  # reported by /ready and every request until `dimoo serve` stops on it
            logger.error("the model did not load: %s", err)
            self.load_error = err
            return
        self.ready.set()
        logger.info("model loaded; serving")
        while True:
            with self.lock:
                if self._overdue():
                    break
                self._admit()
                if not self.groups:
                    if self.stopping and not self.pending:
                        return
                    self.lock.wait(0.2)
                    continue
                groups = list(self.groups)
            for group in groups:
                if self._overdue():  # checked between steps: a long request cannot hold a draining server
                    break
                self._step(group)
        self._cancel_everything()

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
            self.metrics.tokens.set(self.tokens_in_flight())


def _finished(task) -> bool:
    return bool(getattr(task, "finished", False) or getattr(task, "done", False))


def _group_type(task):
    """The step-level group of a task's sampler (imported here: the loop is the only place that needs torch)."""
    from dimoo_npu.sampling.image import ImageGroup, ImageTask
    from dimoo_npu.sampling.text import TextGroup

    return ImageGroup if isinstance(task, ImageTask) else TextGroup
