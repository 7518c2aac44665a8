"""The backfill state table: one row per backfill, next to the version table (`runner_backfills`).

A backfill writes its checkpoint in the same transaction as each batch, so a rerun after a crash
continues where the last committed batch ended, as long as the table is the same one
(relation_oid): a table dropped and created again since (a downgrade and upgrade of the revision
that creates it) has none of the rows the checkpoint counts as done, and is backfilled from its
first row. rows_done counts the keys visited (up to the
largest key seen at the start, upper_bound), rows_updated the rows the batches changed.
revision_applied is set in the transaction of the revision that ran the backfill, after it: a
finished backfill whose revision did not commit (a crash in between) is not run again when the
revision is rerun; one whose revision committed is run again when that revision is applied again
(after a downgrade). The deploy phases read it: a post-deploy revision never runs while a
backfill it depends on is unfinished; `status` lists the backfills.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner.owntables import BACKFILLS
from runner.sqlname import qualified

TABLE = BACKFILLS  # one of the runner's own tables (runner.owntables)
STATES = ("running", "done")

DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    name           text PRIMARY KEY,
    revision       text,
    relation       text NOT NULL,
    key_column     text NOT NULL,
    assignment     text NOT NULL,
    condition      text,
    upper_bound    text,
    checkpoint     text,
    rows_done      bigint NOT NULL DEFAULT 0,
    rows_updated   bigint NOT NULL DEFAULT 0,
    rows_estimate  bigint,
    batch_size     integer,
    state          text NOT NULL CHECK (state IN ('running', 'done')),
    started_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    revision_applied boolean NOT NULL DEFAULT false,
    relation_oid   bigint
)"""
COLUMNS = ("name", "revision", "relation", "key_column", "assignment", "condition", "upper_bound",
           "checkpoint", "rows_done", "rows_updated", "rows_estimate", "batch_size", "state", "started_at",
           "updated_at", "finished_at", "revision_applied", "relation_oid")


def table(schema: str | None) -> str:
    """The state table's name, schema-qualified when the version table's schema is known."""
    return qualified(schema, TABLE)


def ensure(conn: Connection, schema: str | None) -> None:
    """Create the state table if it is missing."""
    conn.execute(sa.text(DDL.format(table=table(schema))))


def exists(conn: Connection, schema: str | None) -> bool:
    if conn.dialect.name == "sqlite":  # no to_regclass(); SQLAlchemy's inspector asks sqlite_master
        return sa.inspect(conn).has_table(TABLE, schema)
    return bool(conn.execute(sa.text("SELECT to_regclass(:t) IS NOT NULL"),
                             {"t": table(schema)}).scalar_one())


def rows(conn: Connection, schema: str | None) -> list[dict[str, Any]]:
    """Every backfill, oldest first ([] when none ever ran)."""
    if not exists(conn, schema):
        return []
    return [dict(r) for r in conn.execute(sa.text(
        f"SELECT {', '.join(COLUMNS)} FROM {table(schema)} ORDER BY started_at, name")).mappings()]


def unfinished(conn: Connection, schema: str | None) -> list[dict[str, Any]]:
    """Backfills started and not done (a crash, SIGTERM or RUN_DEADLINE stopped them)."""
    return [r for r in rows(conn, schema) if r["state"] != "done"]


def get(conn: Connection, schema: str | None, name: str) -> dict[str, Any] | None:
    row = conn.execute(sa.text(f"SELECT {', '.join(COLUMNS)} FROM {table(schema)} WHERE name = :n"),
                       {"n": name}).mappings().first()
    return None if row is None else dict(row)


def start(conn: Connection, schema: str | None, values: dict[str, Any]) -> None:
    """Record a backfill starting from the first key (again, when it ran before)."""
    names = ("name", "revision", "relation", "key_column", "assignment", "condition", "upper_bound",
             "rows_estimate", "batch_size", "relation_oid")
    conn.execute(sa.text(f"""
        INSERT INTO {table(schema)} ({', '.join(names)}, state)
        VALUES ({', '.join(':' + n for n in names)}, 'running')
        ON CONFLICT (name) DO UPDATE SET {', '.join(f'{n} = EXCLUDED.{n}' for n in names[1:])},
            checkpoint = NULL, rows_done = 0, rows_updated = 0, state = 'running',
            started_at = now(), updated_at = now(), finished_at = NULL, revision_applied = false"""),
        {n: values.get(n) for n in names})


def finish(conn: Connection, schema: str | None, name: str) -> None:
    conn.execute(sa.text(f"UPDATE {table(schema)} SET state = 'done', finished_at = now(), "
                         "updated_at = now() WHERE name = :n"), {"n": name})


def revision_applied(conn: Connection, schema: str | None, name: str) -> None:
    """Record, in the revision's own transaction, that the revision committed after the backfill."""
    conn.execute(sa.text(f"UPDATE {table(schema)} SET revision_applied = true WHERE name = :n"),
                 {"n": name})
