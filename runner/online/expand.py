"""Rename a column or change its type across two deploys: expand, then contract.

Expand (a pre-deploy revision): the new column and the trigger that keeps both columns in sync
appear in ONE transaction (pgroll lost writes made between the two: its #905), then a backfill
copies the existing rows. While the old and the new application code run side by side, each
writes its own column and the trigger copies the value across: old -> new with `using`, new ->
old with `revert_using`.

Contract (a later, post-deploy revision, once no code reads the old column): the trigger, its
function and the old column disappear in ONE transaction (pgroll#906: writes failed between
dropping the column and the trigger). NOT NULL and the default move to the new column first.

The *_revert operations are the downgrades: expand_revert drops the new column and the trigger
in one transaction; contract_revert brings back the old column with its trigger and fills it.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from runner.errors import MigrationFailed, PreflightRefused
from runner.online import backfill, catalog, constraints, state
from runner.online.catalog import Column, Table
from runner.online.session import Session
from runner.sqlname import qualified, quote

DOLLAR_TAG = "$runner_sync$"


def expand(s: Session, table_name: str, column_name: str, new_column_name: str, *,
           type_: Any = None, using: Any = None, revert_using: Any = None,
           schema: str | None = None) -> None:
    """Add new_column_name (of type_, or the old column's type) with its sync trigger in one
    transaction, then backfill it from column_name."""
    table = catalog.table(s.conn, table_name, schema)
    old = source_column(s, table, column_name)
    new_type = old.type_sql if type_ is None else sql_type(s, type_)
    fwd, back = conversions(s, column_name, new_column_name, old.type, new_type, type_, using,
                            revert_using)
    sync = Sync(table, column_name, new_column_name, fwd, back)
    new = catalog.column(s.conn, table, new_column_name)
    statements = [] if new is not None else [
        f"ALTER TABLE {table.sql} ADD COLUMN {quote(new_column_name)} {new_type}"]
    if statements or not catalog.trigger_exists(s.conn, table, sync.name):
        check_expressions(s, sync, old.type, new_type)
        s.transaction(f"added {new_column_name} and its sync trigger {sync.name} (one transaction)",
                      [*statements, *sync.create()], [table.oid])
    fill(s, sync, target=new_column_name)


def expand_revert(s: Session, table_name: str, column_name: str, new_column_name: str, *,
                  schema: str | None = None) -> None:
    """Drop the trigger, its function and the new column, in one transaction."""
    table = catalog.table(s.conn, table_name, schema)
    sync = Sync(table, column_name, new_column_name, "", "")
    if catalog.column(s.conn, table, new_column_name) is None and not catalog.trigger_exists(
            s.conn, table, sync.name):
        s.done("reverted already")
        return
    s.transaction(f"dropped {new_column_name} and its sync trigger (one transaction)",
                  [*sync.drop(), f"ALTER TABLE {table.sql} DROP COLUMN IF EXISTS "
                                 f"{quote(new_column_name)}"], [table.oid])


def contract(s: Session, table_name: str, column_name: str, new_column_name: str, *,
             server_default: Any = False, schema: str | None = None) -> None:
    """Move NOT NULL and the default to the new column, then drop the trigger, its function and
    the old column in one transaction."""
    table = catalog.table(s.conn, table_name, schema)
    sync = Sync(table, column_name, new_column_name, "", "")
    old = catalog.column(s.conn, table, column_name)
    has_trigger = catalog.trigger_exists(s.conn, table, sync.name)
    if old is None and not has_trigger:
        s.done("contracted already")
        return
    new = catalog.column(s.conn, table, new_column_name)
    if new is None or not has_trigger:
        raise MigrationFailed(f"{s.what}: {table} has no {new_column_name} kept in sync with "
                              f"{column_name}: apply the expand revision first")
    unfinished = state.get(s.conn, s.version_schema, sync.backfill_name)
    if unfinished is not None and unfinished["state"] != "done":
        raise PreflightRefused(f"{s.what}: the backfill {sync.backfill_name} has not finished: run "
                               "the pre-deploy upgrade to the end before the post-deploy one")
    statements = []
    if old is not None and old.notnull and not new.notnull:
        ck = constraints.not_null_check(table, new_column_name)
        constraints.add_and_validate(s, table, ck, f"ALTER TABLE {table.sql} ADD CONSTRAINT "
                                     f"{quote(ck)} CHECK ({quote(new_column_name)} IS NOT NULL) "
                                     "NOT VALID", [table.oid])
        statements += [f"ALTER TABLE {table.sql} ALTER COLUMN {quote(new_column_name)} SET NOT NULL",
                       f"ALTER TABLE {table.sql} DROP CONSTRAINT {quote(ck)}"]
    statements += move_default(s, table, old, new, server_default)
    statements += sync.drop()
    if old is not None:
        statements.append(f"ALTER TABLE {table.sql} DROP COLUMN IF EXISTS {quote(column_name)}")
        going = catalog.dependents(s.conn, table, column_name)
        if going:
            s.run.log.warning("online.dependents", f"{s.what}: dropping {column_name} also drops "
                              f"{'; '.join(going)} (create what {new_column_name} needs before the "
                              "contract)", dropped=going)
    s.transaction(f"dropped {column_name} and the sync trigger (one transaction)", statements,
                  [table.oid])


def contract_revert(s: Session, table_name: str, column_name: str, new_column_name: str, *,
                    existing_type: Any = None, using: Any = None, revert_using: Any = None,
                    existing_server_default: Any = None, existing_nullable: bool | None = None,
                    schema: str | None = None) -> None:
    """Bring the old column back (nullable, with its default) with the sync trigger in one
    transaction, fill it from the new column, then NOT NULL as the new column has it."""
    table = catalog.table(s.conn, table_name, schema)
    new = source_column(s, table, new_column_name)
    old_type = new.type_sql if existing_type is None else sql_type(s, existing_type)
    fwd, back = conversions(s, column_name, new_column_name, old_type, new.type, existing_type,
                            using, revert_using)
    sync = Sync(table, column_name, new_column_name, fwd, back)
    old = catalog.column(s.conn, table, column_name)
    if old is None or not catalog.trigger_exists(s.conn, table, sync.name):
        statements = []
        if old is None:
            statements.append(f"ALTER TABLE {table.sql} ADD COLUMN {quote(column_name)} {old_type}")
            default = (backfill.render_sql(s, existing_server_default) if existing_server_default
                       is not None else new.default if existing_type is None else None)
            if default is not None:  # for new rows only: no rewrite
                statements[-1] += f", ALTER COLUMN {quote(column_name)} SET DEFAULT {default}"
            if new.default is not None:  # the new column takes no default while synced
                statements.append(f"ALTER TABLE {table.sql} ALTER COLUMN "
                                  f"{quote(new_column_name)} DROP DEFAULT")
            if new.notnull:
                statements.append(f"ALTER TABLE {table.sql} ALTER COLUMN "
                                  f"{quote(new_column_name)} DROP NOT NULL")
        check_expressions(s, sync, old_type, new.type)
        s.transaction(f"added {column_name} back and the sync trigger {sync.name} (one transaction)",
                      [*statements, *sync.create()], [table.oid])
    fill(s, sync, target=column_name)
    nullable = (not new.notnull) if existing_nullable is None else existing_nullable
    if not nullable:
        constraints.set_not_null(s, table.name, column_name, schema=table.schema)


# -- helpers ---------------------------------------------------------------------------------------

def source_column(s: Session, table: Table, name: str) -> Column:
    column = catalog.column(s.conn, table, name)
    if column is None:
        raise MigrationFailed(f"{s.what}: column {name} of {table} does not exist")
    if column.identity or column.generated:
        raise MigrationFailed(f"{s.what}: {table}.{name} is an identity or generated column, which "
                              "expand/contract cannot keep in sync")
    key = [c for c, _ in catalog.primary_key(s.conn, table)]
    if name in key:
        raise MigrationFailed(f"{s.what}: {table}.{name} is part of the primary key, which "
                              "expand/contract does not change")
    return column


def sql_type(s: Session, type_: Any) -> str:
    return s.compile(sa.types.to_instance(type_))


def conversions(s: Session, old: str, new: str, old_type: str, new_type: str, type_: Any,
                using: Any, revert_using: Any) -> tuple[str, str]:
    """The SQL expressions old -> new and new -> old (each names its own column)."""
    same = type_ is None
    fwd = backfill.render_sql(s, using) if using is not None else (
        quote(old) if same else f"CAST({quote(old)} AS {new_type})")
    back = backfill.render_sql(s, revert_using) if revert_using is not None else (
        quote(new) if same else f"CAST({quote(new)} AS {old_type})")
    if DOLLAR_TAG in fwd + back:
        raise MigrationFailed(f"{s.what}: using / revert_using may not contain {DOLLAR_TAG}")
    return fwd, back


def check_expressions(s: Session, sync: Sync, old_type: str, new_type: str) -> None:
    """Evaluate using / revert_using once on NULL (a wrong column name or type fails the revision
    now, not the application's writes later); no row is touched."""
    s.sql(f"SELECT ({sync.fwd}) FROM (SELECT NULL::{old_type} AS {quote(sync.old)}) AS runner_row")
    s.sql(f"SELECT ({sync.back}) FROM (SELECT NULL::{new_type} AS {quote(sync.new)}) AS runner_row")


def fill(s: Session, sync: Sync, target: str) -> None:
    """Backfill the target column of the rows written before the trigger existed."""
    source, expression = (sync.old, sync.fwd) if target == sync.new else (sync.new, sync.back)
    backfill.backfill(s, sync.table.name, {target: expression},
                      f"{quote(target)} IS NULL AND {quote(source)} IS NOT NULL",
                      schema=sync.table.schema, name=sync.backfill_name)


def move_default(s: Session, table: Table, old: Column | None, new: Column,
                 server_default: Any) -> list[str]:
    """Statements giving the new column the old one's default (or server_default); a serial's
    sequence moves along, so dropping the old column does not drop it."""
    if server_default is False:  # as in Alembic's alter_column: unchanged, i.e. the old one's
        if old is None or old.default is None or new.default is not None:
            return []
        default = old.default
    elif server_default is None:
        return []
    else:
        default = backfill.render_sql(s, server_default)
    out = [f"ALTER TABLE {table.sql} ALTER COLUMN {quote(new.name)} SET DEFAULT {default}"]
    sequence = catalog.owned_sequence(s.conn, table, old.name) if old is not None else None
    if sequence is not None:
        out.append(f"ALTER SEQUENCE {sequence} OWNED BY {table.sql}.{quote(new.name)}")
    return out


class Sync:
    """The trigger (and its function) that keeps old and new in step, named after both columns."""

    def __init__(self, table: Table, old: str, new: str, fwd: str, back: str) -> None:
        self.table, self.old, self.new, self.fwd, self.back = table, old, new, fwd, back
        self.name = catalog.short_name(table.name, old, new, "sync")
        self.function = qualified(table.schema, self.name)
        self.backfill_name = f"{table}.{new}: sync from {old}"

    def value(self, expression: str, column: str) -> str:
        """expression (which names column) evaluated on the row being written."""
        if expression == quote(column):
            return f"NEW.{quote(column)}"
        return f"(SELECT ({expression}) FROM (SELECT NEW.{quote(column)} AS {quote(column)}) AS runner_row)"

    def create(self) -> list[str]:
        a, b = f"NEW.{quote(self.old)}", f"NEW.{quote(self.new)}"
        f, g = self.value(self.fwd, self.old), self.value(self.back, self.new)
        # INSERT: fill whichever column the writer left NULL; both given: the new one wins unless
        # they agree. UPDATE: copy the column the writer changed, unless the other one already
        # matches it (a backfill writing new = f(old) leaves old alone); rows nobody wrote since
        # before the expand get filled on their next update.
        body = f"""
#variable_conflict use_column
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF {b} IS NULL THEN
            {b} := {f};
        ELSIF {a} IS NULL OR {b} IS DISTINCT FROM {f} THEN
            {a} := {g};
        END IF;
    ELSIF {a} IS DISTINCT FROM OLD.{quote(self.old)} AND {b} IS NOT DISTINCT FROM OLD.{quote(self.new)} THEN
        IF {a} IS DISTINCT FROM {g} THEN
            {b} := {f};
        END IF;
    ELSIF {b} IS DISTINCT FROM OLD.{quote(self.new)} THEN
        IF {b} IS DISTINCT FROM {f} THEN
            {a} := {g};
        END IF;
    ELSIF {b} IS NULL AND {a} IS NOT NULL THEN
        {b} := {f};
    ELSIF {a} IS NULL AND {b} IS NOT NULL THEN
        {a} := {g};
    END IF;
    RETURN NEW;
END
"""
        return [f"CREATE OR REPLACE FUNCTION {self.function}() RETURNS trigger LANGUAGE plpgsql AS "
                f"{DOLLAR_TAG}{body}{DOLLAR_TAG}",
                f"DROP TRIGGER IF EXISTS {quote(self.name)} ON {self.table.sql}",
                f"CREATE TRIGGER {quote(self.name)} BEFORE INSERT OR UPDATE ON {self.table.sql} "
                f"FOR EACH ROW EXECUTE FUNCTION {self.function}()"]

    def drop(self) -> list[str]:
        return [f"DROP TRIGGER IF EXISTS {quote(self.name)} ON {self.table.sql}",
                f"DROP FUNCTION IF EXISTS {self.function}()"]
