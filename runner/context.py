"""The state of one run: settings, log, cancellation, deadline and what the summary reports."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from runner.cancellation import Cancel
from runner.config import Settings
from runner.log import EventLog


class Ending:
    """Who reports a run's end, exactly once: its main thread, or the backstop in its place when
    the main thread is stuck on a server that stopped answering (runner.cancellation)."""

    def __init__(self) -> None:
        self._claim = threading.Lock()
        self._done = threading.Event()
        self.code: int | None = None
        # the backstop reports: the ledger must use a fresh, short-lived connection, since the
        # kept one may be the one stuck
        self.abandoned = False

    def claim(self) -> bool:
        """Return True for the first caller only: it reports."""
        return self._claim.acquire(blocking=False)

    def reported(self, code: int) -> None:
        self.code = code
        self._done.set()

    def wait(self, seconds: float) -> int | None:
        """Wait for the report; return its exit code, or None if it has not finished in time."""
        return self.code if self._done.wait(seconds) else None


@dataclasses.dataclass
class Run:
    settings: Settings
    log: EventLog
    command: str
    cancel: Cancel = dataclasses.field(default_factory=Cancel)
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:8])
    clock: Callable[[], float] = time.monotonic
    started: float = dataclasses.field(default_factory=time.monotonic)
    server_version: int = 0
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    durations: dict[str, float] = dataclasses.field(default_factory=dict)
    # each revision step the run attempted: {"revision", "seconds", "outcome"} (the ledger keeps them)
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # called by report() with (exit code, error) once the outcome is known (the ledger records it);
    # a finisher that raises only logs a warning: it never changes the exit code
    finishers: list[Callable[[int, str | None], None]] = dataclasses.field(default_factory=list)
    started_at: float = dataclasses.field(default_factory=time.time)  # wall clock, for records
    # fleet schema mode: the tenant schema env.py migrates (`-x tenant=...`, attributes["tenant"])
    tenant: str | None = None
    # engines by purpose and options (runner.db): each new Engine re-runs SQLAlchemy's dialect
    # initialisation (several round trips) on its first connection; a run opens ~20 connections
    engines: dict[tuple[Any, ...], Any] = dataclasses.field(default_factory=dict, repr=False)
    ending: Ending = dataclasses.field(default_factory=Ending, repr=False)

    def remaining(self) -> float | None:
        """Return seconds left before RUN_DEADLINE, or None without a deadline."""
        if not self.settings.run_deadline:
            return None
        return self.settings.run_deadline - (self.clock() - self.started)

    def limit(self, timeout: float) -> tuple[float, bool]:
        """Return (seconds, capped): timeout bounded by the run deadline, and whether it was."""
        left = self.remaining()
        if left is not None and left < timeout:
            return max(0.0, left), True
        return timeout, False

    def stop_if_deadline(self, capped: bool) -> None:
        """A phase timed out: when its limit was the run deadline, stop as the deadline (exit 9)."""
        if capped:
            self.cancel.trigger("deadline")
            self.cancel.check()

    def app_name(self, purpose: str) -> str:
        """Return the application_name for a runner connection (unique per run, so we can cancel it)."""
        return f"{self.settings.application_name}/{purpose}/{self.run_id}"

    def timed(self, phase: str) -> _Timer:
        return _Timer(self, phase)


class _Timer:
    def __init__(self, run: Run, phase: str) -> None:
        self.run, self.phase = run, phase

    def __enter__(self) -> None:
        self.t0 = self.run.clock()

    def __exit__(self, *exc: object) -> None:
        took = self.run.clock() - self.t0
        self.run.durations[self.phase] = round(self.run.durations.get(self.phase, 0.0) + took, 3)
