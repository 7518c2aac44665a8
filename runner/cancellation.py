"""Cancellation: SIGTERM/SIGINT and the run deadline stop the run cleanly, mid-statement too, and
within a bounded time even when the database stopped answering.

Python runs signal handlers only between bytecodes, and libpq blocks in C while a statement
runs, so a handler would wait for the migration to finish. Instead the signals are blocked in
every thread and a watcher thread takes them with sigwait(), then cancels the server-side
statements from a second connection (callbacks registered by the flow).

A server that stopped answering (a SIGSTOPped backend, a frozen VM) keeps its TCP connections
up, so neither keepalives nor the cancel request ever end a statement waiting on it: the
backstop then reports in the main thread's place and ends the process (see Backstop).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import NoReturn

from runner import proctree
from runner.errors import Interrupted, RunDeadline
from runner.exitcodes import ExitCode

SIGNALS = {signal.SIGTERM, signal.SIGINT}
# After a signal or RUN_DEADLINE: GRACE seconds for the main thread to stop cleanly and report;
# then the backstop reports in its place (the ledger bounded by LAST_WORDS_WITHIN); EXIT_WITHIN
# seconds after the stop the process is gone whatever still hangs. A Job whose
# activeDeadlineSeconds is RUN_DEADLINE + 5 s (start-up included) is never the one that ends it.
GRACE = 2.0
LAST_WORDS_WITHIN = 1.5
EXIT_WITHIN = 4.0
# (exit code, why) -> the exit code to end with, or None: nothing was stuck, do not exit
LastWords = Callable[[int, str], "int | None"]


class Cancel:
    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None
        self.at: float | None = None  # time.monotonic() of the trigger
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
            self.reason, self.at = reason, time.monotonic()
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


class Backstop:
    """Bound the end of a process once it is told to stop (a signal, RUN_DEADLINE).

    The main thread has `grace` seconds to stop cleanly and report. If it has not come back by
    then (a statement on a server that stopped answering never returns), `last_words` reports in
    its place and the process exits; EXIT_WITHIN seconds after the stop it exits whatever still
    hangs. Every exit ends the processes this one started (pg_dump, a fleet's workers).
    """

    def __init__(self, log: Callable[..., None], grace: float = GRACE) -> None:
        self.log = log
        self.grace = grace
        self.last_words: LastWords | None = None
        self.code: int | None = None  # set once armed: the code the process will end with
        self._timers: list[threading.Timer] = []
        self._mutex = threading.Lock()

    def arm(self, code: int, why: str) -> None:
        """Start the clock (once): report and exit after the grace, exit at EXIT_WITHIN."""
        with self._mutex:
            if self.code is not None:
                return
            self.code = code
        for delay, then in ((self.grace, self._after_grace), (EXIT_WITHIN, self._at_the_limit)):
            timer = threading.Timer(delay, then, args=(why,))
            timer.daemon = True
            timer.start()
            self._timers.append(timer)

    def _after_grace(self, why: str) -> None:
        code: int | None = self.code or 0
        if self.last_words is not None:
            try:
                code = self.last_words(self.code or 0, why)
            except Exception:  # noqa: BLE001 - whatever failed, the process must still end
                code = self.code or 0
        if code is None:  # nothing was stuck (a fleet worker between targets): carry on
            for timer in self._timers:
                timer.cancel()
            return
        self.code = code
        exit_process(code)

    def _at_the_limit(self, why: str) -> None:
        _bounded(lambda: self.log("stop", f"{why}: the run did not end within {EXIT_WITHIN:g}s; "
                                  "exiting without further cleanup", level="error"), 0.3)
        exit_process(self.code or 0)


def install(cancel: Cancel, log: Callable[..., None], grace: float = GRACE) -> Backstop:
    """Route SIGTERM/SIGINT to a watcher thread that triggers cancel (call once, early); return
    the process's backstop (set its last_words to report when the main thread cannot)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    backstop = Backstop(log, grace)

    def watch() -> None:
        first = signal.sigwait(SIGNALS)
        name = signal.Signals(first).name
        log("signal", f"{name} received: cancelling the running statement and stopping",
            level="warn")
        backstop.arm(_code(name), name)
        cancel.trigger(name)
        second = signal.sigwait(SIGNALS)  # a second signal means: stop now
        name = signal.Signals(second).name
        log("signal", f"{name}: exiting without further cleanup", level="error")
        exit_process(_code(name))

    threading.Thread(target=watch, name="signal-watcher", daemon=True).start()
    return backstop


def _code(name: str) -> int:
    return int(ExitCode.SIGINT if name == "SIGINT" else ExitCode.SIGTERM)


def exit_process(code: int) -> NoReturn:
    """Exit now without the interpreter's cleanup: flush what was written, end every process this
    one started (they would outlive it, orphaned), then _exit."""
    _bounded(_flush, 0.5)  # a full pipe on stderr must not keep the process alive
    proctree.kill(proctree.descendants())
    os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _bounded(fn: Callable[[], object], seconds: float) -> None:
    """Run fn in a thread of its own and wait for it at most seconds (it may block on a pipe)."""
    worker = threading.Thread(target=fn, daemon=True)
    worker.start()
    worker.join(seconds)


def unblock_in_child() -> None:
    """preexec_fn for subprocesses: children inherit the blocked mask, give them signals back."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def start_deadline(cancel: Cancel, seconds: float,
                   backstop: Backstop | None = None) -> threading.Timer | None:
    """Trigger cancel with reason 'deadline' after seconds (0 means no deadline); with a backstop,
    the process then ends within EXIT_WITHIN seconds, exit 9, even if the cleanup hangs."""
    if seconds <= 0:
        return None

    def expire() -> None:
        if backstop is not None:
            backstop.arm(int(ExitCode.RUN_DEADLINE), "RUN_DEADLINE reached")
        cancel.trigger("deadline")

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer
