"""The migration lock on a SQLite file: flock() on a lock file next to the database.

SQLite's own locks last one transaction; a run applies one transaction per revision, so two
runners could interleave their revisions. The kernel's flock() on `app.db-migration-lock` holds
for the whole run and is released when the process ends, however it ends (SIGKILL, OOM): no stale
lock to clean up. It is polled (never a blocking flock), within LOCK_WAIT_TIMEOUT; waiters read
the holder written into the file (pid, host, run, command, since) and, on every poll, the version
table: once another copy brought the database to the target they stop without the lock. The lock
covers the whole file (every version table in it): backup and restore take it too. The lock
file is never deleted (a waiter may hold it open), as SQLite leaves its own files in place.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner import retry
from runner.context import Run
from runner.errors import ConfigError, LockNotAcquired
from runner.sqlite import engine, files

POLL_MAX = 0.5  # seconds between two polls at most
LOG_EVERY = 10.0  # seconds between two lock.waiting lines


class _Held(Exception):
    """Another process holds the lock."""


@contextlib.contextmanager
def migration_lock(run: Run, version_schema: str, version_table: str,
                   reached: Callable[[Connection], bool] | None = None) -> Iterator[Connection | None]:
    """Hold the lock for the block (runner.lock.migration's contract): yield a connection to the file, or
    None when reached() says another copy already brought the database where this run goes."""
    path = files.lock_path(run.settings.database_url)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot open the lock file {path} ({exc.strerror}): the directory must be "
                          "writable by the runner") from None
    try:
        with engine.engine(run, "lock").connect() as conn:
            with run.timed("lock"):
                acquired = _acquire(run, fd, conn, reached)
            if not acquired:
                yield None
                return
            _write_holder(run, fd)
            run.log("lock.acquired", "migration lock acquired", lock_file=str(path))
            try:
                yield conn
            finally:
                os.ftruncate(fd, 0)  # a later waiter must not report a holder that has gone
                fcntl.flock(fd, fcntl.LOCK_UN)
                run.log("lock.released", "migration lock released")
    finally:
        os.close(fd)  # closing it would release the lock too, as the kernel does at exit


def _acquire(run: Run, fd: int, conn: Connection, reached: Callable[[Connection], bool] | None) -> bool:
    """Poll until the lock is ours (True) or reached() says it is not needed (False)."""
    limit, capped = run.limit(run.settings.lock_wait_timeout)
    t0 = run.clock()

    def attempt() -> bool:
        run.cancel.check()
        got = _try(fd)
        if reached is not None and _there(conn, reached):  # checked under the lock too
            if got:
                fcntl.flock(fd, fcntl.LOCK_UN)
            run.log("lock.not_needed", "the database is already at the target (another copy "
                    "migrated it): nothing to do", waited_s=round(run.clock() - t0, 1))
            return False
        if got:
            return True
        raise _Held

    logged = [-LOG_EVERY]

    def on_retry(exc: BaseException, attempt: int, pause: float) -> None:
        if run.clock() - logged[0] < LOG_EVERY:
            return
        logged[0] = run.clock()
        who = holder(fd)
        run.log("lock.waiting", "another runner holds the migration lock; waiting",
                holder_pid=who.get("pid"), holder_host=who.get("host"), holder_run=who.get("run_id"),
                holder_since=who.get("since"), waited_s=round(run.clock() - t0, 1))

    try:
        return retry.call(run, attempt, retry_on=(_Held,), limit=limit, initial=0.2,
                          maximum=POLL_MAX, jitter=0.2, on_retry=on_retry)
    except _Held:
        run.stop_if_deadline(capped)
        who = holder(fd)
        by = (f"held by pid {who.get('pid')} on {who.get('host')} ({who.get('command')}, run "
              f"{who.get('run_id')}) since {who.get('since')}" if who else "held by another process")
        raise LockNotAcquired(f"migration lock not acquired within {limit:g}s; {by}: wait for that "
                              "run to finish, or raise LOCK_WAIT_TIMEOUT") from None


def _try(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _there(conn: Connection, reached: Callable[[Connection], bool]) -> bool:
    """Return reached(conn); a file busy with the holder's commit right now counts as not there yet."""
    try:
        return reached(conn)
    except sa.exc.OperationalError as exc:
        if "locked" in str(exc.orig):
            return False
        raise
    finally:
        if conn.in_transaction():
            conn.rollback()  # a read transaction left open would block the holder's commits


def _write_holder(run: Run, fd: int) -> None:
    """Say who holds the lock, for the waiters' messages (the lock itself is the flock)."""
    since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": run.run_id,
                       "command": run.command, "since": since}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, text, 0)


def holder(fd: int) -> dict[str, Any]:
    """Return who holds the lock as the holder wrote it ({} when unknown)."""
    try:
        found = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}
