"""Cancellation: SIGTERM/SIGINT and the run deadline stop the run cleanly, mid-statement too.

Python runs signal handlers only between bytecodes, and libpq blocks in C while a statement
runs, so a handler would wait for the migration to finish. Instead the signals are blocked in
every thread and a watcher thread takes them with sigwait(), then cancels the server-side
statements from a second connection (callbacks registered by the flow).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

from runner.errors import Interrupted, RunDeadline
from runner.exitcodes import ExitCode

SIGNALS = {signal.SIGTERM, signal.SIGINT}
HARD_EXIT_AFTER = 20.0  # seconds after the first signal: stop waiting for a cleanup that hangs


class Cancel:
    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._mutex = threading.Lock()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def trigger(self, reason: str) -> None:
        """Record why the run stops and run the cancel callbacks once."""
        with self._mutex:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            callbacks = list(self._callbacks)
        for cb in callbacks:
            with contextlib.suppress(Exception):  # best effort: the run still stops
                cb()

    @contextlib.contextmanager
    def on_cancel(self, callback: Callable[[], None]) -> Iterator[None]:
        """Run callback if the run is cancelled while the block runs."""
        with self._mutex:
            self._callbacks.append(callback)
        try:
            yield
        finally:
            with self._mutex:
                self._callbacks.remove(callback)

    def error(self) -> Exception:
        if self.reason == "deadline":
            return RunDeadline("RUN_DEADLINE reached: stopped cleanly before the deadline; "
                               "raise RUN_DEADLINE (and activeDeadlineSeconds) or retry")
        return Interrupted(self.reason or "SIGTERM")

    def check(self) -> None:
        """Raise the matching error if the run was cancelled."""
        if self._event.is_set():
            raise self.error()

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake up and raise as soon as the run is cancelled."""
        if self._event.wait(max(0.0, seconds)):
            raise self.error()


def install(cancel: Cancel, log: Callable[..., None]) -> None:
    """Route SIGTERM/SIGINT to a watcher thread that triggers cancel (call once, early)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)

    def watch() -> None:
        first = signal.sigwait(SIGNALS)
        name = signal.Signals(first).name
        log("signal", f"{name} received: cancelling the running statement and stopping",
            level="warn")
        timer = threading.Timer(HARD_EXIT_AFTER, _hard_exit, args=(name, log))
        timer.daemon = True
        timer.start()
        cancel.trigger(name)
        second = signal.sigwait(SIGNALS)  # a second signal means: stop now
        _hard_exit(signal.Signals(second).name, log)

    threading.Thread(target=watch, name="signal-watcher", daemon=True).start()


def _hard_exit(name: str, log: Callable[..., None]) -> None:
    log("signal", f"{name}: exiting without further cleanup", level="error")
    os._exit(int(ExitCode.SIGINT if name == "SIGINT" else ExitCode.SIGTERM))


def unblock_in_child() -> None:
    """preexec_fn for subprocesses: children inherit the blocked mask, give them signals back."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def start_deadline(cancel: Cancel, seconds: float,
                   log: Callable[..., None] | None = None) -> threading.Timer | None:
    """Trigger cancel with reason 'deadline' after seconds (0 means no deadline).

    With log, the process also exits (9) HARD_EXIT_AFTER seconds later if the cleanup hangs: a
    server that stopped answering (SIGSTOP, a frozen VM) keeps its TCP connections alive, so
    neither keepalives nor the cancel request would ever end a statement waiting on it.
    """
    if seconds <= 0:
        return None

    def expire() -> None:
        if log is not None:
            timer = threading.Timer(HARD_EXIT_AFTER, _deadline_exit, args=(log,))
            timer.daemon = True
            timer.start()
        cancel.trigger("deadline")

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer


def _deadline_exit(log: Callable[..., None]) -> None:
    log("deadline", f"RUN_DEADLINE: the cleanup did not finish within {HARD_EXIT_AFTER:g}s (the "
        "database stopped answering?): exiting without further cleanup", level="error")
    os._exit(int(ExitCode.RUN_DEADLINE))
