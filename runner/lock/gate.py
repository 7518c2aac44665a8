"""A start-up gate for storms of identical upgrades: one copy leads, the others wait cheaply.

When many copies of the same Job start at once (a scaled-out deploy, Helm and Argo hooks
together), each would import SQLAlchemy and Alembic and run env.py, most of a run's CPU, only to
wait for the migration lock and find nothing to do; on a small node they slow the one copy that
migrates. With the no-op facts recorded in the image (runner.fastpath), the version table is known
before any of that. So a copy that finds the database behind the recorded head takes a second
advisory lock, the gate (its key derived like the migration lock's), on a plain psycopg2
connection it keeps until it exits, and runs the full path. A copy that finds the gate held polls
the version table every POLL seconds, read-only: at the recorded head it is done (nothing to do);
when the gate is free it takes it and leads. The gate is only an optimisation: the migration lock
still serializes every migration, and copies without facts never look at the gate.
"""

from __future__ import annotations

from typing import Any

from runner.context import Run
from runner.errors import LockNotAcquired
from runner.lock.key import HOLDER_SQL, lock_key, split
from runner.sqlname import qualified

POLL = 0.5  # seconds between two looks
LOG_EVERY = 10.0
_held: list[Any] = []  # the leader's gate connection: open until the process exits



def lead_or_wait(run: Run, params: dict[str, Any], schema: str | None, table: str,
                 heads: tuple[str, ...]) -> bool:
    """Return True when another copy brought the database to heads while this one waited (nothing
    to do); False when this copy leads (the gate is held until it exits) or nothing is certain
    (then the full path decides, as without the gate)."""
    try:
        import psycopg2
    except ImportError:
        return False
    try:
        conn = psycopg2.connect(**params, application_name=run.app_name("gate"), connect_timeout=2)
    except psycopg2.Error:  # the full path connects, retries and explains
        return False
    conn.autocommit = True
    try:
        return _wait(run, conn, schema, table, heads)
    except psycopg2.Error:  # e.g. a restart: the full path reconnects and decides
        conn.close()
        return False
    except BaseException:  # a signal, the run deadline, the gate's deadline: the run ends so
        conn.close()
        raise


def _wait(run: Run, conn: Any, schema: str | None, table: str, heads: tuple[str, ...]) -> bool:
    cur = conn.cursor()
    cur.execute("SELECT current_database()")
    key = lock_key(cur.fetchone()[0], schema or "", table, purpose="alembic-migrate-gate")
    limit, capped = run.limit(run.settings.lock_wait_timeout)
    t0 = run.clock()
    logged = -LOG_EVERY
    while True:
        cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
        mine = cur.fetchone()[0]
        if _stamped(cur, schema, table) == list(heads):
            if mine:
                cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
            conn.close()
            run.log("lock.not_needed", "the database is already at the target (another copy "
                    "migrated it): nothing to do", waited_s=round(run.clock() - t0, 1))
            return True
        if mine:
            _held.append(conn)  # lead: the full path takes the migration lock and migrates
            return False
        if run.clock() - t0 >= limit:
            run.stop_if_deadline(capped)
            raise LockNotAcquired(f"another copy of this upgrade has held the start-up gate for "
                                  f"{limit:g}s ({_holder(cur, key)}): wait for that run to finish, or "
                                  "raise LOCK_WAIT_TIMEOUT")
        if run.clock() - logged >= LOG_EVERY:
            logged = run.clock()
            run.log("lock.waiting", f"another copy of this upgrade is migrating ({_holder(cur, key)}); "
                    "waiting for it", waited_s=round(run.clock() - t0, 1))
        run.cancel.sleep(POLL)


def _stamped(cur: Any, schema: str | None, table: str) -> list[str] | None:
    """The revisions in the version table, or None when there is none yet."""
    name = qualified(schema, table)
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
    if not cur.fetchone()[0]:
        return None
    cur.execute(f"SELECT version_num FROM {name}")
    return [row[0] for row in cur.fetchall()]


def _holder(cur: Any, key: int) -> str:
    cur.execute(HOLDER_SQL, split(key))
    row = cur.fetchone()
    return f"pid {row[0]}, {row[1] or 'no application_name'}" if row else "it has just finished"

