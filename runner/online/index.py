"""create_index_online / drop_index_online: CREATE / DROP INDEX CONCURRENTLY that a rerun finishes.

An interrupted CONCURRENTLY build leaves its index behind, INVALID: never used for reads, still
maintained on every write, and in the way of the retry ("already exists"; IF NOT EXISTS would
keep the broken one, strong_migrations#233). An INVALID index of the requested name on the
requested table is therefore dropped and built again, after waiting for a build of it that is
still running (a killed runner's backend stops within seconds); a valid one means the work is
done.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic.operations import ops

from runner.errors import MigrationFailed, PreflightRefused
from runner.online import catalog, concurrently
from runner.online.catalog import Table
from runner.online.session import Session, message, sqlstate
from runner.sqlname import qualified

UNIQUE_VIOLATION = "23505"
BUILDER_POLL = 0.2  # seconds between two looks at a build still running in another session


def create(s: Session, index_name: str, table_name: str, columns: Sequence[Any], *,
           schema: str | None = None, unique: bool = False, **kw: Any) -> None:
    """Build the index CONCURRENTLY; keep a valid one of that name, rebuild an INVALID one."""
    table = catalog.table(s.conn, table_name, schema)
    index = ops.CreateIndexOp(index_name, table.name, list(columns), schema=table.schema,
                              unique=unique, postgresql_concurrently=True, **kw).to_index(s.ctx)
    statement = s.compile(sa.schema.CreateIndex(index))
    found = catalog.index(s.conn, table.schema, index_name)
    if found is not None and found.table_oid != table.oid:
        raise MigrationFailed(f"{s.what}: {qualified(table.schema, index_name)} already exists and is "
                              f"not an index on {table}: choose another name")
    if found is not None and found.valid:
        s.done("exists already (valid)")
        return
    if found is not None and s.settings.invalid_index_policy == "refuse":
        raise PreflightRefused(f"{s.what}: an interrupted build left {qualified(table.schema, index_name)} "
                               "INVALID and INVALID_INDEX_POLICY=refuse: drop it (DROP INDEX "
                               "CONCURRENTLY) and rerun, or set INVALID_INDEX_POLICY=drop")
    try:
        concurrently.run(s, "built (CREATE INDEX CONCURRENTLY)", statement,
                         prepare=lambda: clear_leftover(s, table, index_name))
    except sa.exc.DBAPIError as exc:
        if sqlstate(exc) != UNIQUE_VIOLATION:
            raise
        clear_leftover(s, table, index_name)
        raise MigrationFailed(f"{s.what}: duplicate values in ({', '.join(map(str, columns))}) "
                              f"({message(exc)}); the INVALID index was dropped: remove the "
                              "duplicates and rerun") from None


def clear_leftover(s: Session, table: Table, name: str) -> bool:
    """Drop an INVALID index called name on table once no build of it runs; return True when
    the index exists and is valid (nothing left to build)."""
    found = wait_for_builder(s, table, name)
    if found is None:
        return False
    if found.valid:
        return True
    s.run.log.warning("online.leftover", f"{s.what}: dropping INVALID index "
                      f"{qualified(table.schema, name)}, left by an interrupted build; building it "
                      "again", index=name)
    concurrently.run(s, "dropped the INVALID leftover (DROP INDEX CONCURRENTLY)",
                     f"DROP INDEX CONCURRENTLY IF EXISTS {qualified(table.schema, name)}")
    return False


def wait_for_builder(s: Session, table: Table, name: str) -> catalog.Index | None:
    """The index as it is once no other session builds it (bounded by ONLINE_INDEX_WAIT_TIMEOUT)."""
    deadline = time.monotonic() + s.settings.online_index_wait_timeout
    found = catalog.index(s.conn, table.schema, name)
    logged = False
    while found is not None and found.builder is not None:
        if time.monotonic() > deadline:
            raise MigrationFailed(f"{s.what}: session {found.builder} is still building "
                                  f"{qualified(table.schema, name)}: end it (pg_cancel_backend) or "
                                  "wait for it, then rerun")
        if not logged:
            s.run.log("online.wait", f"{s.what}: session {found.builder} is still building "
                      f"{qualified(table.schema, name)} (an earlier attempt): waiting for it to end",
                      pid=found.builder)
            logged = True
        s.run.cancel.sleep(BUILDER_POLL)
        found = catalog.index(s.conn, table.schema, name)
    return found


def drop(s: Session, index_name: str, table_name: str | None = None, *,
         schema: str | None = None) -> None:
    """Drop the index CONCURRENTLY (nothing to do when it is gone)."""
    if table_name is not None:
        schema = catalog.table(s.conn, table_name, schema).schema
    where = s.query("SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.oid = to_regclass(:i) AND c.relkind IN ('i', 'I')",
                    i=qualified(schema, index_name)).scalar()
    if where is None:
        s.done("gone already")
        return
    concurrently.run(s, "dropped (DROP INDEX CONCURRENTLY)",
                     f"DROP INDEX CONCURRENTLY IF EXISTS {qualified(where, index_name)}")
