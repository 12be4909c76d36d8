"""Stop requests: SIGTERM / SIGINT (preemption, `scancel`, Kubernetes, Ctrl-C) and a wall-time budget.

A run asks `StopRequests.check()` after every iteration. When a stop was requested, the loop saves a
checkpoint of the state after that iteration (waiting for it to be on disk) and raises `Stopped`;
the entry point prints one line and exits with `EXIT_STOPPED`, and rerunning the same command
resumes from that checkpoint. A second signal ends the process at once (by that signal).

One process: Python signal handlers set a flag. Several processes (`jax.distributed`): JAX's
preemption service owns SIGTERM and agrees, through the coordinator, on one iteration after the
notice at which every process stops (`multihost_utils.reached_preemption_sync_point`), so all of
them save the same step together; SIGINT and the wall-time budget are turned into that notice by
sending SIGTERM to the process itself.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from absl import logging

EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: the state is saved; rerun the same command to resume
EXIT_DIVERGED = 3  # a non-finite loss or parameter (config.on_nonfinite='stop')


class Stopped(Exception):  # noqa: N818 (an outcome, not an error: the run saved and may resume)
    """The run stopped on request after saving a checkpoint; `str()` says why and where."""


def _sync_manager() -> Any:
    """JAX's preemption sync manager when this is a multi-process job with the service on."""
    from jax._src import distributed  # the public reached_preemption_sync_point raises without it

    state = distributed.global_state
    return state.preemption_sync_manager if state.client is not None else None


class StopRequests:
    """Collects stop requests while installed (a context manager, main thread only).

    max_hours: wall-time budget from construction (0 = none). check(): call once per iteration, on
    every process in the same order; returns the reason to stop now, or None.
    """

    def __init__(self, max_hours: float = 0.0, *, clock: Callable[[], float] = time.monotonic):
        self.max_seconds = float(max_hours) * 3600.0
        self._clock = clock
        self._started = clock()
        self._reason: str | None = None
        self._forwarded = False  # multi-process: the local request was turned into SIGTERM
        self._checks = 0
        self._previous: dict[int, Any] = {}
        self._sync = None

    # -- installation ---------------------------------------------------------------------------

    def __enter__(self) -> StopRequests:
        self._sync = _sync_manager()
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        signals = [signal.SIGINT] if self._sync is not None else [signal.SIGTERM, signal.SIGINT]
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._reason is not None:  # the second signal: stop now, without saving
            logging.warning("%s again: exiting at once (the last complete checkpoint is kept)", name)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.request(f"{name} received")
        logging.warning("%s: finishing the current iteration, then saving a checkpoint and "
                        "exiting; send it again to exit at once", name)

    # -- requests -------------------------------------------------------------------------------

    def request(self, reason: str) -> None:
        """Ask the run to stop after the current iteration (what a signal handler does)."""
        if self._reason is None:
            self._reason = reason

    @property
    def requested(self) -> str | None:
        """This process's own request, if any (on several processes, `check` decides)."""
        return self._reason

    def check(self) -> str | None:
        """The reason to stop after the iteration just run, or None to go on."""
        self._checks += 1
        if (self._reason is None and self.max_seconds
                and self._clock() - self._started >= self.max_seconds):
            self.request(f"the wall-time budget config.max_hours = {self.max_seconds / 3600:g} "
                         "is spent")
        if self._sync is None:
            return self._reason
        if self._reason is not None and not self._forwarded:
            self._forwarded = True  # JAX's service spreads the notice and picks the common step
            os.kill(os.getpid(), signal.SIGTERM)
        if self._sync.reached_sync_point(self._checks):
            return self._reason or "a stop request (SIGTERM, SIGINT or max_hours) on another process"
        return None


class NoStops(StopRequests):
    """Never asks to stop and installs nothing (library use, tests)."""

    def __enter__(self) -> NoStops:
        return self

    def check(self) -> str | None:
        return None
