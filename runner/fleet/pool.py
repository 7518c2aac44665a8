"""The worker pool: N reused processes, one target each at a time, started from a forkserver.

The forkserver imports the runner, Alembic and SQLAlchemy once and forks every worker from that
state, so the fleet pays Python's start-up once, not once per target (and never forks the main
process, whose signal-watcher thread a fork would copy mid-state). At most N targets are handed
out at a time, so after --fail-fast, a signal or the deadline nothing new starts. SIGTERM/SIGINT
to the main process is passed on to every worker once; the worker's own watcher thread cancels
its running statement, which rolls back.

A worker whose server stopped answering never comes back: GIVE_UP seconds after the stop, the
targets still running are reported as interrupted and their workers killed, so the fleet reports
every result it has within RUN_DEADLINE + 5 s. When the fleet is over, the forkserver and the
resource tracker are stopped too: no process of the run outlives it.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import forkserver, resource_tracker
from typing import Any

from runner import proctree
from runner.config import Settings
from runner.context import Run
from runner.exitcodes import ExitCode
from runner.fleet import worker
from runner.fleet.task import Task

# imported once by the forkserver: every worker starts with them loaded
PRELOAD = ["runner.fleet.worker", "runner.migrate.apply", "runner.lock.migration", "runner.wait.ready",
           "runner.revisions", "alembic.command", "sqlalchemy.dialects.postgresql.psycopg2", "psycopg2",
           "tenacity"]
BACKUP_PRELOAD = ["runner.backup.take", "boto3", "botocore.client"]
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
POLL = 0.5  # seconds: how often a cancelled fleet looks for workers that started after the signal
# seconds after a signal or the deadline: targets still running then are abandoned (a worker ends
# its stuck target's ledger row after worker.GRACE and a bounded write, then exits)
GIVE_UP = worker.GRACE + 1.8
STOP_WITHIN = 1.0  # seconds for the forkserver or the resource tracker to stop

Result = dict[str, Any]


def run_all(run: Run, tasks: list[Task], workers: int, fail_fast: bool, backups: bool,
            on_result: Callable[[Result], None], results: dict[str, Result]) -> None:
    """Run every task in worker processes; fill results ({target name: result}) as they finish,
    then with the tasks that did not (interrupted, not started)."""
    _start_resource_tracker()
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD + (BACKUP_PRELOAD if backups else []))
    deadline_at = run.started_at + run.settings.run_deadline if run.settings.run_deadline else None
    todo: deque[Task] = deque(tasks)
    forward = _Forwarder(run)

    def stopping() -> bool:
        return run.cancel.is_set or (fail_fast and any(r["exit_code"] for r in results.values()))

    reason = "--fail-fast: another target failed"
    try:
        with run.cancel.on_cancel(forward):
            while todo and not stopping():  # a fresh pool only after a worker died (OOM kill, ...)
                with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx,
                                         initializer=_init,
                                         initargs=(run.settings, deadline_at, os.getpid())) as pool:
                    finished = _drain(run, pool, todo, workers, stopping, forward, results, on_result,
                                      deadline_at)
                del pool  # its queues' semaphores go now, before the resource tracker stops
                if not finished:  # broke before running anything: starting it again would loop
                    reason = "the worker processes could not start: see the errors above"
                    break
    finally:
        _stop_helpers()
    if run.cancel.is_set:
        reason = str(run.cancel.error())
    for task in todo:
        results[task.name] = {"target": task.name, "exit_code": None, "outcome": "not started",
                              "error": reason}


def _drain(run: Run, pool: ProcessPoolExecutor, todo: deque[Task], workers: int,
           stopping: Callable[[], bool], forward: _Forwarder, results: dict[str, Result],
           on_result: Callable[[Result], None], deadline_at: float | None) -> int:
    """Hand out tasks, at most `workers` at a time, until done, stopped or the pool broke; return
    how many finished."""
    running: dict[Future[Result], Task] = {}
    broken, finished = False, 0
    while True:
        while todo and len(running) < workers and not (stopping() or broken):
            task = todo.popleft()
            try:
                running[pool.submit(_execute, task)] = task
            except BrokenProcessPool:
                todo.appendleft(task)
                broken = True
        if not running:
            return finished
        done, _ = wait(running, timeout=POLL, return_when=FIRST_COMPLETED)
        if deadline_at is not None and time.time() >= deadline_at:
            # the workers' clocks say so: on a loaded machine this process's timer may be late
            run.cancel.trigger("deadline")
        forward.again()  # after a signal: workers that started since get it too
        for future in done:
            task = running.pop(future)
            broken = broken or isinstance(future.exception(), BrokenProcessPool)
            result = _outcome(run, future, task)
            results[task.name], finished = result, finished + 1
            on_result(result)
        if running and run.cancel.at is not None and time.monotonic() - run.cancel.at > GIVE_UP:
            _abandon(run, running, results, on_result)
            return finished + len(running)


def _abandon(run: Run, running: dict[Future[Result], Task], results: dict[str, Result],
             on_result: Callable[[Result], None]) -> None:
    """Report the targets still running as interrupted and kill their workers (and whatever those
    started): their server stopped answering, and the fleet must report and exit."""
    for task in running.values():
        results[task.name] = result = _stuck(run, task, f"still running {GIVE_UP:g}s later: its "
                                             "worker was killed")
        on_result(result)
    for child in multiprocessing.active_children():  # the pool's workers
        if child.pid:
            proctree.kill([child.pid, *proctree.descendants(child.pid)])


def _stop_helpers() -> None:
    """Stop the forkserver and the resource tracker now: left alone they exit only after the
    main process, and one ended by the backstop would orphan them.

    `_stop()` is CPython's own shutdown of each (its test suite's); there is no public one. The
    garbage collection first lets the pools' semaphores unregister themselves: the tracker then
    has nothing left to clean up, or to warn about, when it stops. Each stop waits for its
    process; a worker still alive would keep the tracker waiting, so the wait is bounded and what
    is left is killed.
    """
    gc.collect()
    for helper in (getattr(forkserver, "_forkserver", None),
                   getattr(resource_tracker, "_resource_tracker", None)):
        stopper = threading.Thread(target=_stop, args=(helper,), name="stop-helper", daemon=True)
        stopper.start()
        stopper.join(STOP_WITHIN)
        if stopper.is_alive():
            proctree.kill(proctree.descendants())
            stopper.join(STOP_WITHIN)


def _stop(helper: Any) -> None:
    with contextlib.suppress(Exception):  # not started, or already gone
        helper._stop()


def _start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker from a short-lived thread: starting it unblocks
    SIGTERM and SIGINT in the calling thread (CPython bpo-33613), and the main thread must keep
    them blocked so that the signal-watcher thread takes them (runner.cancellation)."""
    starter = threading.Thread(target=resource_tracker.ensure_running, name="resource-tracker")
    starter.start()
    starter.join()


def _init(settings: Settings, deadline_at: float | None, main_pid: int) -> None:
    worker.init(settings, deadline_at, main_pid)


def _execute(task: Task) -> Result:
    return worker.execute(task)


def _outcome(run: Run, future: Future[Result], task: Task) -> Result:
    try:
        return future.result()
    except BrokenProcessPool:
        if run.cancel.is_set:  # a worker abandoned its stuck target (worker.GRACE), or was stopped
            return _stuck(run, task, "its worker ended its ledger row and exited without waiting")
        error = ("the worker process running it died (killed, out of memory?) before it finished; "
                 "check the target and run the fleet again")
    except Exception as exc:  # noqa: BLE001 - e.g. a result that could not be sent back
        error = f"internal error: {type(exc).__name__}: {exc}"
    return {"target": task.name, "exit_code": 1, "outcome": "failed", "error": error}


def _stuck(run: Run, task: Task, what: str) -> Result:
    """The result of a target that did not stop after a signal or the deadline."""
    err = run.cancel.error()
    why = "RUN_DEADLINE reached" if run.cancel.reason == "deadline" else run.cancel.reason
    return {"target": task.name, "exit_code": int(getattr(err, "code", ExitCode.SIGTERM)),
            "outcome": "interrupted",
            "error": f"{why}, and it did not stop: the database did not answer the cancel (a frozen "
                     f"server, a SIGSTOPped backend?); {what}. The server rolls its open "
                     "transaction back once it notices the session is gone"}


class _Forwarder:
    """Pass the main process's SIGTERM/SIGINT on to each worker exactly once (a second signal
    makes a worker exit without cleanup); the deadline reaches workers by their own clocks."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.sent: set[int] = set()
        self._mutex = threading.Lock()

    def __call__(self) -> None:
        self.again()

    def again(self) -> None:
        sig = SIGNALS.get(self.run.cancel.reason or "")
        if sig is None:
            return
        with self._mutex:
            for child in multiprocessing.active_children():  # the pool's workers
                if child.pid and child.pid not in self.sent:
                    self.sent.add(child.pid)
                    try:
                        os.kill(child.pid, sig)
                    except ProcessLookupError:
                        pass
