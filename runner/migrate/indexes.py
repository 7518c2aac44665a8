"""INVALID indexes left by an interrupted CREATE INDEX CONCURRENTLY, and which of them are ours.

A CONCURRENTLY build that is cancelled, times out or loses its session leaves its index behind,
INVALID: never used for reads, still maintained on every write, and in the way of the retry
(`already exists`, or silently skipped with IF NOT EXISTS). Only one such index is provably
ours: the one a revision is about to build again, by that exact name, on that table, while no
build of it runs. So the check sits right before each migration statement (a cursor hook): when
the statement is `CREATE [UNIQUE] INDEX CONCURRENTLY [IF NOT EXISTS] name ON table` and that
index exists INVALID with no build in progress, it is the leftover of an earlier attempt of this
very statement: INVALID_INDEX_POLICY=drop drops it CONCURRENTLY first, `refuse` stops (exit 7)
unless this run's own previous attempt left it. Every other INVALID index is somebody else's:
reported after the migration, never touched.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from runner import db
from runner.context import Run
from runner.errors import PreflightRefused

_IDENT = r'"(?:[^"]|"")+"|[A-Za-z_][\w$]*'
CREATE_CONCURRENTLY = re.compile(
    rf"^\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?(?P<name>{_IDENT})"
    rf"\s+ON\s+(?:ONLY\s+)?(?P<table>(?:{_IDENT})(?:\s*\.\s*(?:{_IDENT}))?)",
    re.IGNORECASE)

LEFTOVER_SQL = sa.text("""
SELECT format('%I.%I', n.nspname, c.relname) AS name,
       EXISTS (SELECT 1 FROM pg_stat_progress_create_index p WHERE p.index_relid = c.oid) AS building
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE i.indrelid = to_regclass(:table) AND c.relname = :name AND NOT i.indisvalid
""")

INVALID_SQL = sa.text("""
SELECT format('%I.%I', n.nspname, c.relname) AS name, pg_get_userbyid(c.relowner) AS owner
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE NOT i.indisvalid
  AND i.indexrelid NOT IN (SELECT index_relid FROM pg_stat_progress_create_index
                           WHERE index_relid IS NOT NULL)
ORDER BY 1
""")


def parse_create(statement: str) -> tuple[str, str] | None:
    """Return (index name as stored, table as written) for CREATE INDEX CONCURRENTLY, else None."""
    m = CREATE_CONCURRENTLY.match(statement)
    if not m:
        return None
    name = m.group("name")
    name = name[1:-1].replace('""', '"') if name.startswith('"') else name.lower()
    return name, m.group("table")


class Guard:
    """Watches the migration's statements for CONCURRENTLY builds whose leftover is in the way."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.revision = ""
        self.attempted: set[tuple[str, str, str]] = set()  # (revision, name, table) tried in this run

    def before_cursor_execute(self, conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        if conn.get_execution_options().get("runner_control"):
            return
        found = parse_create(statement)
        # DROP INDEX CONCURRENTLY from another session is safe only while the migration's own
        # session has no transaction open (which a CONCURRENTLY build needs anyway)
        if found is None or not getattr(getattr(cursor, "connection", None), "autocommit", False):
            return
        attempt = (self.revision, *found)
        ours = attempt in self.attempted  # this run's previous attempt of the same revision
        self.attempted.add(attempt)
        self._clear(cursor, *found, ours=ours)

    def _clear(self, cursor: Any, name: str, table: str, ours: bool) -> None:
        search_path = _search_path(cursor)  # resolve the table as the migration does
        with db.connect(self.run, "maintain", autocommit=True, migrating=True) as conn:
            conn.execute(sa.text("SELECT set_config('search_path', :path, false)"), {"path": search_path})
            row = conn.execute(LEFTOVER_SQL, {"table": table, "name": name}).first()
            if row is None or row.building:
                return
            if self.run.settings.invalid_index_policy == "refuse" and not ours:
                raise PreflightRefused(
                    f"revision {self.revision} is about to build index {row.name}, which an interrupted "
                    f"CREATE INDEX CONCURRENTLY left INVALID: run DROP INDEX CONCURRENTLY {row.name}; "
                    "and retry, or set INVALID_INDEX_POLICY=drop")
            self.run.log.warning("index.leftover", f"dropping INVALID index {row.name}, left by an "
                                 f"interrupted build of this statement; revision {self.revision} "
                                 "builds it again", index=row.name, revision=self.revision)
            conn.execute(sa.text(f"DROP INDEX CONCURRENTLY IF EXISTS {row.name}"))


def _search_path(cursor: Any) -> str:
    """Return the migration session's search_path (env.py may have set one per tenant)."""
    probe = cursor.connection.cursor()
    try:
        probe.execute("SELECT current_setting('search_path')")
        return str(probe.fetchone()[0])
    finally:
        probe.close()


@contextlib.contextmanager
def guarded(run: Run) -> Iterator[Guard]:
    """Watch every migration statement while the block runs (engines env.py builds included)."""
    guard = Guard(run)
    sa.event.listen(Engine, "before_cursor_execute", guard.before_cursor_execute)
    try:
        yield guard
    finally:
        sa.event.remove(Engine, "before_cursor_execute", guard.before_cursor_execute)


def report_invalid(run: Run) -> None:
    """Log every INVALID index no build is working on: the runner leaves them alone."""
    try:
        with db.connect(run, "inspect", autocommit=True) as conn:
            rows = conn.execute(INVALID_SQL).all()
    except sa.exc.DBAPIError:  # reporting only: the verification that follows notices a lost server
        return
    for row in rows:
        run.log.warning("index.invalid", f"INVALID index {row.name} (owner {row.owner}) is left alone: "
                        "no pending revision builds it; if it is a stale leftover, run DROP INDEX "
                        f"CONCURRENTLY {row.name};", index=row.name, owner=row.owner)
