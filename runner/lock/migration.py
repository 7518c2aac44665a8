"""The migration lock: a session-level advisory lock on a dedicated AUTOCOMMIT connection.

Polled with pg_try_advisory_lock, never a blocking pg_advisory_lock: a blocked waiter holds a
snapshot, and CREATE INDEX CONCURRENTLY in the holder waits for every snapshot (deadlock).
The key covers database + version table, so apps sharing a server don't block each other.
Waiting is read-only, so a connection lost while waiting (a restart, a failover) is simply
opened again, within the lock deadline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner import db, retry
from runner.context import Run
from runner.errors import ConnectionLost, LockNotAcquired
from runner.lock.key import HOLDER_SQL, lock_key, split
from runner.wait.ready import reason

TRY_LOCK = sa.text("SELECT pg_try_advisory_lock(:key)")
UNLOCK = sa.text("SELECT pg_advisory_unlock(:key)")
POLL_MAX = 0.5  # seconds between two polls at most
LOG_EVERY = 10.0  # seconds between two lock.waiting lines


def holder(conn: Connection, key: int) -> dict[str, object] | None:
    """Return who holds the lock (pid, application_name, since), or None."""
    row = conn.exec_driver_sql(HOLDER_SQL, split(key)).mappings().first()
    return dict(row) if row else None


@contextlib.contextmanager
def migration_lock(run: Run, version_schema: str, version_table: str,
                   reached: Callable[[Connection], bool] | None = None) -> Iterator[Connection | None]:
    """Hold the migration lock for the block; raise LockNotAcquired at the deadline.

    While another session holds it, reached(conn) is asked on every poll: once it says the
    database already is where this run is going (another copy migrated it), the block runs with
    None instead of the lock's connection: no lock taken, nothing left to do.
    """
    session = _Session(run, version_schema, version_table)
    try:
        with run.timed("lock"):
            acquired = _acquire(run, session, reached)
        if not acquired:
            yield None
            return
        run.log("lock.acquired", "migration lock acquired", key=session.key)
        try:
            yield session.connect()
        finally:
            _release(run, session.connect(), session.key)
    finally:
        session.close()


class _Session:
    """The lock's AUTOCOMMIT connection; while waiting it may be lost and opened again."""

    def __init__(self, run: Run, version_schema: str, version_table: str) -> None:
        self.run, self.version_schema, self.version_table = run, version_schema, version_table
        self.conn: Connection | None = None
        self.key = 0  # known once connected: the key covers current_database()

    def connect(self) -> Connection:
        if self.conn is None:
            conn = db.connect(self.run, "lock", autocommit=True)
            try:
                database = conn.execute(sa.text("SELECT current_database()")).scalar_one()
            except BaseException:
                conn.close()
                raise
            self.key = lock_key(database, self.version_schema, self.version_table)
            self.conn = conn
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):  # a lost connection has nothing left to close
                self.conn.close()
            self.conn = None

    def holder(self, key: int) -> dict[str, object]:
        try:
            return holder(self.connect(), key) or {}
        except sa.exc.DBAPIError:  # reporting only: the next poll notices a lost connection
            return {}


class _Held(Exception):
    """pg_try_advisory_lock returned false: another session holds the lock."""


class _Lost(Exception):
    """The connection broke (server restart, failover) while waiting; nothing was changed."""


def _acquire(run: Run, session: _Session, reached: Callable[[Connection], bool] | None) -> bool:
    """Poll until the lock is ours (True) or reached() says it is not needed (False)."""
    limit, capped = run.limit(run.settings.lock_wait_timeout)
    t0 = run.clock()

    def attempt() -> bool:
        run.cancel.check()
        try:
            conn = session.connect()
        except sa.exc.DBAPIError as exc:  # the server went away, or is still starting up
            raise _Lost(reason(exc)) from None
        key = session.key
        try:
            got = conn.execute(TRY_LOCK, {"key": key}).scalar_one()
            if reached is not None and reached(conn):  # checked under the lock too: one query
                if got:
                    conn.execute(UNLOCK, {"key": key})
                run.log("lock.not_needed", "the database is already at the target (another copy "
                        "migrated it): nothing to do", waited_s=round(run.clock() - t0, 1))
                return False
            if got:
                return True
        except sa.exc.DBAPIError as exc:
            if not db.connection_lost(exc):
                raise
            session.close()  # waiting is safe to resume: this run has changed nothing yet
            raise _Lost(reason(exc)) from None
        raise _Held

    logged: dict[type, float] = {}  # when the last line about each kind of wait was written

    def on_retry(exc: BaseException, attempt: int, pause: float) -> None:
        if run.clock() - logged.get(type(exc), -LOG_EVERY) < LOG_EVERY:
            return  # polls are frequent; log lines need not be
        logged[type(exc)] = run.clock()
        if isinstance(exc, _Lost):
            run.log.warning("lock.reconnect", f"lost the connection while waiting for the migration "
                            f"lock ({exc}); nothing was changed: connecting again",
                            retry_in=round(pause, 2))
            return
        who = session.holder(session.key)
        run.log("lock.waiting", "another session holds the migration lock; waiting",
                holder_pid=who.get("pid"), holder_application_name=who.get("application_name"),
                holder_since=who.get("since"), waited_s=round(run.clock() - t0, 1))

    try:
        # polls stay frequent (at most POLL_MAX apart): a waiter notices at once that the holder
        # finished, and a poll is two cheap queries
        return retry.call(run, attempt, retry_on=(_Held, _Lost), limit=limit, initial=0.2,
                          maximum=POLL_MAX, jitter=0.2, on_retry=on_retry)
    except _Lost as exc:
        run.stop_if_deadline(capped)
        raise ConnectionLost(f"lost the connection while waiting for the migration lock and could "
                             f"not connect again within {limit:g}s ({exc}); nothing was changed: "
                             "retry once the database is back") from None
    except _Held:
        run.stop_if_deadline(capped)
        who = session.holder(session.key)
        raise LockNotAcquired(
            f"migration lock not acquired within {limit:g}s; held by pid {who.get('pid')} "
            f"({who.get('application_name') or 'no application_name'}) since {who.get('since')}: "
            "wait for that run to finish, or raise LOCK_WAIT_TIMEOUT") from None


def _release(run: Run, conn: Connection, key: int) -> None:
    try:
        released = conn.execute(UNLOCK, {"key": key}).scalar_one()
    except sa.exc.DBAPIError as exc:
        # the session is gone, and with it the lock
        if run.summary.get("swapped"):  # a parallel restore ended it on purpose
            run.log("lock.released", "migration lock released: its session ended with the swap")
            return
        run.log.warning("lock.release", f"could not release explicitly ({type(exc.orig).__name__}); "
                      "the lock ended with the session")
        return
    if released:
        run.log("lock.released", "migration lock released")
    else:
        run.log.warning("lock.release", "the migration lock was not held at release time")
