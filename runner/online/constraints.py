"""Constraints added without a full-table scan under a lock the application needs.

Foreign key and check: ADD ... NOT VALID (a short lock, no scan), then VALIDATE CONSTRAINT in a
transaction of its own (SHARE UPDATE EXCLUSIVE: reads and writes go on during its scan). A NOT
VALID constraint of that name left by an earlier attempt is validated, never added twice
(strong_migrations#271). NOT NULL: a CHECK (col IS NOT NULL) validated that way lets SET NOT NULL
skip its scan (PostgreSQL 12+); the check is dropped in the same transaction. Unique: a unique
index built CONCURRENTLY, then ADD CONSTRAINT ... USING INDEX.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic.operations import ops

from runner.errors import MigrationFailed
from runner.online import catalog, index
from runner.online.catalog import Table
from runner.online.session import Session, message, sqlstate
from runner.sqlname import quote

CHECK_VIOLATION = "23514"
FOREIGN_KEY_VIOLATION = "23503"


def foreign_key(s: Session, constraint_name: str | None, source_table: str, referent_table: str,
                local_cols: Sequence[str], remote_cols: Sequence[str], *,
                source_schema: str | None = None, referent_schema: str | None = None,
                **kw: Any) -> None:
    """ADD FOREIGN KEY ... NOT VALID, then VALIDATE CONSTRAINT."""
    name = named(s, constraint_name)
    table = catalog.table(s.conn, source_table, source_schema)
    referent = catalog.table(s.conn, referent_table, referent_schema)
    fk = ops.CreateForeignKeyOp(name, table.name, referent.name, list(local_cols), list(remote_cols),
                                source_schema=table.schema, referent_schema=referent.schema,
                                postgresql_not_valid=True, **kw).to_constraint(s.ctx)
    add_and_validate(s, table, name, s.compile(sa.schema.AddConstraint(fk)), [table.oid, referent.oid])


def check(s: Session, constraint_name: str | None, table_name: str, condition: Any, *,
          schema: str | None = None, **kw: Any) -> None:
    """ADD CHECK ... NOT VALID, then VALIDATE CONSTRAINT."""
    name = named(s, constraint_name)
    table = catalog.table(s.conn, table_name, schema)
    ck = ops.CreateCheckConstraintOp(name, table.name, condition, schema=table.schema,
                                     postgresql_not_valid=True, **kw).to_constraint(s.ctx)
    add_and_validate(s, table, name, s.compile(sa.schema.AddConstraint(ck)), [table.oid])


def unique(s: Session, constraint_name: str | None, table_name: str, columns: Sequence[str], *,
           schema: str | None = None, deferrable: bool | None = None, initially: str | None = None,
           **kw: Any) -> None:
    """CREATE UNIQUE INDEX CONCURRENTLY, then ADD CONSTRAINT ... UNIQUE USING INDEX."""
    name = named(s, constraint_name)
    table = catalog.table(s.conn, table_name, schema)
    if catalog.constraint(s.conn, table, name) is not None:
        s.done("exists already")
        return
    index.create(s, name, table.name, columns, schema=table.schema, unique=True, **kw)
    clause = {True: " DEFERRABLE", False: " NOT DEFERRABLE", None: ""}[deferrable]
    if initially is not None:
        if initially.upper() not in ("DEFERRED", "IMMEDIATE"):
            raise MigrationFailed(f"{s.what}: initially={initially!r}: use 'DEFERRED' or 'IMMEDIATE'")
        clause += f" INITIALLY {initially.upper()}"
    s.transaction("added (ADD CONSTRAINT ... UNIQUE USING INDEX)",
                  [f"ALTER TABLE {table.sql} ADD CONSTRAINT {quote(name)} UNIQUE USING INDEX "
                   f"{quote(name)}{clause}"], [table.oid])


def set_not_null(s: Session, table_name: str, column_name: str, *, schema: str | None = None) -> None:
    """CHECK (col IS NOT NULL) NOT VALID -> VALIDATE -> SET NOT NULL (no scan) -> drop the check."""
    table = catalog.table(s.conn, table_name, schema)
    column = existing_column(s, table, column_name)
    ck = not_null_check(table, column_name)
    if column.notnull:
        drop_leftover_check(s, table, ck)
        return
    add_and_validate(s, table, ck, f"ALTER TABLE {table.sql} ADD CONSTRAINT {quote(ck)} "
                     f"CHECK ({quote(column_name)} IS NOT NULL) NOT VALID", [table.oid])
    s.transaction("SET NOT NULL (the validated check spares its scan); check dropped",
                  [f"ALTER TABLE {table.sql} ALTER COLUMN {quote(column_name)} SET NOT NULL",
                   f"ALTER TABLE {table.sql} DROP CONSTRAINT {quote(ck)}"], [table.oid])


def drop_not_null(s: Session, table_name: str, column_name: str, *, schema: str | None = None) -> None:
    """DROP NOT NULL (the inverse of set_not_null_online; no scan either way)."""
    table = catalog.table(s.conn, table_name, schema)
    column = existing_column(s, table, column_name)
    drop_leftover_check(s, table, not_null_check(table, column_name))
    if not column.notnull:
        s.done("nullable already")
        return
    s.transaction("DROP NOT NULL", [f"ALTER TABLE {table.sql} ALTER COLUMN {quote(column_name)} "
                                    "DROP NOT NULL"], [table.oid])


def drop(s: Session, constraint_name: str, table_name: str, *, schema: str | None = None) -> None:
    """DROP CONSTRAINT (the inverse of the constraint operations; a unique one takes its index)."""
    table = catalog.table(s.conn, table_name, schema)
    if catalog.constraint(s.conn, table, constraint_name) is None:
        s.done("gone already")
        return
    s.transaction("dropped", [f"ALTER TABLE {table.sql} DROP CONSTRAINT IF EXISTS "
                              f"{quote(constraint_name)}"], [table.oid])


def add_and_validate(s: Session, table: Table, name: str, add_sql: str, tables: Sequence[int]) -> None:
    """Add the constraint NOT VALID unless it exists, then validate it unless it is valid."""
    found = catalog.constraint(s.conn, table, name)
    if found is not None and found.validated:
        s.done(f"{name} exists already (validated)")
        return
    if found is None:
        s.transaction(f"{name} added NOT VALID", [add_sql], tables)
    try:
        s.transaction(f"{name} validated (VALIDATE CONSTRAINT)",
                      [f"ALTER TABLE {table.sql} VALIDATE CONSTRAINT {quote(name)}"], tables)
    except sa.exc.DBAPIError as exc:
        if sqlstate(exc) not in (CHECK_VIOLATION, FOREIGN_KEY_VIOLATION):
            raise
        raise MigrationFailed(f"{s.what}: rows of {table} violate {name} ({message(exc)}); it stays "
                              "NOT VALID (new and changed rows are checked): fix those rows and "
                              "rerun, which validates it") from None


def drop_leftover_check(s: Session, table: Table, name: str) -> None:
    if catalog.constraint(s.conn, table, name) is None:
        s.done("NOT NULL already")
        return
    s.transaction(f"dropped the leftover check {name}",
                  [f"ALTER TABLE {table.sql} DROP CONSTRAINT IF EXISTS {quote(name)}"], [table.oid])


def not_null_check(table: Table, column_name: str) -> str:
    """The temporary check's name (not PostgreSQL 18's own `<table>_<column>_not_null`)."""
    return catalog.short_name(table.name, column_name, "runner_nn")


def existing_column(s: Session, table: Table, column_name: str) -> catalog.Column:
    column = catalog.column(s.conn, table, column_name)
    if column is None:
        raise MigrationFailed(f"{s.what}: column {column_name} of {table} does not exist")
    return column


def named(s: Session, name: str | None) -> str:
    if not name:
        raise MigrationFailed(f"{s.what} needs a constraint name: a rerun finds what an earlier "
                              "attempt did by that name")
    return name
