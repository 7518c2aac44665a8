"""backfill(table, set, where): update every row that exists when it starts, in short batches.

Keyset batches on the primary key, from the smallest key to the largest key seen at the start
(rows inserted later are the application's to write, so the backfill ends under any insert rate:
pgroll#583). Each batch is one statement, hence one transaction, on the revision's connection
outside the revision's transaction: it locks its batch's rows and records its checkpoint in
runner_backfills in that same transaction, so a crash loses at most the batch that was running
and a rerun continues from the checkpoint. The batch size follows ONLINE_BACKFILL_BATCH_TIME; a
pause separates batches; the backfill waits while a streaming replica lags more than
ONLINE_BACKFILL_MAX_REPLICATION_LAG; SIGTERM and RUN_DEADLINE stop it between batches (a batch
that is cancelled rolls back with its checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from runner.errors import MigrationFailed
from runner.migrate.lockschedule import Attempt
from runner.online import catalog, replicas, state
from runner.online.catalog import Table
from runner.online.session import DEADLOCK_DETECTED, LOCK_NOT_AVAILABLE, LockWait, Session, literal, sqlstate
from runner.sqlname import quote

MIN_BATCH = 10
REPLICA_CHECK_EVERY = 0.25  # seconds between two looks at the replicas
REPLICA_WAIT_POLL = 0.5


@dataclasses.dataclass(frozen=True)
class Spec:
    """What to update, and where the checkpoint lives."""

    name: str
    table: Table
    key: str
    key_type: str
    assignment: str
    condition: str | None
    state_table: str


def backfill(s: Session, table_name: str, set: Mapping[str, Any] | str, where: Any = None, *,
             schema: str | None = None, name: str | None = None) -> None:
    """Run (or resume) the backfill to its end."""
    table = catalog.table(s.conn, table_name, schema)
    key, key_type = single_key(s, table)
    assignment = render_set(s, set, key)
    condition = render_sql(s, where) if where is not None else None
    spec = Spec(name or default_name(table, assignment, condition), table, key, key_type, assignment,
                condition, state.table(s.version_schema))
    Backfill(s, spec).run()


def single_key(s: Session, table: Table) -> tuple[str, str]:
    key = catalog.primary_key(s.conn, table)
    if len(key) != 1:
        found = f"a primary key of {len(key)} columns ({', '.join(c for c, _ in key)})" if key else \
            "no primary key"
        raise MigrationFailed(f"{s.what}: {table} has {found}: a backfill walks the table in the "
                              "order of a single-column primary key; add one, or update the table "
                              "another way")
    return key[0]


def render_sql(s: Session, value: Any) -> str:
    """SQL text as given, or an SQLAlchemy expression rendered with its values inline."""
    if isinstance(value, str):
        return value
    return s.compile(value, literal_binds=True)


def render_set(s: Session, values: Mapping[str, Any] | str, key: str) -> str:
    if isinstance(values, str):
        return values
    if not values:
        raise MigrationFailed(f"{s.what}: set= names no column")
    if key in values:
        raise MigrationFailed(f"{s.what}: set= assigns the primary key {key}, which the backfill walks")
    return ", ".join(f"{quote(column)} = {render_sql(s, value)}" for column, value in values.items())


def default_name(table: Table, assignment: str, condition: str | None) -> str:
    digest = hashlib.sha1(f"{assignment}\0{condition}".encode()).hexdigest()[:10]
    return f"{table}:{digest}"


class Backfill:
    def __init__(self, s: Session, spec: Spec) -> None:
        self.s, self.spec = s, spec
        self.settings = s.settings
        self.sizer = Sizer(self.settings.online_backfill_batch_size,
                           self.settings.online_backfill_batch_time,
                           self.settings.online_backfill_max_batch_size)
        self.lock_timeout: float | None = None
        self.replicas = replicas.Gauge()
        self.next_replica_check = 0.0

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        s, spec = self.s, self.spec
        state.ensure(s.conn, s.version_schema)
        s.with_revision.append(lambda conn: state.revision_applied(conn, s.version_schema, spec.name))
        row = self.resume_or_start()
        if row["state"] == "done":
            s.done(f"backfill {spec.name} finished before (its revision did not commit): not again")
            return
        last, upper = row["checkpoint"], row["upper_bound"]
        progress = Progress(s, spec.name, row["rows_done"], row["rows_estimate"])
        while upper is not None:
            s.run.cancel.check()
            self.wait_for_replicas(progress)
            t0 = time.monotonic()
            claimed, new_last, visited, updated = self.batch(last, upper)
            seconds = time.monotonic() - t0
            if not claimed:  # another session moved the checkpoint: carry on from where it is
                row = state.get(s.conn, s.version_schema, spec.name) or {}
                if row.get("state") != "running":
                    break
                last = row["checkpoint"]
                continue
            if not visited:
                break
            last = new_last
            progress.batch(visited, updated, self.sizer.size, seconds)
            self.sizer.batch(visited, seconds)
            s.run.cancel.sleep(self.settings.online_backfill_pause)
        state.finish(s.conn, s.version_schema, spec.name)
        progress.finished()
        s.done(f"backfill {spec.name} finished")

    def resume_or_start(self) -> dict[str, Any]:
        s, spec = self.s, self.spec
        row = state.get(s.conn, s.version_schema, spec.name)
        same = row is not None and (row["relation"], row["key_column"], row["assignment"],
                                    row["condition"]) == (str(spec.table), spec.key, spec.assignment,
                                                          spec.condition)
        # the checkpoint counts rows of the table it walked: not of one created again since
        recreated = same and row["relation_oid"] is not None and int(row["relation_oid"]) != spec.table.oid
        same = same and not recreated
        if row is not None and same and row["state"] == "running":
            s.run.log("backfill.resume", f"backfill {spec.name}: resuming after key "
                      f"{row['checkpoint'] or '(none)'}: {row['rows_done']} of "
                      f"~{row['rows_estimate']} rows were done", name=spec.name,
                      checkpoint=row["checkpoint"], rows_done=row["rows_done"])
            self.sizer.size = min(row["batch_size"] or self.sizer.size, self.sizer.maximum)
            return row
        if row is not None and same and not row["revision_applied"]:
            return row  # finished, but the revision that ran it did not commit: do not redo it
        if row is not None:
            why = ("ran for an earlier application of its revision: running it again" if same
                   else f"walked another table {row['relation']} (dropped and created again since): "
                   "starting again from the first row" if recreated
                   else "was defined differently before: starting again from the first row")
            s.run.log("backfill.restart", f"backfill {spec.name} {why}", name=spec.name)
        upper = s.sql(f"SELECT {quote(spec.key)}::text AS runner_key FROM {spec.table.sql} "
                      f"ORDER BY {quote(spec.key)} DESC LIMIT 1").scalar()
        values = {"name": spec.name, "revision": s.revision, "relation": str(spec.table),
                  "key_column": spec.key, "assignment": spec.assignment, "condition": spec.condition,
                  "upper_bound": upper, "rows_estimate": self.estimate(), "batch_size": self.sizer.size,
                  "relation_oid": spec.table.oid}
        state.start(s.conn, s.version_schema, values)
        s.run.log("backfill.start", f"backfill {spec.name}: up to {spec.key} = {upper}, "
                  f"~{values['rows_estimate']} rows", name=spec.name, upper_bound=upper,
                  rows_estimate=values["rows_estimate"])
        return {**values, "checkpoint": None, "rows_done": 0, "state": "running"}

    def estimate(self) -> int:
        """Rows in the table: the planner's estimate, or a count when there is none (small)."""
        rel = self.s.query("SELECT reltuples::bigint AS n, relpages FROM pg_class WHERE oid = :t",
                           t=self.spec.table.oid).one()
        if rel.n >= 0 and not (rel.n == 0 and rel.relpages > 0):
            return int(rel.n)
        return int(self.s.sql(f"SELECT count(*) FROM {self.spec.table.sql}").scalar_one())

    # -- one batch -----------------------------------------------------------------------------
    def batch(self, last: str | None, upper: str) -> tuple[bool, str | None, int, int]:
        """Update the next batch of keys after last and record the checkpoint, in one statement;
        retry it on lock_timeout under the schedule (halving it). Return (claimed, new checkpoint,
        keys visited, rows updated)."""
        def attempt(a: Attempt) -> tuple[bool, str | None, int, int]:
            if self.lock_timeout != a.lock_timeout:
                self.s.set_lock_timeout(a.lock_timeout)
                self.lock_timeout = a.lock_timeout
            try:
                r = self.s.sql(batch_sql(self.spec, last, upper, self.sizer.size)).one()
            except sa.exc.DBAPIError as exc:
                self.s.run.cancel.check()
                if sqlstate(exc) not in (LOCK_NOT_AVAILABLE, DEADLOCK_DETECTED):
                    raise
                self.sizer.halve()
                raise LockWait(f"batch after key {last}", self.s.holders([self.spec.table.oid])) from None
            return bool(r.claimed), r.last, int(r.visited or 0), int(r.updated or 0)

        return self.s.retried(attempt)

    def wait_for_replicas(self, progress: Progress) -> None:
        limit = self.settings.online_backfill_max_replication_lag
        if not limit or time.monotonic() < self.next_replica_check:
            return
        while True:
            worst = self.replicas.worst(self.s.conn)
            self.next_replica_check = time.monotonic() + REPLICA_CHECK_EVERY
            if worst is None or worst.seconds <= limit:
                progress.waiting = None
                return
            progress.wait(f"replica {worst.replica} lags {worst.seconds:.1f}s > {limit:g}s")
            self.s.run.cancel.sleep(REPLICA_WAIT_POLL)


def batch_sql(spec: Spec, last: str | None, upper: str, size: int) -> str:
    """The batch: claim the checkpoint (locking the state row), find the next `size` keys after
    it, update their rows, move the checkpoint. Values are inlined: the planner sees constants
    and the key range becomes an index range scan."""
    k, t, typ, name = quote(spec.key), spec.table.sql, spec.key_type, literal(spec.name)
    after = f" AND {k} > {literal(last)}::{typ}" if last is not None else ""
    condition = f" AND ({spec.condition})" if spec.condition else ""
    return f"""
WITH runner_claim AS (
    SELECT 1 FROM {spec.state_table}
    WHERE name = {name} AND state = 'running' AND checkpoint IS NOT DISTINCT FROM {literal(last)}
    FOR UPDATE
), runner_keys AS (
    SELECT {k} AS k FROM {t}
    WHERE EXISTS (SELECT FROM runner_claim){after} AND {k} <= {literal(upper)}::{typ}
    ORDER BY {k} LIMIT {int(size)}
), runner_bound AS (
    SELECT (SELECT k FROM runner_keys ORDER BY k DESC LIMIT 1) AS b,
           (SELECT count(*) FROM runner_keys) AS c
), runner_done AS (
    UPDATE {t} SET {spec.assignment}
    WHERE {k} <= (SELECT b FROM runner_bound){after}{condition}
    RETURNING 1
), runner_mark AS (
    UPDATE {spec.state_table}
    SET checkpoint = (SELECT b::text FROM runner_bound),
        rows_done = rows_done + (SELECT c FROM runner_bound),
        rows_updated = rows_updated + (SELECT count(*) FROM runner_done),
        batch_size = {int(size)}, updated_at = now()
    WHERE name = {name} AND (SELECT c FROM runner_bound) > 0
)
SELECT (SELECT count(*) FROM runner_claim) AS claimed, (SELECT b::text FROM runner_bound) AS last,
       (SELECT c FROM runner_bound) AS visited, (SELECT count(*) FROM runner_done) AS updated"""


class Sizer:
    """The batch size that fits ONLINE_BACKFILL_BATCH_TIME, from a moving average of the time per
    row (one slow or fast batch moves it little), changing by at most 2x from one batch to the
    next, between MIN_BATCH and ONLINE_BACKFILL_MAX_BATCH_SIZE."""

    SMOOTHING = 0.3  # weight of the latest batch in the average

    def __init__(self, size: int, target: float, maximum: int) -> None:
        self.size, self.target, self.maximum = size, target, maximum
        self.per_row: float | None = None

    def batch(self, visited: int, seconds: float) -> int:
        if visited < self.size:  # the last, short batch (or a retried one) says little
            return self.size
        latest = max(seconds, 1e-4) / visited
        self.per_row = latest if self.per_row is None else (
            self.SMOOTHING * latest + (1 - self.SMOOTHING) * self.per_row)
        fits = self.target / self.per_row
        self.size = int(max(MIN_BATCH, min(self.maximum, self.size * 2, max(self.size / 2, fits))))
        return self.size

    def halve(self) -> int:
        self.size = max(MIN_BATCH, self.size // 2)
        return self.size


class Progress:
    """One log line every ONLINE_BACKFILL_PROGRESS_INTERVAL: rows done of the estimate, rows/s
    since the last line, ETA, batch size and time, and what the backfill waits for."""

    def __init__(self, s: Session, name: str, done: int, estimate: int | None) -> None:
        self.s, self.name, self.done, self.estimate = s, name, done, estimate or 0
        self.updated = 0
        self.interval = s.settings.online_backfill_progress_interval
        self.t0 = self.since = time.monotonic()
        self.at_since = done
        self.waiting: str | None = None
        self.last_batch = (0, 0.0)

    def batch(self, visited: int, updated: int, size: int, seconds: float) -> None:
        self.done += visited
        self.updated += updated
        self.last_batch = (size, seconds)
        if time.monotonic() - self.since >= self.interval:
            self.log()

    def wait(self, why: str) -> None:
        first = self.waiting is None
        self.waiting = why
        if first or time.monotonic() - self.since >= self.interval:
            self.log()

    def log(self) -> None:
        now = time.monotonic()
        rate = (self.done - self.at_since) / max(now - self.since, 1e-6)
        left = max(0, self.estimate - self.done)
        eta = round(left / rate) if rate > 0 else None
        pct = min(100, round(100 * self.done / self.estimate)) if self.estimate else None
        size, seconds = self.last_batch
        text = (f"backfill {self.name}: {self.done} of ~{self.estimate} rows"
                + (f" ({pct}%)" if pct is not None else "") + f", {rate:.0f} rows/s"
                + (f", ETA {eta}s" if eta is not None else "")
                + f"; batch {size} rows in {seconds * 1000:.0f} ms"
                + (f"; waiting: {self.waiting}" if self.waiting else ""))
        self.s.run.log("backfill.progress", text, name=self.name, rows_done=self.done,
                       rows_estimate=self.estimate, rows_per_s=round(rate), eta_s=eta,
                       batch_size=size, batch_ms=round(seconds * 1000), waiting=self.waiting)
        self.since, self.at_since = now, self.done

    def finished(self) -> None:
        took = time.monotonic() - self.t0
        self.s.run.log("backfill.done", f"backfill {self.name}: done, {self.done} rows visited, "
                       f"{self.updated} updated in {took:.1f}s", name=self.name,
                       rows_done=self.done, rows_updated=self.updated, seconds=round(took, 3))
