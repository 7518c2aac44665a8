"""A real autovacuum worker, slowed down, holding its SHARE UPDATE EXCLUSIVE lock on one table."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tests.conftest import Database, wait_for

# the worker sleeps 100-400 ms per page (cost_limit 1): a table of a few dozen pages takes many
# seconds, far longer than a short lock_timeout schedule
SLOW = ("autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0, "
        "autovacuum_analyze_threshold = 0, autovacuum_analyze_scale_factor = 0, "
        "autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1")
WORKER_SQL = ("SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
              "WHERE a.backend_type = 'autovacuum worker' AND l.granted AND l.locktype = 'relation' "
              "AND l.relation = '{table}'::regclass")


@contextlib.contextmanager
def vacuuming(db: Database, table: str, dirty: str) -> Iterator[int]:
    """Yield the pid of an autovacuum worker on table, once it holds its lock there.

    dirty (SQL) leaves dead rows behind. The cluster is shared: autovacuum_naptime goes down to
    1 s until the worker started, then autovacuum is off (no second worker takes the table up
    after the first is cancelled) until the block ends; both are put back."""
    db.sql(f"ALTER TABLE {table} SET ({SLOW})")
    db.sql(dirty)
    found: list[str] = []
    try:
        _system(db, "ALTER SYSTEM SET autovacuum_naptime = 1")
        wait_for(lambda: found.append(db.sql(WORKER_SQL.format(table=table))) or found[-1],
                 timeout=60, every=0.1, what=f"no autovacuum worker took up {table}")
        _system(db, "ALTER SYSTEM SET autovacuum = off")
        yield int(found[-1].split()[0])
    finally:
        _system(db, "ALTER SYSTEM RESET autovacuum_naptime")
        _system(db, "ALTER SYSTEM RESET autovacuum")


def _system(db: Database, statement: str) -> None:
    db.cluster.psql(statement)
    db.cluster.psql("SELECT pg_reload_conf()")
