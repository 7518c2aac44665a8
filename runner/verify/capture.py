"""Capture the SQL a revision really executes (SQLAlchemy cursor events), as the server got it.

Works for revisions that inspect the database and for env.py files that build their own engine:
the listener is on every Engine and records only between begin() and end(), which the walk
calls around a revision's first upgrade; the runner's control connections are left out. A
statement an online operation ran (op.create_index_online...) names the operation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from runner.online.session import RUNNING

CATALOG_SCHEMAS = ("pg_catalog", "information_schema")
# what the dialect runs on a new connection: not part of any revision
_DIALECT_SETUP = ("select pg_catalog.version()", "select current_schema()", "show ", "pragma ")


@dataclasses.dataclass(frozen=True)
class Statement:
    sql: str  # with its parameters bound, as the server received it (when the driver can say)
    version_table: bool  # Alembic's bookkeeping (create / insert / update / delete of it)
    catalog_read: bool  # reflection, the dialect's connection setup, Alembic reading its version
    operation: str | None = None  # the online operation that ran it (runner.online), if one did


class _Recorder:
    def __init__(self) -> None:
        self.target: list[Statement] | None = None
        self.version_table = "alembic_version"


_recorder = _Recorder()
_installed = False


def _install() -> None:
    global _installed
    if not _installed:
        sa.event.listen(Engine, "before_cursor_execute", _record)
        _installed = True


@contextlib.contextmanager
def capturing(version_table: str) -> Iterator[list[Statement]]:
    """Collect the statements executed while the block runs."""
    found = begin(version_table)
    try:
        yield found
    finally:
        end()


def begin(version_table: str) -> list[Statement]:
    """Start collecting executed statements into the returned list (until end())."""
    _install()
    found: list[Statement] = []
    _recorder.target, _recorder.version_table = found, version_table
    return found


def end() -> None:
    _recorder.target = None


def _record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
            executemany: bool) -> None:
    target = _recorder.target
    if target is None or conn.get_execution_options().get("runner_control"):
        return
    compiled = getattr(context, "compiled", None)
    construct = getattr(compiled, "statement", None)
    target.append(Statement(_bound(cursor, statement, parameters, executemany),
                            _is_version_table(construct, _recorder.version_table),
                            _is_catalog_read(construct, statement, _recorder.version_table),
                            RUNNING.get()))


def _bound(cursor: Any, statement: str, parameters: Any, executemany: bool) -> str:
    """The statement with its parameters inlined (psycopg2's mogrify); for executemany, the
    first row's."""
    mogrify = getattr(cursor, "mogrify", None)
    params = parameters[0] if executemany and parameters else parameters
    if mogrify is not None:
        with contextlib.suppress(Exception):  # another driver's placeholders: keep the text
            out = mogrify(statement, params)
            return out.decode() if isinstance(out, bytes) else str(out)
    return statement


def _is_version_table(construct: Any, name: str) -> bool:
    table = getattr(construct, "table", None)  # insert / update / delete
    if table is None:
        table = getattr(construct, "element", None)  # CreateTable
    return getattr(table, "name", None) == name


def _is_catalog_read(construct: Any, statement: str, version_table: str) -> bool:
    if statement.strip().lower().startswith(_DIALECT_SETUP):
        return True
    if not isinstance(construct, sa.sql.Select):
        return False
    tables = [t for f in construct.get_final_froms() for t in sa.sql.util.find_tables(f)]
    return bool(tables) and all(getattr(t, "schema", None) in CATALOG_SCHEMAS
                                or getattr(t, "name", None) == version_table for t in tables)
