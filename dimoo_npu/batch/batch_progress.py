"""Progress of one process's share of a batch job: a log line per batch with the rate and an ETA, and a final
line counting done / skipped / failed, so every rank of a long torchrun job says where it stands."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

logger = logging.getLogger("dimoo")


class BatchProgress:
    """Counts of one rank's requests; ``clock`` is injectable so the ETA can be tested."""

    def __init__(
        self, total: int, skipped: int, rank: int = 0, world: int = 1, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.total, self.skipped, self.rank, self.world = total, skipped, rank, world
        self.done = self.failed = 0
        self.clock = clock
        self.start = clock()
        if skipped:
            logger.info("%s: %d of %d request(s) already done, skipped", self.who, skipped, total)

    @property
    def who(self) -> str:
        return f"rank {self.rank} of {self.world}"

    def update(self, done: int, failed: int = 0) -> None:
        """``done`` more requests finished (``failed`` of them without a usable output)."""
        self.done += done
        self.failed += failed
        left = self.total - self.skipped - self.done
        elapsed = self.clock() - self.start
        eta = elapsed / self.done * left if self.done else 0.0
        logger.info(
            "%s: %d/%d done (%d skipped), %.1f s/request, ETA %s",
            self.who,
            self.done + self.skipped,
            self.total,
            self.skipped,
            elapsed / max(self.done, 1),
            format_duration(eta),
        )

    def finish(self) -> str:
        line = f"{self.who}: {self.done - self.failed} done, {self.skipped} skipped, {self.failed} failed"
        logger.info("%s", line)
        return line


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
