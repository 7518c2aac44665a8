"""CONCURRENTLY statements keep MIGRATION_LOCK_TIMEOUT under the escalating schedule.

The escalating lock_timeout schedule is short because a queued DDL stalls the application's
queries on its table. CREATE INDEX / DROP INDEX / REINDEX ... CONCURRENTLY never do: they take
SHARE UPDATE EXCLUSIVE, which no read or write waits for, and then wait for older transactions
and snapshots, which obeys lock_timeout too. Cut to 100 ms, that wait fails even on a tiny table
whenever any transaction is a little older than the build, and every retry builds the whole
index again. So, right before such a statement, a cursor hook raises the session's lock_timeout
to MIGRATION_LOCK_TIMEOUT (never lowers it, never turns it off) and puts it back afterwards.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from runner.context import Run

STATEMENT = re.compile(
    r"^\s*(?:CREATE\s+(?:UNIQUE\s+)?INDEX|DROP\s+INDEX|REINDEX\s+(?:\([^)]*\)\s*)?"
    r"(?:INDEX|TABLE|SCHEMA|DATABASE|SYSTEM))\s+CONCURRENTLY\b", re.IGNORECASE)
_READ = "SELECT setting::int FROM pg_settings WHERE name = 'lock_timeout'"
_SET = "SELECT set_config('lock_timeout', %s, false)"


class Hook:
    """Raises lock_timeout around each CONCURRENTLY statement of the migration's sessions."""

    def __init__(self, run: Run) -> None:
        self.want_ms = round(run.settings.migration_lock_timeout * 1000)
        self.previous: dict[int, int] = {}  # DBAPI connection id -> lock_timeout (ms) to restore

    def before(self, conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        dbapi = getattr(cursor, "connection", None)
        # CONCURRENTLY runs only outside a transaction block (autocommit_block()); elsewhere it fails
        if (conn.get_execution_options().get("runner_control") or not STATEMENT.match(statement)
                or not getattr(dbapi, "autocommit", False)):
            return
        try:
            cur = dbapi.cursor()
            try:
                cur.execute(_READ)
                current = int(cur.fetchone()[0])
                if current == 0 or current >= self.want_ms:  # off (env.py's choice) or already longer
                    return
                cur.execute(_SET, (f"{self.want_ms}ms",))
            finally:
                cur.close()
        except Exception:  # noqa: BLE001 - a driver that cannot do this: the statement runs as it is
            return
        self.previous[id(dbapi)] = current

    def after(self, conn: Connection, cursor: Any, *args: Any) -> None:
        self._restore(getattr(cursor, "connection", None))

    def failed(self, context: Any) -> None:
        """A failed statement: put the value back too, for a revision that catches the error."""
        try:
            self._restore(getattr(context.cursor, "connection", None))
        except Exception:  # noqa: BLE001 - the session may be gone; the attempt's error matters
            pass

    def _restore(self, dbapi: Any) -> None:
        previous = self.previous.pop(id(dbapi), None)
        if previous is not None:
            cur = dbapi.cursor()
            try:
                cur.execute(_SET, (f"{previous}ms",))
            finally:
                cur.close()


@contextlib.contextmanager
def guarded(run: Run) -> Iterator[Hook]:
    """Watch every migration statement while the block runs (engines env.py builds included)."""
    hook = Hook(run)
    events = (("before_cursor_execute", hook.before), ("after_cursor_execute", hook.after),
              ("handle_error", hook.failed))
    for name, fn in events:
        sa.event.listen(Engine, name, fn)
    try:
        yield hook
    finally:
        for name, fn in events:
            sa.event.remove(Engine, name, fn)
