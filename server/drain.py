"""Graceful shutdown of the HTTP process: on SIGTERM it keeps listening but answers every new
request with 503 (so a load balancer moves on, and a client is told why), lets the requests in
flight finish for up to --shutdown-timeout seconds, then stops uvicorn.

uvicorn's own SIGTERM handling would close the listening socket at once (new clients get
"connection refused", not an answer) and give in-flight requests no deadline we control.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Generator

import uvicorn

log = logging.getLogger("fovea.http")


class Drain:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.active = False
        self.task: asyncio.Task[None] | None = None


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose signals are ours (see `install_drain`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def install_drain(
    server: uvicorn.Server,
    drain: Drain,
    inflight: Callable[[], int],
    cut_off: Callable[[str], None],
) -> None:
    """SIGTERM: start draining (once); uvicorn exits when nothing is in flight or time is up,
    in which case `cut_off(message)` ends the requests left with that error first."""
    loop = asyncio.get_running_loop()

    async def finish() -> None:
        deadline = loop.time() + drain.timeout_s
        while inflight() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if inflight():
            log.warning(
                "%d requests still in flight after %g s: ending them",
                inflight(), drain.timeout_s,
            )  # fmt: skip
            cut_off(f"the server shut down before this request finished ({drain.timeout_s:g} s)")
            deadline = loop.time() + 2.0
            while inflight() and loop.time() < deadline:
                await asyncio.sleep(0.05)
        server.should_exit = True

    def on_sigterm() -> None:
        if drain.active:
            return
        drain.active = True
        log.info(
            "SIGTERM: draining %d requests in flight (up to %g s); new requests get 503",
            inflight(), drain.timeout_s,
        )  # fmt: skip
        drain.task = loop.create_task(finish())

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
