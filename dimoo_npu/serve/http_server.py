"""The uvicorn server of `dimoo serve`: slow clients cut off, and a SIGTERM that always ends the process in time.

uvicorn times out an idle keep-alive connection but not a client that sends its request headers slowly (one byte
every few seconds holds a connection forever); `header_timeout_protocol` closes a connection whose request headers
are not complete within the timeout (the body's timeout is the app's `BodyGuard`). `DrainingServer` starts the
scheduler's drain at the signal itself (uvicorn only tells the app after every running request has ended), so
running work is cancelled at a step boundary once the grace period is over, and ends the process ``HARD_STOP_S``
after it if something still holds it (a step or an image decode that never returns). A model that fails to load
stops the server too (`dimoo serve` then exits with the error), rather than leaving it up answering 503.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from dimoo_npu.serve.app import ServeConfig, create_app
from dimoo_npu.utils import envs

logger = logging.getLogger(__name__)

HARD_STOP_S = 5.0  # after the grace period: uvicorn cancels the requests still open, then the process is ended


def header_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing a connection that has not sent complete request headers in ``seconds``
    (from its opening, and again after each response on a kept-alive connection)."""

    class HeaderTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(seconds, self._headers_overdue)

        def _headers_overdue(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete  # no request whose headers arrived
            if waiting and not self.transport.is_closing():
                logger.info("closing a connection that sent no complete request headers within %g s", seconds)
                self.transport.close()

    return HeaderTimeoutProtocol


class DrainingServer(uvicorn.Server):
    """SIGTERM: stop listening, give running work ``grace`` seconds, cancel it at the next step boundary after that,
    and exit 0; if the process is still held ``HARD_STOP_S`` later, ``overdue`` ends it (default: exit 1 now)."""

    def __init__(self, config: uvicorn.Config, scheduler, grace: float, overdue: Callable[[], None] | None = None):
        super().__init__(config)
        self.scheduler, self.grace = scheduler, grace
        self.overdue = overdue or _exit_now
        self.watchdog: threading.Timer | None = None

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises SIGTERM after its graceful shutdown (the process then dies of it, exit -15); a drained
        # server has done what SIGTERM asks, so it exits 0 as a service manager expects.
        captured = getattr(self, "_captured_signals", [])
        if sig == signal.SIGTERM and sig in captured:
            captured.remove(sig)
        if self.watchdog is None:
            logger.info("draining: running requests have %g s to finish", self.grace)
            self.scheduler.drain(self.grace)
            self.watchdog = threading.Timer(self.grace + HARD_STOP_S, self.overdue)
            self.watchdog.daemon = True
            self.watchdog.start()

    async def on_tick(self, counter: int) -> bool:
        return self.scheduler.load_error is not None or await super().on_tick(counter)

    def run(self, sockets=None) -> None:
        try:
            super().run(sockets)
        finally:
            if self.watchdog is not None:
                self.watchdog.cancel()


def _exit_now() -> None:
    logger.error("the server did not stop within its grace period + %g s: exiting now", HARD_STOP_S)
    logging.shutdown()
    os._exit(1)


def build_server(
    config: ServeConfig, host: str, port: int, overdue: Callable[[], None] | None = None
) -> DrainingServer:
    """The app of ``config`` behind uvicorn on host:port, with the header, body and shutdown timeouts."""
    app = create_app(config)
    settings = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=envs.log_level().lower(),
        http=header_timeout_protocol(config.header_timeout_s),
        timeout_graceful_shutdown=config.grace_s + HARD_STOP_S / 2,  # type: ignore[arg-type]
    )
    return DrainingServer(settings, app.state.scheduler, config.grace_s, overdue)
