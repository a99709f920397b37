"""Graceful drain: on SIGTERM the server stops taking requests (503; /health says "draining"), lets those in flight
finish for up to `drain_timeout_s`, then exits with status 0. Past the drain timeout the engine is stopped at its
next turn (after at most one bounded forward): what it still holds is answered 503, so the process exits within
seconds. A second SIGTERM, or SIGINT, exits at once (uvicorn's own shutdown)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

import uvicorn

log = logging.getLogger(__name__)

ALWAYS_SERVED = frozenset({"/health", "/metrics"})  # probes: answered while draining, never counted as in flight


class Lifecycle:
    """Requests in flight (counted by the request middleware) and whether the server is draining."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._changed = threading.Condition()

    def enter(self) -> None:
        with self._changed:
            self.in_flight += 1

    def leave(self) -> None:
        with self._changed:
            self.in_flight -= 1
            self._changed.notify_all()

    def start_draining(self) -> None:
        with self._changed:
            self.draining = True

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no request is in flight (True) or the timeout passes (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.in_flight == 0, timeout=timeout_s)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with SIGTERM meaning "drain, then exit 0" rather than "close connections now"."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_timeout_s: float,
                 stop_work: Callable[[], None]):
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_timeout_s = drain_timeout_s
        self.stop_work = stop_work  # past the drain timeout: answer what is still in flight (503) and stop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.lifecycle.draining:
            super().handle_exit(sig, frame)
            return
        log.info("SIGTERM: draining (%d requests in flight, up to %g s)", self.lifecycle.in_flight,
                 self.drain_timeout_s)
        self.lifecycle.start_draining()
        threading.Thread(target=self._drain, name="drain", daemon=True).start()

    def _drain(self) -> None:
        if self.lifecycle.wait_idle(self.drain_timeout_s):
            log.info("drained: every request in flight has been answered; exiting")
        else:
            log.warning("drain timeout: %d requests still in flight are cut (503); exiting", self.lifecycle.in_flight)
            self.stop_work()
        self.should_exit = True
