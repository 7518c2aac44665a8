"""The ledger's two tables: their DDL, reads and writes.

Every call runs on the run's AUTOCOMMIT ledger connection ("ledger"), never on the migration's:
a revision that rolls back is still recorded as failed. The connection is opened on first use
and kept for the run (a new server session costs more than the ledger's few statements); it has
its own lock_timeout and statement_timeout, so a ledger table someone else holds locked cannot
hang the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner import db
from runner.context import Run
from runner.ledger import integrity
from runner.sqlname import quote

RUN_COLUMNS = ("id", "run_id", "command", "outcome", "exit_code", "from_revision", "to_revision",
               "target", "steps", "error", "backup_key", "started_at", "finished_at",
               "runner_version", "image_version", "image_revision", "host", "job_name", "db_user")
KINDS = ("applied", "baseline", "stamped", "repaired")

RUNS_DDL = """
CREATE TABLE IF NOT EXISTS {runs} (
    id              uuid PRIMARY KEY,
    run_id          text NOT NULL,
    command         text NOT NULL,
    outcome         text NOT NULL,
    exit_code       integer,
    from_revision   text,
    to_revision     text,
    target          text,
    steps           jsonb NOT NULL DEFAULT '[]',
    error           text,
    backup_key      text,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz,
    runner_version  text,
    image_version   text,
    image_revision  text,
    host            text,
    job_name        text,
    db_user         text NOT NULL DEFAULT session_user
)"""

REVISIONS_DDL = """
CREATE TABLE IF NOT EXISTS {revisions} (
    revision     text PRIMARY KEY,
    checksum     text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('applied', 'baseline', 'stamped', 'repaired')),
    script       text,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    run_id       text
)"""

# a runner of another version table in this schema (another lock) created it meanwhile
_ALREADY_THERE = {"42P07", "23505"}


@dataclasses.dataclass(frozen=True)
class Recorded:
    """A revision's checksum as the ledger holds it."""

    checksum: str
    kind: str
    recorded_at: Any
    run_id: str | None


class Store:
    """The ledger tables next to the version table: <table> and <table>_revisions."""

    def __init__(self, run: Run, schema: str | None) -> None:
        self.run = run
        self.table = run.settings.history_table
        self.schema = schema  # None: the connection's current schema, resolved on first use
        self._conn: Connection | None = None
        self._timeouts = "SET lock_timeout = '5s'; SET statement_timeout = '20s'"

    @property
    def where(self) -> str:
        """schema.table, for messages."""
        return f"{self.schema or '(current schema)'}.{self.table}"

    @contextlib.contextmanager
    def session(self) -> Iterator[Connection]:
        """The ledger connection; a failure inside the block closes it (the next use reconnects)."""
        if self._conn is None:
            conn = db.connect(self.run, "ledger", autocommit=True, connect_timeout=5)
            try:
                conn.execute(sa.text(self._timeouts))
                if self.schema is None:  # where Alembic put the version table on this connection
                    self.schema = conn.execute(sa.text("SELECT current_schema()")).scalar()
                    if self.schema is None:
                        raise sa.exc.InvalidRequestError("no current schema: search_path names no "
                                                         "existing schema")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        try:
            yield self._conn
        except BaseException:
            self.close()
            raise

    def reopen_short(self) -> None:
        """Leave the kept session alone (the stuck main thread may be using it) and make the next
        one new and short-lived: the run ends without waiting for a server that stopped answering."""
        self._conn = None
        self._timeouts = "SET lock_timeout = '1s'; SET statement_timeout = '1s'"

    def close(self) -> None:
        """End the ledger's session (the run is over, or the connection failed)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken connection: nothing left to close
                conn.close()

    def _name(self, suffix: str = "") -> str:
        return f"{quote(self.schema or '')}.{quote(self.table + suffix)}"

    @property
    def runs(self) -> str:
        return self._name()

    @property
    def revisions(self) -> str:
        return self._name("_revisions")

    # -- DDL ---------------------------------------------------------------------------------
    def exists(self, conn: Connection) -> bool:
        return conn.execute(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": self.runs}).scalar_one()

    def ensure(self, conn: Connection) -> bool:
        """Create the tables that are missing; return whether any was. Checking first lets a role
        without CREATE on the schema use tables a DBA created for it."""
        missing = [ddl for ddl, name in ((RUNS_DDL, self.runs), (REVISIONS_DDL, self.revisions))
                   if conn.execute(sa.text("SELECT to_regclass(:t) IS NULL"), {"t": name}).scalar_one()]
        for ddl in missing:
            try:
                conn.execute(sa.text(ddl.format(runs=self.runs, revisions=self.revisions)))
            except sa.exc.DBAPIError as exc:
                if getattr(exc.orig, "pgcode", None) not in _ALREADY_THERE:
                    raise
        return bool(missing)

    # -- checksums ---------------------------------------------------------------------------
    def has_revisions(self, conn: Connection) -> bool:
        return conn.execute(sa.text("SELECT to_regclass(:t) IS NOT NULL"),
                            {"t": self.revisions}).scalar_one()

    def revision_columns(self, conn: Connection) -> dict[str, str]:
        """{column: type} of the revisions table as it is now (someone may have changed it)."""
        return dict(conn.execute(sa.text(integrity.COLUMNS_SQL), {"t": self.revisions}).tuples().all())

    def recorded(self, conn: Connection) -> dict[str, Recorded]:
        rows = conn.execute(sa.text(f"SELECT revision, checksum, kind, recorded_at, run_id "
                                    f"FROM {self.revisions}"))
        return {plain(r.revision): Recorded(plain(r.checksum), plain(r.kind), r.recorded_at,
                                            plain(r.run_id)) for r in rows}

    def old_checksums(self, conn: Connection) -> dict[str, str | None]:
        """{revision: checksum as text, whatever its column's type now, None when it has none}."""
        return dict(conn.execute(sa.text(f"SELECT to_jsonb(r) ->> 'revision', to_jsonb(r) ->> 'checksum' "
                                         f"FROM {self.revisions} r")).tuples().all())

    def record(self, conn: Connection, entries: list[tuple[str, str, str]], kind: str,
               replace: bool) -> None:
        """Record (revision, checksum, script) entries as kind; replace: overwrite a row. One
        statement: all of them or none (a partial baseline would look like deleted rows)."""
        if entries:
            conn.execute(self._record_sql(replace), self._record_params(entries, kind))

    def rebuild_checksums(self, conn: Connection, problems: dict[str, str],
                          entries: list[tuple[str, str, str]]) -> None:
        """repair: give the revisions table its checksum column back (dropped or retyped), record
        entries (every applied revision) and drop the rows left without a checksum (revisions not
        applied), in one transaction (one multi-statement query runs as one)."""
        fix = (f"ALTER TABLE {self.revisions} ADD COLUMN checksum text NOT NULL DEFAULT ''"
               if problems["checksum"] == "is missing" else
               f"ALTER TABLE {self.revisions} ALTER COLUMN checksum DROP NOT NULL, "
               f"ALTER COLUMN checksum TYPE text USING '', ALTER COLUMN checksum SET DEFAULT ''")
        conn.execute(sa.text(f"{fix}; {self._record_sql(True).text}; "
                             f"DELETE FROM {self.revisions} WHERE checksum = ''; "
                             f"ALTER TABLE {self.revisions} ALTER COLUMN checksum DROP DEFAULT, "
                             f"ALTER COLUMN checksum SET NOT NULL"),
                     self._record_params(entries, "repaired"))

    def _record_sql(self, replace: bool) -> sa.TextClause:
        action = ("DO UPDATE SET checksum = EXCLUDED.checksum, kind = EXCLUDED.kind, script = "
                  "EXCLUDED.script, recorded_at = EXCLUDED.recorded_at, run_id = EXCLUDED.run_id"
                  if replace else "DO NOTHING")
        return sa.text(f"INSERT INTO {self.revisions} (revision, checksum, kind, script, run_id) "
                       f"SELECT r, c, :kind, s, :run_id FROM unnest(CAST(:revs AS text[]), "
                       f"CAST(:sums AS text[]), CAST(:scripts AS text[])) AS e(r, c, s) "
                       f"ON CONFLICT (revision) {action}")

    def _record_params(self, entries: list[tuple[str, str, str]], kind: str) -> dict[str, Any]:
        return {"revs": [r for r, _, _ in entries], "sums": [c for _, c, _ in entries],
                "scripts": [s for _, _, s in entries], "kind": kind, "run_id": self.run.run_id}

    def forget(self, conn: Connection, revisions: list[str]) -> None:
        """Drop the rows of revisions that are no longer applied (downgraded, stamped away)."""
        if revisions:
            conn.execute(sa.text(f"DELETE FROM {self.revisions} WHERE revision = ANY(:revs)"),
                         {"revs": list(revisions)})

    # -- runs --------------------------------------------------------------------------------
    def save_run(self, conn: Connection, row: dict[str, Any], finished: bool) -> None:
        """Insert or update this run's row (a row starts as 'running' and is completed at the end)."""
        cols = [c for c in RUN_COLUMNS if c not in ("started_at", "finished_at", "db_user", "steps")]
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in (*cols[1:], "steps", "finished_at"))
        conn.execute(sa.text(
            f"INSERT INTO {self.runs} ({', '.join(cols)}, steps, started_at, finished_at) "
            f"VALUES ({', '.join(':' + c for c in cols)}, CAST(:steps AS jsonb), "
            f"to_timestamp(:started_at), CASE WHEN :finished THEN clock_timestamp() END) "
            f"ON CONFLICT (id) DO UPDATE SET {updates}"),
            {**row, "steps": json.dumps(row["steps"]), "finished": finished})

    def all_runs(self, conn: Connection) -> list[dict[str, Any]]:
        return [dict(r) for r in conn.execute(sa.text(
            f"SELECT {', '.join(RUN_COLUMNS)} FROM {self.runs}")).mappings()]  # put back as they are

    def put_back(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Write rows read before a restore back (the restore replaced the table with the backup's:
        rows the backup holds too are overwritten with their later, completed state)."""
        if not rows:
            return
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in RUN_COLUMNS[1:])
        values = ", ".join("CAST(:steps AS jsonb)" if c == "steps" else f":{c}" for c in RUN_COLUMNS)
        conn.execute(sa.text(f"INSERT INTO {self.runs} ({', '.join(RUN_COLUMNS)}) VALUES ({values}) "
                             f"ON CONFLICT (id) DO UPDATE SET {updates}"),
                     [{**r, "id": str(r["id"]), "steps": json.dumps(r["steps"])} for r in rows])

    def latest(self, conn: Connection, limit: int) -> list[dict[str, Any]]:
        """Return the newest rows first, with the run's duration in seconds."""
        return [{k: plain(v) for k, v in r.items()} for r in conn.execute(sa.text(
            f"SELECT {', '.join(RUN_COLUMNS)}, "
            f"extract(epoch FROM finished_at - started_at)::float8 AS seconds "
            f"FROM {self.runs} ORDER BY started_at DESC, id LIMIT :n"), {"n": limit}).mappings()]


def plain(value: Any) -> Any:
    """A value as the ledger shows it: binary (a bytea column, e.g. one retyped by hand) as hex
    in PostgreSQL's spelling, never Python's `<memory at 0x...>`."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    return value
