"""The ledger's two tables on a SQLite file: the same columns and semantics as runner.ledger.store,
in SQL that SQLite speaks.

Timestamps are stored as ISO 8601 text in UTC (they sort as text) and read back as aware
datetimes; steps as JSON text. Writes that must land together (a baseline, a repair) run in one
BEGIN IMMEDIATE ... COMMIT. SQLite has no users: db_user is the operating system's user.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner import db
from runner.context import Run
from runner.ledger.store import KINDS, RUN_COLUMNS, Recorded, Store, plain
from runner.sqlname import quote

RUNS_DDL = """
CREATE TABLE IF NOT EXISTS {runs} (
    id              TEXT PRIMARY KEY,
    run_id          TEXT NOT NULL,
    command         TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    exit_code       INTEGER,
    from_revision   TEXT,
    to_revision     TEXT,
    target          TEXT,
    steps           TEXT NOT NULL DEFAULT '[]',
    error           TEXT,
    backup_key      TEXT,
    started_at      TIMESTAMP NOT NULL,
    finished_at     TIMESTAMP,
    runner_version  TEXT,
    image_version   TEXT,
    image_revision  TEXT,
    host            TEXT,
    job_name        TEXT,
    db_user         TEXT NOT NULL DEFAULT ''
)"""

REVISIONS_DDL = f"""
CREATE TABLE IF NOT EXISTS {{revisions}} (
    revision     TEXT PRIMARY KEY,
    checksum     TEXT NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ({', '.join(f"'{k}'" for k in KINDS)})),
    script       TEXT,
    recorded_at  TIMESTAMP NOT NULL,
    run_id       TEXT
)"""

# SQLite's declared types, as runner.ledger.integrity knows PostgreSQL's
_TYPES = {"text": "text", "timestamp": "timestamp with time zone", "datetime": "timestamp with time zone"}


def store_for(run: Run, schema: str | None) -> Store:
    """Return the ledger's store for the run's database: PostgreSQL's, or SQLite's."""
    if run.settings.database_url.is_sqlite:
        return SqliteStore(run, schema)
    return Store(run, schema)


def now() -> str:
    return stamp(dt.datetime.now(dt.UTC))


def stamp(when: dt.datetime) -> str:
    """Return a timestamp as the SQLite ledger stores it: UTC, ISO 8601, microseconds (sorts as text)."""
    return when.astimezone(dt.UTC).isoformat(timespec="microseconds")


def moment(value: Any) -> Any:
    """Return a stored timestamp as an aware datetime (other values as they are)."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            found = dt.datetime.fromisoformat(value)
            return found if found.tzinfo else found.replace(tzinfo=dt.UTC)
    return value


class SqliteStore(Store):
    """runner.ledger.store.Store for a SQLite file (schema "main" unless env.py names another)."""

    @contextlib.contextmanager
    def session(self) -> Iterator[Connection]:
        if self._conn is None:
            self._conn = db.connect(self.run, "ledger", autocommit=True)
            self.schema = self.schema or "main"
        try:
            yield self._conn
        except BaseException:
            self.close()
            raise

    # -- DDL ---------------------------------------------------------------------------------
    def _has(self, conn: Connection, table: str) -> bool:
        return conn.execute(sa.text(f"SELECT 1 FROM {self._schema}.sqlite_master WHERE type = "
                                    "'table' AND name = :n"), {"n": table}).first() is not None

    @property
    def _schema(self) -> str:
        return quote(self.schema or "main")

    def exists(self, conn: Connection) -> bool:
        return self._has(conn, self.table)

    def has_revisions(self, conn: Connection) -> bool:
        return self._has(conn, self.table + "_revisions")

    def ensure(self, conn: Connection) -> bool:
        missing = [ddl for ddl, table in ((RUNS_DDL, self.table), (REVISIONS_DDL, self.table + "_revisions"))
                   if not self._has(conn, table)]
        for ddl in missing:
            conn.exec_driver_sql(ddl.format(runs=self.runs, revisions=self.revisions))
        return bool(missing)

    # -- checksums ---------------------------------------------------------------------------
    def revision_columns(self, conn: Connection) -> dict[str, str]:
        rows = conn.exec_driver_sql(f"PRAGMA {self._schema}.table_info({quote(self.table + '_revisions')})")
        return {r[1]: _TYPES.get(str(r[2]).lower(), str(r[2]).lower()) for r in rows}

    def recorded(self, conn: Connection) -> dict[str, Recorded]:
        found = super().recorded(conn)
        return {rev: Recorded(r.checksum, r.kind, moment(r.recorded_at), r.run_id)
                for rev, r in found.items()}

    def old_checksums(self, conn: Connection) -> dict[str, str | None]:
        has = "checksum" in self.revision_columns(conn)
        rows = conn.execute(sa.text(f"SELECT revision, {'checksum' if has else 'NULL'} "
                                    f"FROM {self.revisions}"))
        return {str(plain(r)): None if c is None else str(plain(c)) for r, c in rows}

    def record(self, conn: Connection, entries: list[tuple[str, str, str]], kind: str,
               replace: bool) -> None:
        if entries:
            with _atomic(conn):
                self._record(conn, entries, kind, replace)

    def _record(self, conn: Connection, entries: list[tuple[str, str, str]], kind: str,
                replace: bool) -> None:
        action = ("DO UPDATE SET checksum = excluded.checksum, kind = excluded.kind, script = "
                  "excluded.script, recorded_at = excluded.recorded_at, run_id = excluded.run_id"
                  if replace else "DO NOTHING")
        when = now()
        conn.execute(sa.text(f"INSERT INTO {self.revisions} (revision, checksum, kind, script, "
                             f"recorded_at, run_id) VALUES (:r, :c, :kind, :s, :at, :run_id) "
                             f"ON CONFLICT (revision) {action}"),
                     [{"r": r, "c": c, "s": s, "kind": kind, "at": when, "run_id": self.run.run_id}
                      for r, c, s in entries])

    def rebuild_checksums(self, conn: Connection, problems: dict[str, str],
                          entries: list[tuple[str, str, str]]) -> None:
        """Rebuild the revisions table for repair (SQLite cannot retype a column): copy it into a
        new one of the right shape (checksums blank), record entries and drop what has no
        checksum, in one transaction."""
        temp = f"{self._schema}.{quote(self.table + '_revisions_rebuilt')}"
        with _atomic(conn):
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {temp}")
            conn.exec_driver_sql(REVISIONS_DDL.format(revisions=temp))
            conn.exec_driver_sql(f"INSERT INTO {temp} (revision, checksum, kind, script, recorded_at, "
                                 f"run_id) SELECT revision, '', kind, script, coalesce(recorded_at, "
                                 f"'{now()}'), run_id FROM {self.revisions}")
            conn.exec_driver_sql(f"DROP TABLE {self.revisions}")
            conn.exec_driver_sql(f"ALTER TABLE {temp} RENAME TO {quote(self.table + '_revisions')}")
            self._record(conn, entries, "repaired", replace=True)
            conn.exec_driver_sql(f"DELETE FROM {self.revisions} WHERE checksum = ''")

    def forget(self, conn: Connection, revisions: list[str]) -> None:
        if revisions:
            conn.execute(sa.text(f"DELETE FROM {self.revisions} WHERE revision IN :revs").bindparams(
                sa.bindparam("revs", expanding=True)), {"revs": list(revisions)})

    # -- runs --------------------------------------------------------------------------------
    def save_run(self, conn: Connection, row: dict[str, Any], finished: bool) -> None:
        cols = [c for c in RUN_COLUMNS if c not in ("started_at", "finished_at", "db_user", "steps")]
        updates = ", ".join(f"{c} = excluded.{c}" for c in (*cols[1:], "steps", "finished_at"))
        started = stamp(dt.datetime.fromtimestamp(row["started_at"], dt.UTC))
        conn.execute(sa.text(
            f"INSERT INTO {self.runs} ({', '.join(cols)}, steps, started_at, finished_at, db_user) "
            f"VALUES ({', '.join(':' + c for c in cols)}, :steps, :started, :finished, :db_user) "
            f"ON CONFLICT (id) DO UPDATE SET {updates}"),
            {**{c: row[c] for c in cols}, "steps": json.dumps(row["steps"]), "started": started,
             "finished": now() if finished else None, "db_user": _os_user()})

    def all_runs(self, conn: Connection) -> list[dict[str, Any]]:
        rows = [dict(r) for r in conn.execute(sa.text(
            f"SELECT {', '.join(RUN_COLUMNS)} FROM {self.runs}")).mappings()]
        return [{**r, "steps": _steps(r["steps"])} for r in rows]

    def put_back(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        updates = ", ".join(f"{c} = excluded.{c}" for c in RUN_COLUMNS[1:])
        conn.execute(sa.text(f"INSERT INTO {self.runs} ({', '.join(RUN_COLUMNS)}) VALUES "
                             f"({', '.join(':' + c for c in RUN_COLUMNS)}) "
                             f"ON CONFLICT (id) DO UPDATE SET {updates}"),
                     [{**r, "id": str(r["id"]), "steps": json.dumps(r["steps"])} for r in rows])

    def latest(self, conn: Connection, limit: int) -> list[dict[str, Any]]:
        rows = conn.execute(sa.text(f"SELECT {', '.join(RUN_COLUMNS)} FROM {self.runs} "
                                    "ORDER BY started_at DESC, id LIMIT :n"), {"n": limit}).mappings()
        out = []
        for r in rows:
            row = {k: plain(v) for k, v in r.items()}
            row.update(steps=_steps(row["steps"]), started_at=moment(row["started_at"]),
                       finished_at=moment(row["finished_at"]))
            start, end = row["started_at"], row["finished_at"]
            took = (end - start).total_seconds() if isinstance(end, dt.datetime) \
                and isinstance(start, dt.datetime) else None
            out.append({**row, "seconds": took})
        return out


@contextlib.contextmanager
def _atomic(conn: Connection) -> Iterator[None]:
    """Run the block in one write transaction on the (autocommit) ledger connection."""
    conn.exec_driver_sql("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sa.exc.DBAPIError):
            conn.exec_driver_sql("ROLLBACK")
        raise
    conn.exec_driver_sql("COMMIT")


def _steps(value: Any) -> Any:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (a container's arbitrary uid)
        return "?"
