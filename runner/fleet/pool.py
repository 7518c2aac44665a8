"""The worker pool: N reused processes, one target each at a time, started from a forkserver.

The forkserver imports the runner, Alembic and SQLAlchemy once and forks every worker from that
state, so the fleet pays Python's start-up once, not once per target (and never forks the main
process, whose signal-watcher thread a fork would copy mid-state). At most N targets are handed
out at a time, so after --fail-fast, a signal or the deadline nothing new starts. SIGTERM/SIGINT
to the main process is passed on to every worker once; the worker's own watcher thread cancels
its running statement, which rolls back.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import resource_tracker
from typing import Any

from runner.config import Settings
from runner.context import Run
from runner.fleet.task import Task

# imported once by the forkserver: every worker starts with them loaded
PRELOAD = ["runner.fleet.worker", "runner.migrate", "runner.lock", "runner.wait", "runner.revisions",
           "alembic.command", "sqlalchemy.dialects.postgresql.psycopg2", "psycopg2", "tenacity"]
BACKUP_PRELOAD = ["runner.backup.take", "boto3", "botocore.client"]
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
POLL = 0.5  # seconds: how often a cancelled fleet looks for workers that started after the signal

Result = dict[str, Any]


def run_all(run: Run, tasks: list[Task], workers: int, fail_fast: bool, backups: bool,
            on_result: Callable[[Result], None]) -> dict[str, Result]:
    """Run every task in worker processes; return {target name: result}, not-started ones included."""
    _start_resource_tracker()
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD + (BACKUP_PRELOAD if backups else []))
    deadline_at = run.started_at + run.settings.run_deadline if run.settings.run_deadline else None
    todo: deque[Task] = deque(tasks)
    results: dict[str, Result] = {}
    forward = _Forwarder(run)

    def stopping() -> bool:
        return run.cancel.is_set or (fail_fast and any(r["exit_code"] for r in results.values()))

    reason = "--fail-fast: another target failed"
    with run.cancel.on_cancel(forward):
        while todo and not stopping():  # a fresh pool only after a worker died (OOM kill, ...)
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_init,
                                     initargs=(run.settings, deadline_at, os.getpid())) as pool:
                finished = _drain(pool, todo, workers, stopping, forward, results, on_result)
            if not finished:  # broke before running anything: starting it again would loop
                reason = "the worker processes could not start: see the errors above"
                break
    if run.cancel.is_set:
        reason = str(run.cancel.error())
    for task in todo:
        results[task.name] = {"target": task.name, "exit_code": None, "outcome": "not started",
                              "error": reason}
    return results


def _drain(pool: ProcessPoolExecutor, todo: deque[Task], workers: int, stopping: Callable[[], bool],
           forward: _Forwarder, results: dict[str, Result],
           on_result: Callable[[Result], None]) -> int:
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
        forward.again()  # after a signal: workers that started since get it too
        for future in done:
            task = running.pop(future)
            broken = broken or isinstance(future.exception(), BrokenProcessPool)
            result = _outcome(future, task)
            results[task.name], finished = result, finished + 1
            on_result(result)


def _start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker from a short-lived thread: starting it unblocks
    SIGTERM and SIGINT in the calling thread (CPython bpo-33613), and the main thread must keep
    them blocked so that the signal-watcher thread takes them (runner.cancellation)."""
    starter = threading.Thread(target=resource_tracker.ensure_running, name="resource-tracker")
    starter.start()
    starter.join()


def _init(settings: Settings, deadline_at: float | None, main_pid: int) -> None:
    from runner.fleet import worker  # workers have it preloaded; the main process never needs it

    worker.init(settings, deadline_at, main_pid)


def _execute(task: Task) -> Result:
    from runner.fleet import worker

    return worker.execute(task)


def _outcome(future: Future[Result], task: Task) -> Result:
    try:
        return future.result()
    except BrokenProcessPool:
        error = ("the worker process running it died (killed, out of memory?) before it finished; "
                 "check the target and run the fleet again")
    except Exception as exc:  # noqa: BLE001 - e.g. a result that could not be sent back
        error = f"internal error: {type(exc).__name__}: {exc}"
    return {"target": task.name, "exit_code": 1, "outcome": "failed", "error": error}


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
