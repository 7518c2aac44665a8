"""Weigh what a revision was observed to do by the size of production's tables (--against).

Sizes come from the live database's statistics only: pg_class.relpages and reltuples (kept by
VACUUM and ANALYZE, autovacuum included) of the table, its TOAST table and its indexes, and
pg_stat_user_tables.n_live_tup, read in a read-only transaction like the drift check. No
function that opens a table (pg_relation_size, pg_total_relation_size take ACCESS SHARE): no
lock on any table, nothing written. A table never vacuumed nor analyzed (reltuples = -1) has no
known size, unless no row was ever written to it (n_live_tup = 0: a table the last deploy
created).

Time is estimated from rates measured on the verify server right then (a table of CALIBRATION_ROWS
rows built in the scratch database, then rewritten, indexed and validated), applied to the live
sizes: a rewrite copies the table, its TOAST and rebuilds its indexes; an index build and a
validation scan read the table. A lock is held until its transaction commits, so every strong
lock of a transaction is held for all the work that transaction does. The estimate is an order
of magnitude on the verify server's hardware, not a promise about production's.
"""

from __future__ import annotations

import dataclasses
import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner.context import Run
from runner.dburl import DbUrl
from runner.verify import drift
from runner.verify.observe import DML, Touch

CALIBRATION_ROWS = 100_000

_SIZES = sa.text(r"""
SELECT format('%I.%I', n.nspname, c.relname), c.relpages::bigint * current_setting('block_size')::bigint,
       coalesce(t.relpages, 0)::bigint * current_setting('block_size')::bigint,
       (SELECT coalesce(sum(i.relpages), 0) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
        WHERE x.indrelid = c.oid)::bigint * current_setting('block_size')::bigint,
       c.reltuples::float8, s.n_live_tup
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_class t ON t.oid = c.reltoastrelid
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.relkind IN ('r', 'p', 'm') AND format('%I.%I', n.nspname, c.relname) = ANY(CAST(:names AS text[]))
""")


@dataclasses.dataclass(frozen=True)
class Size:
    """A live table's size from its statistics."""

    table_bytes: int
    toast_bytes: int
    index_bytes: int
    rows: float  # reltuples; -1 when never vacuumed nor analyzed

    @property
    def known(self) -> bool:
        return self.rows >= 0

    @property
    def total_bytes(self) -> int:
        return self.table_bytes + self.toast_bytes + self.index_bytes


@dataclasses.dataclass(frozen=True)
class Rates:
    """Bytes per second the verify server managed, per kind of work."""

    rewrite: float  # ALTER COLUMN TYPE: table + TOAST copied, indexes rebuilt
    build: float  # CREATE INDEX: table read, index written
    scan: float  # a validation scan (ADD CHECK): table read

    def as_dict(self) -> dict[str, float]:
        return {k: round(v / 1e6, 1) for k, v in dataclasses.asdict(self).items()}


def read_sizes(run: Run, url: DbUrl, var: str, names: list[str]) -> dict[str, Size]:
    """The live sizes of these tables (schema.table), read-only; missing ones are left out."""
    if not names:
        return {}
    with drift.read_only(run, url, var) as conn:
        rows = conn.execute(_SIZES, {"names": sorted(set(names))}).all()
    # never vacuumed nor analyzed (reltuples -1): known only when no row was ever written to it
    return {name: Size(heap, toast, index, rows if rows >= 0 else 0.0 if live == 0 else -1.0)
            for name, heap, toast, index, rows, live in rows}


def calibrate(conn: Connection) -> Rates:
    """Measure this server's rewrite, index build and scan rates on a table of its own, in one
    transaction rolled back at the end (conn: the scratch database)."""
    with conn.begin() as trans:
        # a real table (WAL-logged like production's), in a schema of its own, all rolled back
        conn.exec_driver_sql("CREATE SCHEMA runner_verify_calibration")
        conn.exec_driver_sql(
            "CREATE TABLE runner_verify_calibration.t AS "
            "SELECT g::bigint AS id, md5(g::text) || md5((g * 7)::text) AS payload "
            f"FROM generate_series(1, {CALIBRATION_ROWS}) g")
        conn.exec_driver_sql("ALTER TABLE runner_verify_calibration.t ADD PRIMARY KEY (id)")
        heap = conn.exec_driver_sql("SELECT pg_table_size('runner_verify_calibration.t')").scalar()
        build = _timed(conn, "CREATE INDEX ON runner_verify_calibration.t (payload)")
        scan = _timed(conn, "ALTER TABLE runner_verify_calibration.t ADD CHECK (id > 0)")
        index = conn.exec_driver_sql("SELECT pg_indexes_size('runner_verify_calibration.t')").scalar()
        rewrite = _timed(conn, "ALTER TABLE runner_verify_calibration.t ALTER COLUMN id TYPE numeric")
        trans.rollback()
    return Rates(rewrite=(heap + index) / rewrite, build=heap / build, scan=heap / scan)


def _timed(conn: Connection, statement: str) -> float:
    t0 = time.perf_counter()
    conn.exec_driver_sql(statement)
    return max(time.perf_counter() - t0, 1e-6)


def work(touch: Touch, size: Size | None, rates: Rates) -> float:
    """Seconds the work done on one table in a transaction would take at its live size."""
    if size is None or not size.known:
        return 0.0
    if touch.rewritten:
        return size.total_bytes / rates.rewrite
    if not touch.scanned:
        return 0.0
    if touch.mode == "ShareLock":  # CREATE INDEX (not CONCURRENTLY): the table read, an index written
        return size.table_bytes / rates.build
    if DML in touch.modes:  # an UPDATE or DELETE of every row writes new row versions: a rewrite's pace
        return (size.table_bytes + size.toast_bytes) / rates.rewrite
    return size.table_bytes / rates.scan
