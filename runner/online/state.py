"""The backfill state table: one row per backfill, next to the version table (`runner_backfills`).

A backfill writes its checkpoint in the same transaction as each batch, so a rerun after a crash
continues where the last committed batch ended. The deploy phases read it: a post-deploy revision
never runs while a backfill it depends on is unfinished; `status` lists the backfills.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner.sqlname import qualified

TABLE = "runner_backfills"
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
    rows_estimate  bigint,
    batch_size     integer,
    state          text NOT NULL CHECK (state IN ('running', 'done')),
    started_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
)"""
COLUMNS = ("name", "revision", "relation", "key_column", "assignment", "condition", "upper_bound",
           "checkpoint", "rows_done", "rows_estimate", "batch_size", "state", "started_at",
           "updated_at", "finished_at")


def table(schema: str | None) -> str:
    """The state table's name, schema-qualified when the version table's schema is known."""
    return qualified(schema, TABLE)


def ensure(conn: Connection, schema: str | None) -> None:
    """Create the state table if it is missing."""
    conn.execute(sa.text(DDL.format(table=table(schema))))


def exists(conn: Connection, schema: str | None) -> bool:
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
