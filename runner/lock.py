"""The migration lock: a session-level advisory lock on a dedicated AUTOCOMMIT connection.

Polled with pg_try_advisory_lock, never a blocking pg_advisory_lock: a blocked waiter holds a
snapshot, and CREATE INDEX CONCURRENTLY in the holder waits for every snapshot (deadlock).
The key covers database + version table, so apps sharing a server don't block each other.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner import db, retry
from runner.context import Run
from runner.errors import LockNotAcquired

HOLDER_SQL = sa.text("""
SELECT a.pid, a.application_name, a.client_addr::text AS client_addr,
       to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS since,
       round(extract(epoch FROM now() - a.backend_start))::int AS held_for_s
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.database = (
        SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = :hi AND l.objid = :lo AND l.objsubid = 1
""")


def lock_key(database: str, version_schema: str, version_table: str) -> int:
    """Return a stable signed 64-bit key for database + version table."""
    digest = hashlib.sha256(f"alembic-migrate:{database}:{version_schema}.{version_table}".encode())
    return int.from_bytes(digest.digest()[:8], "big", signed=True)


def _split(key: int) -> dict[str, int]:
    """Return pg_locks' classid/objid for a bigint advisory key."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return {"hi": unsigned >> 32, "lo": unsigned & 0xFFFFFFFF}


def holder(conn: Connection, key: int) -> dict[str, object] | None:
    """Return who holds the lock (pid, application_name, since), or None."""
    row = conn.execute(HOLDER_SQL, _split(key)).mappings().first()
    return dict(row) if row else None


@contextlib.contextmanager
def migration_lock(run: Run, version_schema: str, version_table: str) -> Iterator[Connection]:
    """Hold the migration lock for the block; raise LockNotAcquired at the deadline."""
    conn = db.connect(run, "lock", autocommit=True)
    try:
        database = conn.execute(sa.text("SELECT current_database()")).scalar_one()
        key = lock_key(database, version_schema, version_table)
        with run.timed("lock"):
            _acquire(run, conn, key)
        run.log("lock.acquired", "migration lock acquired", key=key)
        try:
            yield conn
        finally:
            _release(run, conn, key)
    finally:
        conn.close()


class _Held(Exception):
    """pg_try_advisory_lock returned false: another session holds the lock."""


def _acquire(run: Run, conn: Connection, key: int) -> None:
    limit, capped = run.limit(run.settings.lock_wait_timeout)
    try_lock = sa.text("SELECT pg_try_advisory_lock(:key)")
    t0 = run.clock()

    def attempt() -> None:
        run.cancel.check()
        if not conn.execute(try_lock, {"key": key}).scalar_one():
            raise _Held

    def on_retry(exc: BaseException, attempt: int, pause: float) -> None:
        who = holder(conn, key) or {}
        run.log("lock.waiting", "another session holds the migration lock; waiting",
                holder_pid=who.get("pid"), holder_application_name=who.get("application_name"),
                holder_since=who.get("since"), waited_s=round(run.clock() - t0, 1))

    try:
        retry.call(run, attempt, retry_on=(_Held,), limit=limit, initial=0.2, maximum=2.0,
                   jitter=0.3, on_retry=on_retry)
    except _Held:
        run.stop_if_deadline(capped)
        who = holder(conn, key) or {}
        raise LockNotAcquired(
            f"migration lock not acquired within {limit:g}s; held by pid {who.get('pid')} "
            f"({who.get('application_name') or 'no application_name'}) since {who.get('since')}: "
            "wait for that run to finish, or raise LOCK_WAIT_TIMEOUT") from None


def _release(run: Run, conn: Connection, key: int) -> None:
    try:
        released = conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key}).scalar_one()
    except sa.exc.DBAPIError as exc:
        # the session is gone, and with it the lock
        run.log.warning("lock.release", f"could not release explicitly ({type(exc.orig).__name__}); "
                      "the lock ended with the session")
        return
    if released:
        run.log("lock.released", "migration lock released")
    else:
        run.log.warning("lock.release", "the migration lock was not held at release time")
