"""The online operations (runner.online) on SQLite: their plain forms, for local development.

SQLite has no CONCURRENTLY, no NOT VALID, no lock_timeout and one writer at a time; a local file
has no rolling deploy to protect. So each operation does what SQLite can, in the revision's
transaction (it commits or rolls back with the revision), and stays rerunnable:

- create_index_online / drop_index_online: CREATE INDEX IF NOT EXISTS / DROP INDEX IF EXISTS;
- the constraints and NOT NULL (create_foreign_key_online, create_check_constraint_online,
  create_unique_constraint_online, drop_constraint_online, set_not_null_online,
  drop_not_null_online): Alembic's batch mode (the table is copied into a new one: existing rows
  are checked as they are copied; a new foreign key with PRAGMA foreign_key_check);
- add_column_online: ADD COLUMN, then the backfill and NOT NULL as below; drop_column_online:
  DROP COLUMN (batch mode when SQLite refuses it);
- backfill: keyset batches of UPDATE in transactions of their own (ONLINE_BACKFILL_BATCH_SIZE
  rows each, ONLINE_BACKFILL_PAUSE between), the checkpoint in runner_backfills, resumed by a
  rerun; no lock_timeout, no replicas to wait for;
- the expand/contract renames and type changes keep two columns in sync with a PostgreSQL
  trigger: refused (exit 6) with what to write instead.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import sqlalchemy as sa
from alembic.operations import Operations
from sqlalchemy.engine import Connection

from runner.errors import MigrationFailed
from runner.online import state
from runner.online.session import RUNNING, revision_of_caller, run_of
from runner.sqlname import qualified, quote

EXPAND_CONTRACT = ("rename_column_expand", "rename_column_expand_revert", "rename_column_contract",
                   "rename_column_contract_revert", "alter_column_type_expand",
                   "alter_column_type_expand_revert", "alter_column_type_contract",
                   "alter_column_type_contract_revert")

STATE_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    name           TEXT PRIMARY KEY,
    revision       TEXT,
    relation       TEXT NOT NULL,
    key_column     TEXT NOT NULL,
    assignment     TEXT NOT NULL,
    condition      TEXT,
    upper_bound    TEXT,
    checkpoint     TEXT,
    rows_done      INTEGER NOT NULL DEFAULT 0,
    rows_updated   INTEGER NOT NULL DEFAULT 0,
    rows_estimate  INTEGER,
    batch_size     INTEGER,
    state          TEXT NOT NULL CHECK (state IN ('running', 'done')),
    started_at     TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at     TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    finished_at    TIMESTAMP,
    revision_applied BOOLEAN NOT NULL DEFAULT 0,
    relation_oid   INTEGER  -- PostgreSQL's: a SQLite table has no identity that outlives a DROP
)"""


def run(operations: Operations, name: str, label: str, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
    """Run online operation `name` in its SQLite form; verify and `plan --scratch` tell its
    statements by label (runner.online.session.RUNNING), as on PostgreSQL."""
    if name in EXPAND_CONTRACT:
        raise MigrationFailed(
            f"{name}: expand/contract keeps two columns in sync with a trigger while old and new "
            "code run side by side, which a SQLite file for local development does not need: on "
            "SQLite write the change directly (with op.batch_alter_table(...) as b: "
            "b.alter_column(...)), under `if op.get_context().dialect.name == 'sqlite':`")
    running = RUNNING.set(label)
    try:
        OPERATIONS[name](operations, *args, **kw)
    finally:
        RUNNING.reset(running)


# -- indexes ---------------------------------------------------------------------------------------
def create_index(operations: Operations, index_name: str, table_name: str, columns: Any, *,
                 schema: str | None = None, unique: bool = False, **kw: Any) -> None:
    """Run CREATE [UNIQUE] INDEX IF NOT EXISTS (a partial index keeps its WHERE)."""
    if "postgresql_where" in kw and "sqlite_where" not in kw:
        kw["sqlite_where"] = kw["postgresql_where"]
    kw = {k: v for k, v in kw.items() if not k.startswith("postgresql_")}
    operations.create_index(index_name, table_name, list(columns), schema=schema, unique=unique,
                            if_not_exists=True, **kw)


def drop_index(operations: Operations, index_name: str, table_name: str | None = None, *,
               schema: str | None = None) -> None:
    operations.drop_index(index_name, table_name=table_name, schema=schema, if_exists=True)


# -- constraints and NOT NULL, through batch mode ----------------------------------------------------
@contextlib.contextmanager
def _batch(operations: Operations, table_name: str, schema: str | None) -> Iterator[Any]:
    """Enter Alembic's batch mode (copy the table into a new one), with legacy_alter_table on while it
    renames the copy: SQLite would otherwise refuse the rename while a view names the table."""
    conn = _conn(operations)
    before = conn.exec_driver_sql("PRAGMA legacy_alter_table").scalar()
    conn.exec_driver_sql("PRAGMA legacy_alter_table = ON")
    try:
        with operations.batch_alter_table(table_name, schema=schema, recreate="always") as batch:
            yield batch
    finally:
        conn.exec_driver_sql(f"PRAGMA legacy_alter_table = {int(bool(before))}")


def create_foreign_key(operations: Operations, constraint_name: str, source_table: str,
                       referent_table: str, local_cols: list[str], remote_cols: list[str], *,
                       source_schema: str | None = None, referent_schema: str | None = None,
                       **kw: Any) -> None:
    """Add the foreign key through batch mode, then every existing row checked against it."""
    if _has_constraint(operations, source_table, source_schema, constraint_name):
        return
    options = {k: kw[k] for k in ("onupdate", "ondelete", "deferrable", "initially", "match")
               if kw.get(k) is not None}
    with _batch(operations, source_table, source_schema) as batch:
        batch.create_foreign_key(constraint_name, referent_table, local_cols, remote_cols,
                                 referent_schema=referent_schema, **options)
    where = f"{quote(source_schema)}." if source_schema else ""
    bad = _conn(operations).exec_driver_sql(
        f"PRAGMA {where}foreign_key_check({quote(source_table)})").fetchmany(5)
    if bad:
        raise MigrationFailed(f"create_foreign_key_online({constraint_name}): rows of {source_table} "
                              f"(rowid {', '.join(str(r[1]) for r in bad)}) reference no row of "
                              f"{referent_table}: fix them first")


def create_check_constraint(operations: Operations, constraint_name: str, table_name: str,
                            condition: Any, *, schema: str | None = None, **kw: Any) -> None:
    """Add the check through batch mode: the copy checks every existing row."""
    if not _has_constraint(operations, table_name, schema, constraint_name):
        with _batch(operations, table_name, schema) as batch:
            batch.create_check_constraint(constraint_name, condition)


def create_unique_constraint(operations: Operations, constraint_name: str, table_name: str,
                             columns: Any, *, schema: str | None = None, **kw: Any) -> None:
    """Add the unique constraint through batch mode: the copy fails on duplicates."""
    if not _has_constraint(operations, table_name, schema, constraint_name):
        with _batch(operations, table_name, schema) as batch:
            batch.create_unique_constraint(constraint_name, list(columns))


def drop_constraint(operations: Operations, constraint_name: str, table_name: str, *,
                    schema: str | None = None) -> None:
    kind = _has_constraint(operations, table_name, schema, constraint_name)
    if kind:
        with _batch(operations, table_name, schema) as batch:
            batch.drop_constraint(constraint_name, type_=kind)


def set_not_null(operations: Operations, table_name: str, column_name: str, *,
                 schema: str | None = None) -> None:
    """Set NOT NULL through batch mode: the copy fails on a NULL."""
    _nullable(operations, table_name, column_name, schema, False)


def drop_not_null(operations: Operations, table_name: str, column_name: str, *,
                  schema: str | None = None) -> None:
    _nullable(operations, table_name, column_name, schema, True)


def _nullable(operations: Operations, table_name: str, column_name: str, schema: str | None,
              nullable: bool) -> None:
    column = _column(operations, table_name, schema, column_name)
    if column is None:
        raise MigrationFailed(f"{table_name}.{column_name} does not exist")
    if column["nullable"] != nullable:
        with _batch(operations, table_name, schema) as batch:
            batch.alter_column(column_name, nullable=nullable, existing_type=column["type"])


# -- columns ---------------------------------------------------------------------------------------
def add_column(operations: Operations, table_name: str, column: sa.Column[Any], *,
               schema: str | None = None, backfill_value: Any = None) -> None:
    """Run ADD COLUMN as given when SQLite can (a constant default); otherwise nullable without a
    default, filled (backfill, else the default), then the default and NOT NULL in batch mode."""
    if _column(operations, table_name, schema, column.name) is None:
        if backfill_value is None and _plain_add(operations, table_name, column, schema):
            return
        operations.add_column(table_name, sa.Column(column.name, column.type, nullable=True),
                              schema=schema)
    value = backfill_value if backfill_value is not None else _default(operations, column)
    if value is not None:
        backfill(operations, table_name, {column.name: value}, f"{quote(column.name)} IS NULL",
                 schema=schema, name=f"{table_name}.{column.name}: add_column_online")
    existing = _column(operations, table_name, schema, column.name)
    assert existing is not None
    default = getattr(column.server_default, "arg", None)  # a string or a text() clause
    if existing["nullable"] != column.nullable or (default is not None and existing["default"] is None):
        with _batch(operations, table_name, schema) as batch:
            batch.alter_column(column.name, nullable=column.nullable, existing_type=column.type,
                               **({"server_default": default} if default is not None else {}))


def _plain_add(operations: Operations, table_name: str, column: sa.Column[Any],
               schema: str | None) -> bool:
    """Run ADD COLUMN as it is; return False when SQLite refuses it (a default it cannot store once)."""
    conn = _conn(operations)
    conn.exec_driver_sql("SAVEPOINT runner_add_column")
    try:
        operations.add_column(table_name, column, schema=schema)
    except sa.exc.OperationalError as exc:
        if "default" not in str(exc.orig).lower():
            raise
        conn.exec_driver_sql("ROLLBACK TO runner_add_column")
        return False
    finally:
        conn.exec_driver_sql("RELEASE runner_add_column")
    return True


def _default(operations: Operations, column: sa.Column[Any]) -> str | None:
    if column.server_default is None:
        return None
    dialect = operations.get_context().dialect
    return dialect.ddl_compiler(dialect, None).get_column_default_string(column)


def drop_column(operations: Operations, table_name: str, column_name: str, *,
                schema: str | None = None) -> None:
    """Run DROP COLUMN; batch mode when SQLite refuses it (an indexed or constrained column)."""
    if _column(operations, table_name, schema, column_name) is None:
        return
    conn = _conn(operations)
    conn.exec_driver_sql("SAVEPOINT runner_drop_column")
    try:
        operations.drop_column(table_name, column_name, schema=schema)
    except sa.exc.OperationalError:
        conn.exec_driver_sql("ROLLBACK TO runner_drop_column")
        with _batch(operations, table_name, schema) as batch:
            batch.drop_column(column_name)
    finally:
        conn.exec_driver_sql("RELEASE runner_drop_column")


# -- backfill --------------------------------------------------------------------------------------
def backfill(operations: Operations, table_name: str, set: Mapping[str, Any] | str,
             where: Any = None, *, schema: str | None = None, name: str | None = None) -> None:
    """Run UPDATE in keyset batches on the primary key (the rowid when there is none), each batch and
    its checkpoint one transaction outside the revision's; a rerun resumes from the checkpoint."""
    ctx = operations.get_context()
    if ctx.as_sql:
        raise MigrationFailed(f"backfill({table_name}): a backfill reads the table to walk it and "
                              "cannot be rendered as offline SQL: use `plan --scratch`")
    conn = _conn(operations)
    table = qualified(schema, table_name)
    key = _key(operations, table_name, schema)
    assignment = set if isinstance(set, str) else ", ".join(
        f"{quote(c)} = {_sql(operations, v)}" for c, v in set.items())
    condition = _sql(operations, where) if where is not None else None
    name = name or f"{table_name}:" + hashlib.sha1(f"{assignment}\0{condition}".encode()).hexdigest()[:10]
    version_schema, revision = ctx.version_table_schema, revision_of_caller()
    with ctx.autocommit_block():
        _Batches(operations, conn, table, key, assignment, condition, name, version_schema,
                 revision).run()
    state.revision_applied(_conn(operations), version_schema, name)  # in the revision's transaction


class _Batches:
    def __init__(self, operations: Operations, conn: Connection, table: str, key: str,
                 assignment: str, condition: str | None, name: str, version_schema: str | None,
                 revision: str | None) -> None:
        self.run_ = run_of(operations.get_context())
        self.conn, self.table, self.key, self.name = conn, table, key, name
        self.assignment, self.condition = assignment, condition
        self.schema, self.revision = version_schema, revision
        self.size = self.run_.settings.online_backfill_batch_size

    def run(self) -> None:
        conn, log = self.conn, self.run_.log
        conn.exec_driver_sql(STATE_DDL.format(table=state.table(self.schema)))
        row = state.get(conn, self.schema, self.name)
        same = row is not None and (row["relation"], row["key_column"], row["assignment"],
                                    row["condition"]) == (self.table, self.key, self.assignment,
                                                          self.condition)
        if same and row["state"] == "done" and not row["revision_applied"]:
            return  # finished, but its revision did not commit: not again
        if same and row["state"] == "running":
            last, upper, done = row["checkpoint"], row["upper_bound"], row["rows_done"]
            log("backfill.resume", f"backfill {self.name}: resuming after key {last or '(none)'}",
                name=self.name, checkpoint=last, rows_done=done)
        else:
            last, done = None, 0
            upper = self._start()
        updated = 0
        while upper is not None:
            self.run_.cancel.check()
            visited, changed, last = self._batch(last, upper)
            if not visited:
                break
            done, updated = done + visited, updated + changed
            self.run_.cancel.sleep(self.run_.settings.online_backfill_pause)
        self._write(f"UPDATE {state.table(self.schema)} SET state = 'done', finished_at = "
                    "CURRENT_TIMESTAMP, updated_at = CURRENT_TIMESTAMP WHERE name = :n", n=self.name)
        log("backfill.done", f"backfill {self.name}: done, {done} rows visited", name=self.name,
            rows_done=done, rows_updated=updated)

    def _start(self) -> Any:
        upper = self.conn.exec_driver_sql(f"SELECT max({self.key}) FROM {self.table}").scalar()
        total = self.conn.exec_driver_sql(f"SELECT count(*) FROM {self.table}").scalar()
        names = ("name", "revision", "relation", "key_column", "assignment", "condition", "upper_bound",
                 "rows_estimate", "batch_size")
        values = (self.name, self.revision, self.table, self.key, self.assignment, self.condition,
                  upper, total, self.size)
        self._write(f"INSERT INTO {state.table(self.schema)} ({', '.join(names)}, state) VALUES "
                    f"({', '.join(':' + n for n in names)}, 'running') ON CONFLICT (name) DO UPDATE SET "
                    f"{', '.join(f'{n} = excluded.{n}' for n in names[1:])}, checkpoint = NULL, "
                    "rows_done = 0, rows_updated = 0, state = 'running', started_at = "
                    "CURRENT_TIMESTAMP, updated_at = CURRENT_TIMESTAMP, finished_at = NULL, "
                    "revision_applied = 0", **dict(zip(names, values, strict=True)))
        self.run_.log("backfill.start", f"backfill {self.name}: up to {self.key} = {upper}, {total} rows",
                      name=self.name, upper_bound=upper, rows_estimate=total)
        return upper

    def _batch(self, last: Any, upper: Any) -> tuple[int, int, Any]:
        """Run one batch and its checkpoint in one write transaction; return (keys visited, rows changed,
        the new checkpoint)."""
        after = "" if last is None else f" AND {self.key} > :last"
        with self._transaction() as conn:
            keys = conn.execute(sa.text(f"SELECT {self.key} FROM {self.table} WHERE {self.key} <= "
                                        f":upper{after} ORDER BY {self.key} LIMIT :n"),
                                {"upper": upper, "last": last, "n": self.size}).scalars().all()
            if not keys:
                return 0, 0, last
            condition = f" AND ({self.condition})" if self.condition else ""
            changed = conn.execute(sa.text(
                f"UPDATE {self.table} SET {self.assignment} WHERE {self.key} <= :bound{after}{condition}"),
                {"bound": keys[-1], "last": last}).rowcount
            conn.execute(sa.text(f"UPDATE {state.table(self.schema)} SET checkpoint = :c, rows_done = "
                                 "rows_done + :v, rows_updated = rows_updated + :u, updated_at = "
                                 "CURRENT_TIMESTAMP WHERE name = :n"),
                         {"c": keys[-1], "v": len(keys), "u": changed, "n": self.name})
        return len(keys), changed, keys[-1]

    def _write(self, statement: str, **params: Any) -> None:
        with self._transaction() as conn:
            conn.execute(sa.text(statement), params)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        self.conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            with contextlib.suppress(sa.exc.DBAPIError):
                self.conn.exec_driver_sql("ROLLBACK")
            raise
        self.conn.exec_driver_sql("COMMIT")


# -- helpers ---------------------------------------------------------------------------------------
def _conn(operations: Operations) -> Connection:
    conn = operations.get_context().connection
    assert conn is not None
    return conn


def _sql(operations: Operations, value: Any) -> str:
    if isinstance(value, str):
        return value
    return str(value.compile(dialect=operations.get_context().dialect,
                             compile_kwargs={"literal_binds": True}))


def _column(operations: Operations, table: str, schema: str | None, name: str) -> dict[str, Any] | None:
    columns = sa.inspect(_conn(operations)).get_columns(table, schema=schema)
    return next((c for c in columns if c["name"] == name), None)


def _key(operations: Operations, table: str, schema: str | None) -> str:
    """Return the single-column primary key a backfill walks, else SQLite's rowid."""
    inspector = sa.inspect(_conn(operations))
    if not inspector.has_table(table, schema=schema):
        raise MigrationFailed(f"backfill: table {qualified(schema, table)} does not exist")
    key = inspector.get_pk_constraint(table, schema=schema)["constrained_columns"]
    return quote(key[0]) if len(key) == 1 else "rowid"


def _has_constraint(operations: Operations, table: str, schema: str | None, name: str) -> str | None:
    """Return the kind of the constraint called name on table ("foreignkey", "check", "unique"), or None."""
    inspector = sa.inspect(_conn(operations))
    for kind, found in (("foreignkey", inspector.get_foreign_keys(table, schema=schema)),
                        ("check", inspector.get_check_constraints(table, schema=schema)),
                        ("unique", inspector.get_unique_constraints(table, schema=schema))):
        if any(c.get("name") == name for c in found):
            return kind
    return None


OPERATIONS: dict[str, Callable[..., None]] = {
    "create_index_online": create_index, "drop_index_online": drop_index,
    "create_foreign_key_online": create_foreign_key,
    "create_check_constraint_online": create_check_constraint,
    "create_unique_constraint_online": create_unique_constraint,
    "drop_constraint_online": drop_constraint, "set_not_null_online": set_not_null,
    "drop_not_null_online": drop_not_null, "add_column_online": add_column,
    "drop_column_online": drop_column, "backfill": backfill,
}
