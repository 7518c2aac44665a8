"""CREATE / DROP INDEX CONCURRENTLY with each of their two kinds of wait bounded the right way.

Such a statement waits for its table lock (SHARE UPDATE EXCLUSIVE; a DROP also takes ACCESS
EXCLUSIVE on the index at its end, which queues the application's queries on the table behind
it), and for transactions older than itself: first those writing the table, then every older
snapshot in the database (virtualxid waits, which hold nothing the application needs).
lock_timeout cannot tell the two apart: a short one makes the build fail even on a tiny table as
soon as any transaction in the database is older than it; a long one lets the table-lock wait
stall the application.

So a watcher on a second connection looks at what the statement waits for (pg_locks, every
10-50 ms): a wait for a relation lock longer than the attempt's lock_timeout is cancelled and
retried under the lock_timeout schedule like any DDL; the waits for older transactions may add up
to ONLINE_INDEX_WAIT_TIMEOUT, after which the statement is cancelled and the run exits 8 naming
those transactions. The statement's own lock_timeout sits a few seconds above that: a server-side
backstop for every single wait, should the watcher fail.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner.errors import LockRetriesExhausted
from runner.log import EventLog
from runner.migrate.lockschedule import Attempt
from runner.online.session import LOCK_NOT_AVAILABLE, LockWait, Session, describe, sqlstate

BLOCKERS_SQL = sa.text("""
SELECT a.pid, a.application_name, a.state,
       round(extract(epoch FROM now() - a.xact_start))::int AS xact_age_s, left(a.query, 400) AS query
FROM unnest(pg_blocking_pids(:pid)) AS b(pid) JOIN pg_stat_activity a ON a.pid = b.pid
ORDER BY a.xact_start NULLS LAST
LIMIT 5
""")
BACKSTOP_MARGIN = 5.0  # the server-side lock_timeout stays behind the watcher's own limits
REPORT_AFTER = 5.0  # seconds of waiting for older transactions before the first log line
REPORT_EVERY = 30.0


def wait_sql(server_version: tuple[int, ...]) -> sa.TextClause:
    """What the statement's backend waits for; PostgreSQL 14+ also says since when."""
    waited = ("extract(epoch FROM clock_timestamp() - l.waitstart)" if server_version >= (14,)
              else "NULL::float8")
    return sa.text(f"SELECT l.locktype, {waited} AS waited_s FROM pg_locks l "
                   "WHERE l.pid = :pid AND NOT l.granted LIMIT 1")


class Watcher(threading.Thread):
    """Cancel the statement of backend pid when its table-lock wait outlasts lock_timeout, or its
    waits for older transactions add up to patience; verdict says which ("lock", "older")."""

    def __init__(self, side: Connection, pid: int, lock_timeout: float, patience: float,
                 log: EventLog, what: str) -> None:
        super().__init__(name="online-watcher", daemon=True)
        self.side, self.pid, self.lock_timeout, self.patience = side, pid, lock_timeout, patience
        self.log, self.what = log, what
        self.verdict: str | None = None
        self.blockers: list[Any] = []  # the sessions it waited for when it cancelled (rows)
        self.older_waited = 0.0
        self._stop_event = threading.Event()
        self._sql = wait_sql(side.dialect.server_version_info or (0,))

    def run(self) -> None:  # type: ignore[override]
        try:
            self._watch()
        except Exception:  # noqa: BLE001 - best effort: the backstop lock_timeout still bounds each wait
            return

    def _watch(self) -> None:
        poll = max(0.01, min(0.05, self.lock_timeout / 4))
        first_seen: float | None = None  # of the current relation wait (servers before 14)
        report_at, last = REPORT_AFTER, time.monotonic()
        while not self._stop_event.wait(poll):
            row = self.side.execute(self._sql, {"pid": self.pid}).first()
            now = time.monotonic()
            elapsed, last = now - last, now
            if row is None or row.locktype != "relation":
                first_seen = None
            if row is None:
                continue
            if row.locktype == "relation":
                first_seen = first_seen or now
                waited = row.waited_s if row.waited_s is not None else now - first_seen
                if waited >= self.lock_timeout:
                    return self._cancel("lock")
                continue
            self.older_waited += elapsed
            if self.older_waited >= self.patience:
                return self._cancel("older")
            if self.older_waited >= report_at:
                report_at += REPORT_EVERY
                self.log("online.wait", f"{self.what}: waiting {self.older_waited:.0f}s for older "
                         "transactions to finish (this holds no lock the application needs)",
                         blockers=describe(self._blockers()) or None)

    def _blockers(self) -> list[Any]:
        return list(self.side.execute(BLOCKERS_SQL, {"pid": self.pid}).all())

    def _cancel(self, verdict: str) -> None:
        self.verdict = verdict  # before the cancel: the statement fails right after it
        self.blockers = self._blockers()
        self.side.execute(sa.text("SELECT pg_cancel_backend(:pid)"), {"pid": self.pid})

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def run(s: Session, step: str, statement: str, prepare: Callable[[], bool] | None = None) -> None:
    """Run one CONCURRENTLY statement on the revision's connection, retrying table-lock waits
    under the lock_timeout schedule. prepare() runs before every attempt (it removes what a
    failed attempt left) and returns True when the work turns out to be done already."""
    patience = s.settings.online_index_wait_timeout
    verb = " ".join(word for word in statement.split()[:6] if word.isupper())
    pid = s.sql("SELECT pg_backend_pid()").scalar_one()
    side = s.side()  # connected before the statement starts: the watcher is ready at once

    def attempt(a: Attempt) -> bool:
        """Whether the statement ran (False: prepare() found the work done)."""
        if prepare is not None and prepare():
            return False
        s.set_lock_timeout(patience + BACKSTOP_MARGIN)  # in case the watcher cannot watch
        watcher = Watcher(side, pid, a.lock_timeout, patience, s.run.log, s.what)
        watcher.start()
        failure: sa.exc.DBAPIError | None = None
        try:
            s.sql(statement)
        except sa.exc.DBAPIError as exc:
            failure = exc
        finally:
            watcher.stop()  # its verdict is final from here on
        if failure is None:
            return True
        s.run.cancel.check()  # SIGTERM or the deadline cancelled it: say so
        if watcher.verdict == "lock":
            raise LockWait(verb, watcher.blockers)
        if watcher.verdict == "older" or sqlstate(failure) == LOCK_NOT_AVAILABLE:
            who = f" ({'; '.join(describe(watcher.blockers))})" if watcher.blockers else ""
            raise LockRetriesExhausted(
                f"{s.what}: {verb} waited {watcher.older_waited:.1f}s for older transactions to "
                f"finish (ONLINE_INDEX_WAIT_TIMEOUT={patience:g}s) and was cancelled{who}; a rerun "
                "rebuilds what it left: end those transactions or retry once they are done")
        raise failure

    if s.retried(attempt):
        s.done(step)
