"""One target, inside a worker process: the single-database command with its own Settings and Run.

Workers are forked from a forkserver that imported the runner, Alembic and SQLAlchemy once, and
each runs its targets one after another: Alembic's `context` and `op` are module-level proxies,
so a process migrates one database at a time. Signals are taken as in the main process (a
sigwait watcher thread cancels the running statement, which rolls back); the fleet's
RUN_DEADLINE arrives as a wall-clock time, so every target stops at the same moment. A target
still running GRACE seconds after that (its server stopped answering) has its ledger row ended
from a fresh connection and its worker exits; the main process reports it as interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import select
import signal
import threading
import time
from pathlib import Path
from typing import Any

from runner import cancellation, db, dburl, registry
from runner.cancellation import LAST_WORDS_WITHIN, Cancel
from runner.config import Settings
from runner.context import Run
from runner.exitcodes import ExitCode
from runner.fleet.task import Task
from runner.log import EventLog
from runner.outcome import failure
from runner.redact import redact
from runner.report import finish, stuck_error

# what a target's result carries from its run's summary (the rest stays in its log lines)
KEPT = ("from", "to", "head", "pending", "pending_pre_deploy", "pending_post_deploy", "applied",
        "backup")
ERROR_CHARS = 300
# seconds after a signal or the deadline before a target that has not stopped is abandoned: short,
# so that its ledger row is ended before the main process gives up on the worker (pool.GIVE_UP)
GRACE = 1.0


class TargetLog(EventLog):
    """The event log of one target's run: every line says which target it is about."""

    def __init__(self, fmt: str, target: str) -> None:
        super().__init__(fmt)
        self.target = target

    def __call__(self, event: str, msg: str = "", level: str = "info", **fields: Any) -> None:
        super().__call__(event, msg, level, **{"target": self.target, **fields})


@dataclasses.dataclass
class _Worker:
    settings: Settings
    cancel: Cancel
    deadline_at: float | None


_worker: _Worker | None = None
_busy = threading.Lock()  # held while a target runs
_current: Run | None = None  # the target's run while it runs


def init(settings: Settings, deadline_at: float | None, main_pid: int) -> None:
    """Set a worker process up (ProcessPoolExecutor initializer): signals, deadline, parent death."""
    global _worker
    log = EventLog(settings.log_format)
    cancel = Cancel()  # one per process: a signal stops this target and every later one
    backstop = cancellation.install(cancel, log, GRACE)
    backstop.last_words = _last_words
    if deadline_at is not None:
        cancellation.start_deadline(cancel, max(0.001, deadline_at - time.time()), backstop)
    db.install_statement_guard(Run(settings=settings, log=log, command="fleet", cancel=cancel))
    threading.Thread(target=_stop_with, args=(main_pid,), name="main-watch", daemon=True).start()
    _worker = _Worker(settings, cancel, deadline_at)


def _stop_with(main_pid: int) -> None:
    """When the fleet's main process dies (SIGKILL, OOM kill), stop this worker as SIGTERM would:
    cancel the running statement (the watcher thread does), then exit once the target is done,
    instead of waiting for work that will never come."""
    try:
        fd = os.pidfd_open(main_pid)  # readable once the process has exited (zombie included)
        select.select([fd], [], [])
    except OSError:  # no pidfd (old kernel, seccomp): look once a second instead
        while _alive(main_pid):
            time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)
    with _busy:
        os._exit(int(ExitCode.SIGTERM))


def _last_words(code: int, why: str) -> int | None:
    """The backstop's: end the stuck target's ledger row (a fresh connection, bounded) and let the
    worker exit; None when no target is running (the worker stays for the pool to shut down)."""
    run = _current
    if run is None or not run.ending.claim():
        return None
    run.ending.abandoned = True
    finish(run, ExitCode(code), stuck_error(why), within=LAST_WORDS_WITHIN)
    run.ending.reported(code)
    return code


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def execute(task: Task) -> dict[str, Any]:
    """Run the command on one target; return its result (never raises for the target's failures)."""
    with _busy:
        return _execute(task)


def _execute(task: Task) -> dict[str, Any]:
    assert _worker is not None, "init() runs first in every worker"
    cancel, t0 = _worker.cancel, time.monotonic()
    if cancel.is_set:  # a signal or the deadline came before this target started
        return {"target": task.name, "exit_code": None, "outcome": "not started",
                "error": str(cancel.error())}
    # parsing again registers the URL's password with redact() in this process
    settings = dataclasses.replace(_worker.settings, database_url=dburl.parse(task.url),
                                   run_deadline=_remaining(_worker.deadline_at),
                                   termination_message_path=None)
    run = Run(settings=settings, log=TargetLog(settings.log_format, task.name), command=task.command,
              cancel=cancel, tenant=task.tenant)
    global _current
    _current = run
    try:
        _dispatch(run, task)
        code, error = ExitCode.OK, None
    except Exception as exc:  # noqa: BLE001 - this target's "main": a bug fails the target, not the fleet
        code, error = failure(exc, run)
    if run.ending.claim():
        _current = None
        finish(run, code, error)
        run.ending.reported(int(code))
    else:  # the backstop ended it meanwhile, and ends this process
        run.ending.wait(cancellation.EXIT_WITHIN)
    return _result(task, run, code, error, time.monotonic() - t0)


def _dispatch(run: Run, task: Task) -> None:
    args = argparse.Namespace(command=task.command, **task.options)
    with contextlib.redirect_stdout(io.StringIO()):  # status: the main process prints one table
        registry.handler(task.command)(run, args)


def _remaining(deadline_at: float | None) -> float:
    """This target's RUN_DEADLINE: what is left of the fleet's (0 = none)."""
    return 0.0 if deadline_at is None else max(0.001, deadline_at - time.time())


def _result(task: Task, run: Run, code: ExitCode, error: str | None, took: float) -> dict[str, Any]:
    if code == ExitCode.OK:
        outcome = run.summary.get("outcome", "ok")
    elif code in (ExitCode.SIGTERM, ExitCode.SIGINT, ExitCode.RUN_DEADLINE):
        outcome = "interrupted"  # stopped cleanly at a revision boundary, not broken
    else:
        outcome = "behind head" if code == ExitCode.PENDING else "failed"
    result: dict[str, Any] = {"target": task.name, "exit_code": int(code), "outcome": outcome,
                              "seconds": round(took, 2), "run_id": run.run_id}
    result.update({k: run.summary[k] for k in KEPT if k in run.summary})
    if error:
        result["error"] = redact((error.strip().splitlines() or [""])[0])[:ERROR_CHARS]
    return result
