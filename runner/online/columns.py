"""add_column_online / drop_column_online: a column with a volatile default or NOT NULL, without
rewriting or scanning the table under ACCESS EXCLUSIVE.

A default PostgreSQL can store once (a constant, now(): PostgreSQL 11+ keeps it in the catalog)
needs nothing more: one ADD COLUMN, NOT NULL included, is instant. Any other default (random(),
gen_random_uuid(), clock_timestamp()...) would rewrite the table: the column is added nullable
with the default for new rows only (ADD COLUMN, ALTER COLUMN SET DEFAULT in one statement: no
rewrite), the existing rows are backfilled in batches, then NOT NULL is set without a scan under
ACCESS EXCLUSIVE (runner.online.constraints).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from runner.errors import MigrationFailed
from runner.online import backfill, catalog, constraints
from runner.online.session import Session
from runner.sqlname import quote


def add(s: Session, table_name: str, column: sa.Column[Any], *, schema: str | None = None,
        backfill_value: Any = None) -> None:
    """Add the column; fill the existing rows; then NOT NULL if the column says nullable=False."""
    table = catalog.table(s.conn, table_name, schema)
    if column.identity is not None or column.computed is not None:
        raise MigrationFailed(f"{s.what}: identity and generated columns are written by PostgreSQL "
                              "itself: use op.add_column")
    default = default_sql(s, column)
    value = backfill.render_sql(s, backfill_value) if backfill_value is not None else default
    if not column.nullable and default is None:
        raise MigrationFailed(f"{s.what}: a NOT NULL column needs a server_default: the application "
                              "code that runs before this deploy inserts rows without it")
    name, type_sql = column.name, s.compile(column.type)
    add_sql = f"ALTER TABLE {table.sql} ADD COLUMN {quote(name)} {type_sql}"
    if catalog.column(s.conn, table, name) is None:
        if default is not None and backfill_value is None and stored_once(s, type_sql, default):
            not_null = "" if column.nullable else " NOT NULL"
            s.transaction("added (a default stored once: no rewrite, no backfill)",
                          [f"{add_sql} DEFAULT {default}{not_null}"], [table.oid])
            return
        set_default = f", ALTER COLUMN {quote(name)} SET DEFAULT {default}" if default else ""
        s.transaction("added nullable" + (", its default for new rows only" if default else ""),
                      [add_sql + set_default], [table.oid])
    if value is not None:
        backfill.backfill(s, table.name, {name: value}, f"{quote(name)} IS NULL", schema=table.schema,
                          name=f"{table}.{name}: add_column_online")
    if not column.nullable:
        constraints.set_not_null(s, table.name, name, schema=table.schema)


def drop(s: Session, table_name: str, column_name: str, *, schema: str | None = None) -> None:
    """DROP COLUMN (the inverse of add_column_online): a short ACCESS EXCLUSIVE, no rewrite."""
    table = catalog.table(s.conn, table_name, schema)
    if catalog.column(s.conn, table, column_name) is None:
        s.done("gone already")
        return
    s.transaction("dropped", [f"ALTER TABLE {table.sql} DROP COLUMN IF EXISTS {quote(column_name)}"],
                  [table.oid])


def default_sql(s: Session, column: sa.Column[Any]) -> str | None:
    """The column's server_default as Alembic would render it, or None."""
    if column.server_default is None:
        return None
    ddl = s.ctx.dialect.ddl_compiler(s.ctx.dialect, None)
    default = ddl.get_column_default_string(column)
    return None if default is None else s.plain(default)


def stored_once(s: Session, type_sql: str, default: str) -> bool:
    """Whether PostgreSQL can keep this default in the catalog instead of rewriting the table,
    asked of PostgreSQL itself: add it to a throwaway temporary table and see whether it did."""
    statements = ["BEGIN", "CREATE TEMPORARY TABLE runner_probe (x int) ON COMMIT DROP",
                  f"ALTER TABLE runner_probe ADD COLUMN c {type_sql} DEFAULT {default}"]
    try:
        for statement in statements:
            s.sql(statement)
        return bool(s.sql("SELECT atthasmissing FROM pg_attribute WHERE attrelid = "
                          "'runner_probe'::regclass AND attname = 'c'").scalar())
    except sa.exc.DBAPIError:  # e.g. no TEMPORARY privilege: take the way that works everywhere
        return False
    finally:
        s.rollback()
