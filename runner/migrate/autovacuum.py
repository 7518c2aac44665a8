"""Autovacuum gives way to the migration, as PostgreSQL means it to.

An autovacuum worker holds SHARE UPDATE EXCLUSIVE on the table it works on, which conflicts with
every ALTER TABLE, CREATE INDEX CONCURRENTLY and VALIDATE. PostgreSQL cancels such a worker once a
conflicting lock request has waited deadlock_timeout (1 s) for it; an attempt under the
lock_timeout schedule (100-500 ms) gives up before that, so the worker goes on and every later
attempt queues behind it again. Right after a backfill or a data migration (millions of dead rows:
just what starts autovacuum) its vacuum can outlast the whole schedule: exit 8. (Measured by
bench/online_bench.py: after a 2,000,000-row backfill the NOT NULL step retried for 20 s, the
contract for 40 s, each behind one autovacuum.)

So when an attempt timed out behind an autovacuum worker, the runner cancels that worker
(pg_cancel_backend), as PostgreSQL would have, and says so; never one that runs to prevent
wraparound (PostgreSQL does not cancel those either). Autovacuum comes back to the table on a
later round. Only a superuser may cancel autovacuum workers (on PostgreSQL 18 also members of
pg_signal_autovacuum_worker); without that right the runner says what to grant and goes on with
the schedule.
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner.log import EventLog

# the autovacuum workers among some pids that PostgreSQL itself would cancel for a lock request
WORKERS_SQL = sa.text("""
SELECT pid, query FROM pg_stat_activity
WHERE pid = ANY(CAST(:pids AS int[])) AND backend_type = 'autovacuum worker'
  AND query NOT LIKE '%(to prevent wraparound)%'
""")


def give_way(conn: Connection, pids: Iterable[int], log: EventLog, what: str) -> list[int]:
    """Cancel the autovacuum workers among pids (sessions holding a lock that what waited for);
    log each; return the pids cancelled. conn must be in autocommit mode, outside a transaction."""
    wanted = sorted({int(p) for p in pids})
    if not wanted:
        return []
    cancelled = []
    for worker in conn.execute(WORKERS_SQL, {"pids": wanted}).all():
        try:
            ok = conn.execute(sa.text("SELECT pg_cancel_backend(:pid)"), {"pid": worker.pid}).scalar()
        except sa.exc.DBAPIError:  # permission denied: only a superuser may (18: a granted role)
            log.warning("autovacuum.kept", f"{what}: waits for an autovacuum worker (pid "
                        f"{worker.pid}: {worker.query}) that this role may not cancel; PostgreSQL "
                        "cancels it only after deadlock_timeout, longer than a lock_timeout attempt: "
                        "run the migration as a superuser or, on PostgreSQL 18, GRANT "
                        "pg_signal_autovacuum_worker to its role; retrying as scheduled",
                        pid=worker.pid)
            continue
        if ok:
            cancelled.append(worker.pid)
            log.warning("autovacuum.cancelled", f"{what}: cancelled an autovacuum worker that held "
                        f"the lock it needs (pid {worker.pid}: {worker.query}), as PostgreSQL does "
                        "after deadlock_timeout; autovacuum returns to the table later",
                        pid=worker.pid)
    return cancelled
