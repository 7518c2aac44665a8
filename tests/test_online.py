"""Online operations (runner.online, docs/online.md) on real PostgreSQL: the waits of CREATE INDEX
CONCURRENTLY, leftovers of failed attempts, a crash between any two steps, backfills that resume
exactly once, replication lag, and writers that keep writing through expand and contract.

Most tests run the operations in-process through Alembic's Operations on a real connection (as
under plain `alembic`, with the run's settings handed in as the runner does); the crash, signal
and exit-code tests run the real runner on the scenario in tests/scenarios/online*.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import signal
import subprocess
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
import sqlalchemy as sa
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy.pool import NullPool

import runner.online  # noqa: F401 - registers the operations
from runner import cli
from runner.config import Settings
from runner.context import Run
from runner.errors import LockRetriesExhausted, MigrationFailed, PreflightRefused
from runner.log import EventLog
from runner.online import backfill, replicas, session
from tests.autovacuum_worker import vacuuming
from tests.conftest import REPO, Database, finish, run_runner, runner_env, start_runner, wait_for
from tests.pgcluster import APP_PASSWORD

# short waits everywhere: 100 ms lock_timeout per attempt, few attempts, short pauses
QUICK = dict(migration_lock_timeout=0.1, lock_retry_attempts=3, lock_retry_max_wait=0.05,
             online_backfill_pause=0.0, online_backfill_progress_interval=0.2)


def online_run(**overrides: Any) -> tuple[Run, io.StringIO]:
    """A run as the runner hands it to the operations, logging JSON into a buffer."""
    buf = io.StringIO()
    settings = dataclasses.replace(Settings(), **{**QUICK, **overrides})
    return Run(settings=settings, log=EventLog("json", stream=buf), command="test"), buf


def events(buf: io.StringIO, name: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, buf.getvalue().splitlines()) if e["event"] == name]


def apply(url: str, fn: Callable[[Operations], None], run: Run | None = None) -> None:
    """Run fn(op) as a revision's upgrade() runs: inside the transaction Alembic manages."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://"), poolclass=NullPool)
    cfg = Config()
    cfg.attributes["runner_run"] = run
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(connection=conn,
                                             environment_context=types.SimpleNamespace(config=cfg))
            with ctx.begin_transaction():
                fn(Operations(ctx))
    finally:
        engine.dispose()


@contextlib.contextmanager
def session_holding(url: str, *statements: str, release_after: float | None = None,
                    isolation: str | None = None) -> Iterator[int]:
    """Another session in an open transaction that ran statements; yields its pid. Rolled back
    after release_after seconds, or when the block ends."""
    conn = psycopg2.connect(url)
    if isolation:
        conn.set_session(isolation_level=isolation)
    cur = conn.cursor()
    cur.execute("SELECT pg_backend_pid()")
    pid = cur.fetchone()[0]
    for statement in statements:
        cur.execute(statement)
    timer = threading.Timer(release_after, conn.rollback) if release_after is not None else None
    if timer:
        timer.start()
    try:
        yield pid
    finally:
        if timer:
            timer.join()
        conn.close()


def snapshot_held(url: str, release_after: float | None = None) -> contextlib.AbstractContextManager[int]:
    """An idle REPEATABLE READ transaction with a snapshot: every CONCURRENTLY build waits for it."""
    return session_holding(url, "SELECT count(*) FROM pg_class", release_after=release_after,
                           isolation="REPEATABLE READ")


def plain_concurrent_build_fails(url: str, statement: str) -> None:
    """The trap: CREATE INDEX CONCURRENTLY under a 100 ms lock_timeout fails on a tiny table when
    any older snapshot exists, and leaves its index INVALID."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with pytest.raises(psycopg2.errors.LockNotAvailable):
            cur = conn.cursor()
            cur.execute("SET lock_timeout = '100ms'")
            cur.execute(statement)
    finally:
        conn.close()


def index_state(db: Database, name: str) -> str:
    """'valid', 'invalid' or '' (no such index), and its columns."""
    return db.sql(f"SELECT CASE WHEN indisvalid THEN 'valid' ELSE 'invalid' END || ' ' || "
                  f"pg_get_indexdef(indexrelid) FROM pg_index WHERE indexrelid = "
                  f"to_regclass('{name}')")


def small_table(db: Database, rows: int = 1000) -> None:
    db.sql("CREATE TABLE t (id bigint PRIMARY KEY, a int, b int); "
           f"INSERT INTO t SELECT g, g, g % 7 FROM generate_series(1, {rows}) g")


# -- CREATE / DROP INDEX CONCURRENTLY ------------------------------------------------------------

@pytest.mark.every_major
def test_index_build_outlasts_older_snapshots_under_a_100ms_lock_timeout(database: Database) -> None:
    small_table(database)
    with snapshot_held(database.url, release_after=1.5):
        plain_concurrent_build_fails(database.url, "CREATE INDEX CONCURRENTLY ix_plain ON t (a)")
        run, log = online_run()
        t0 = time.monotonic()
        apply(database.url, lambda op: op.create_index_online("ix_t_a", "t", ["a"]), run)
        waited = time.monotonic() - t0
    assert index_state(database, "ix_t_a").startswith("valid"), log.getvalue()
    assert waited > 0.5, "the build should have waited for the older snapshot"
    assert not events(log, "online.retry"), "waiting for a snapshot is not a lock_timeout"


def test_index_build_waits_for_older_transactions_up_to_its_own_timeout(database: Database) -> None:
    """Bounded overall (ONLINE_INDEX_WAIT_TIMEOUT, exit 8 naming the old transaction); the INVALID
    index it leaves is rebuilt by the rerun, never kept (strong_migrations#233)."""
    small_table(database)
    run, log = online_run(online_index_wait_timeout=0.6)
    with snapshot_held(database.url) as holder:
        t0 = time.monotonic()
        with pytest.raises(LockRetriesExhausted) as failed:
            apply(database.url, lambda op: op.create_index_online("ix_t_a", "t", ["a"]), run)
        assert time.monotonic() - t0 < 10
    assert "older transactions" in str(failed.value) and f"pid {holder}" in str(failed.value)
    assert index_state(database, "ix_t_a").startswith("invalid")
    run, log = online_run()
    apply(database.url, lambda op: op.create_index_online("ix_t_a", "t", ["a"]), run)
    assert index_state(database, "ix_t_a").startswith("valid")
    assert [e["index"] for e in events(log, "online.leftover")] == ["ix_t_a"]


def test_a_leftover_of_another_definition_is_rebuilt_as_asked_unless_policy_refuses(
        database: Database) -> None:
    small_table(database)
    with snapshot_held(database.url):
        plain_concurrent_build_fails(database.url, "CREATE INDEX CONCURRENTLY ix_t ON t (b)")
    refuse, _ = online_run(invalid_index_policy="refuse")
    with pytest.raises(PreflightRefused, match="INVALID_INDEX_POLICY=refuse"):
        apply(database.url, lambda op: op.create_index_online("ix_t", "t", ["a"]), refuse)
    assert index_state(database, "ix_t") == "invalid CREATE INDEX ix_t ON public.t USING btree (b)"
    apply(database.url, lambda op: op.create_index_online("ix_t", "t", ["a"]), online_run()[0])
    assert index_state(database, "ix_t") == "valid CREATE INDEX ix_t ON public.t USING btree (a)"
    apply(database.url, lambda op: op.drop_index_online("ix_t", "t"), online_run()[0])
    apply(database.url, lambda op: op.drop_index_online("ix_t", "t"), online_run()[0])  # gone: no-op
    assert index_state(database, "ix_t") == ""


def test_a_table_lock_wait_is_cut_at_lock_timeout_retried_and_bounded(database: Database) -> None:
    small_table(database)
    run, log = online_run(lock_retry_attempts=30)
    with session_holding(database.url, "LOCK TABLE t IN SHARE MODE", release_after=0.8) as holder:
        apply(database.url, lambda op: op.create_index_online("ix_t_a", "t", ["a"]), run)
    assert index_state(database, "ix_t_a").startswith("valid")
    retries = events(log, "online.retry")
    assert retries and f"pid {holder}" in retries[0]["blockers"][0], log.getvalue()
    assert "LOCK TABLE t IN SHARE MODE" in retries[0]["blockers"][0]

    run, log = online_run(lock_retry_attempts=2)
    with session_holding(database.url, "LOCK TABLE t IN SHARE MODE") as holder:
        with pytest.raises(LockRetriesExhausted, match=f"in 2 attempts.*pid {holder}"):
            apply(database.url, lambda op: op.create_index_online("ix_t_b", "t", ["b"]), run)
    assert index_state(database, "ix_t_b") == "", "cancelled while queued: nothing was created"
    assert len(events(log, "online.retry")) == 1


def test_under_plain_alembic_a_step_retries_on_the_default_schedule(
        database: Database, capsys: pytest.CaptureFixture[str]) -> None:
    """No runner (plain `alembic`): the default settings' schedule, retries logged to stderr."""
    small_table(database)
    with session_holding(database.url, "LOCK TABLE t IN SHARE MODE", release_after=0.3):
        apply(database.url, lambda op: op.create_check_constraint_online("ck_t_a", "t", "a > 0"))
    assert database.sql("SELECT convalidated FROM pg_constraint WHERE conname = 'ck_t_a'") == "t"
    assert "online.retry" in capsys.readouterr().err


def test_an_autovacuum_in_the_way_is_cancelled_as_postgresql_would_or_named_with_the_grant(
        database: Database) -> None:
    """An autovacuum worker holds SHARE UPDATE EXCLUSIVE through its whole vacuum; PostgreSQL
    cancels it for a waiting lock only after deadlock_timeout (1 s), longer than any attempt, so
    every attempt would queue behind it until the schedule ends. A role that may cancel it (a
    superuser) does after the first timed-out attempt; one that may only see it (pg_monitor) says
    what to grant."""
    small_table(database, rows=10_000)
    role = f"app_{database.name}"
    database.sql(f"CREATE ROLE {role} LOGIN PASSWORD '{APP_PASSWORD}' IN ROLE pg_monitor; "
                 f"ALTER TABLE t OWNER TO {role}")
    as_role = database.cluster.url(database.name, user=role, password=APP_PASSWORD)
    with vacuuming(database, "t", "UPDATE t SET b = b + 1 WHERE id % 2 = 0") as worker:
        run, log = online_run()
        with pytest.raises(LockRetriesExhausted, match=f"pid {worker} "):
            apply(as_role, lambda op: op.set_not_null_online("t", "a"), run)
        assert "GRANT pg_signal_autovacuum_worker" in events(log, "autovacuum.kept")[0]["msg"]
        run, log = online_run()
        apply(database.url, lambda op: op.set_not_null_online("t", "a"), run)
    assert [e["pid"] for e in events(log, "autovacuum.cancelled")] == [worker], log.getvalue()
    assert database.sql("SELECT attnotnull FROM pg_attribute WHERE attrelid = 't'::regclass "
                        "AND attname = 'a'") == "t"


def test_a_unique_index_over_duplicates_fails_clearly_and_leaves_nothing(database: Database) -> None:
    small_table(database)
    with pytest.raises(MigrationFailed, match=r"duplicate values in \(b\).*remove the duplicates"):
        apply(database.url, lambda op: op.create_unique_constraint_online("uq_t_b", "t", ["b"]),
              online_run()[0])
    assert index_state(database, "uq_t_b") == ""


# -- constraints -----------------------------------------------------------------------------------

def two_tables(db: Database | Direct) -> None:
    db.sql("CREATE TABLE p (id bigint PRIMARY KEY); INSERT INTO p SELECT generate_series(1, 50); "
           "CREATE TABLE c (id bigint PRIMARY KEY, p_id bigint, a int, code text); "
           "INSERT INTO c SELECT g, g % 50 + 1, g, 'c' || g FROM generate_series(1, 500) g")


def constraints_of(db: Database, table: str) -> str:
    return db.sql(f"SELECT string_agg(conname || ':' || convalidated, ' ' ORDER BY conname) "
                  f"FROM pg_constraint WHERE conrelid = '{table}'::regclass AND contype <> 'n'")


def test_a_not_valid_leftover_is_validated_once_and_a_violation_keeps_it_not_valid(
        database: Database) -> None:
    """strong_migrations#271: a failed VALIDATE left a NOT VALID constraint that broke the rerun."""
    two_tables(database)
    database.sql("ALTER TABLE c ADD CONSTRAINT ck_c_a CHECK (a > 0) NOT VALID")
    apply(database.url, lambda op: op.create_check_constraint_online("ck_c_a", "c", "a > 0"),
          online_run()[0])
    assert constraints_of(database, "c") == "c_pkey:true ck_c_a:true"

    database.sql("INSERT INTO c VALUES (9999, 12345, 1, 'orphan')")  # references no p
    fk = lambda op: op.create_foreign_key_online("fk_c_p", "c", "p", ["p_id"], ["id"])  # noqa: E731
    with pytest.raises(MigrationFailed, match=r"violate fk_c_p.*stays NOT VALID.*rerun"):
        apply(database.url, fk, online_run()[0])
    assert constraints_of(database, "c") == "c_pkey:true ck_c_a:true fk_c_p:false"
    with pytest.raises(psycopg2.errors.ForeignKeyViolation):  # new rows are checked meanwhile
        database_execute(database, "INSERT INTO c VALUES (10000, 54321, 1, 'x')")
    database.sql("DELETE FROM c WHERE id = 9999")
    apply(database.url, fk, online_run()[0])
    assert constraints_of(database, "c") == "c_pkey:true ck_c_a:true fk_c_p:true"


def database_execute(db: Database, statement: str) -> None:
    with contextlib.closing(psycopg2.connect(db.url)) as conn, conn.cursor() as cur:
        cur.execute(statement)
        conn.commit()


def test_operations_refuse_what_they_cannot_do_safely_without_touching_anything(
        database: Database) -> None:
    two_tables(database)
    database.sql("CREATE TABLE pair (a int, b int, PRIMARY KEY (a, b)); CREATE TABLE heap (a int)")
    before = database.sql("SELECT count(*) FROM pg_class")
    cases = [
        (lambda op: op.create_foreign_key_online(None, "c", "p", ["p_id"], ["id"]),
         "needs a constraint name"),
        (lambda op: op.add_column_online("c", sa.Column("d", sa.Integer, nullable=False)),
         "NOT NULL column needs a server_default"),
        (lambda op: op.backfill("pair", {"b": "b"}), r"primary key of 2 columns \(a, b\)"),
        (lambda op: op.backfill("heap", {"a": "1"}), "has no primary key"),
        (lambda op: op.backfill("c", {"id": "id + 1"}), "assigns the primary key id"),
        (lambda op: op.rename_column_expand("c", "id", "ident"), "part of the primary key"),
        (lambda op: op.set_not_null_online("c", "nope"), "column nope of public.c does not exist"),
        (lambda op: op.create_index_online("ix", "nope", ["a"]), "table \"nope\" does not exist"),
        (lambda op: op.alter_column_type_expand("c", "a", "a2", sa.BigInteger, using="a + nope"),
         "column \"nope\" does not exist"),
    ]
    for fn, message in cases:
        with pytest.raises(MigrationFailed, match=message):
            apply(database.url, fn, online_run()[0])
    assert database.sql("SELECT count(*) FROM pg_class") == before
    assert database.sql("SELECT to_regclass('runner_backfills') IS NULL") == "t"



def test_text_keys_and_sql_with_percent_and_colon_reach_the_server_as_written(
        database: Database) -> None:
    """A text primary key (walked in its collation's order); `%` and `:` in set, where, using and
    defaults are not taken for parameter markers."""
    database.sql("CREATE TABLE k (id text PRIMARY KEY, v text); "
                 "INSERT INTO k SELECT 'k' || g, 'a%' || g FROM generate_series(1, 300) g")
    apply(database.url, lambda op: (
        op.backfill("k", {"v": "v || ' 12:30 %s'"}, "v LIKE 'a%'"),
        op.add_column_online("k", sa.Column("w", sa.Text, nullable=False,
                                            server_default=sa.text("'50%' || random()"))),
        op.alter_column_type_expand("k", "v", "v2", sa.String(200), using="v || ':%'")),
        online_run(online_backfill_batch_size=7)[0])
    assert database.sql("SELECT count(*) FROM k WHERE left(v, 2) = 'a%' AND right(v, 9) = ' 12:30 %s' "
                        "AND left(w, 3) = '50%' AND v2 = v || ':%'") == "300"

# -- a crash between any two steps, then a rerun -------------------------------------------------

class Crash(Exception):
    pass


@contextlib.contextmanager
def crash_after(step: int | None) -> Iterator[list[str]]:
    """Raise Crash right after the step-th step commits (None: count the steps only)."""
    seen: list[str] = []

    def hook(label: str) -> None:
        seen.append(label)
        if len(seen) == step:
            raise Crash(label)

    session.AFTER_STEP.append(hook)
    try:
        yield seen
    finally:
        session.AFTER_STEP.remove(hook)


EXPANDED_A = lambda op: op.rename_column_expand("c", "a", "a2")  # noqa: E731
EXPANDED_TYPE = lambda op: op.alter_column_type_expand(  # noqa: E731
    "c", "a", "a_big", sa.BigInteger(), using="a * 10", revert_using="a_big / 10")
STEPS: dict[str, tuple[Callable[[Operations], None] | None, Callable[[Operations], None]]] = {
    "create_index_online": (None, lambda op: op.create_index_online("ix_c_a", "c", ["a"])),
    "create_unique_constraint_online": (
        None, lambda op: op.create_unique_constraint_online("uq_c_code", "c", ["code"])),
    "create_foreign_key_online": (
        None, lambda op: op.create_foreign_key_online("fk_c_p", "c", "p", ["p_id"], ["id"])),
    "create_check_constraint_online": (
        None, lambda op: op.create_check_constraint_online("ck_c_a", "c", "a > 0")),
    "set_not_null_online": (None, lambda op: op.set_not_null_online("c", "p_id")),
    "add_column_online": (None, lambda op: op.add_column_online(
        "c", sa.Column("d", sa.Text, nullable=False, server_default="new"),
        backfill=sa.text("'was ' || id"))),
    "backfill": (None, lambda op: op.backfill("c", {"a": "a + 1000"})),  # not idempotent: once!
    "rename_column_expand": (None, EXPANDED_A),
    "rename_column_contract": (EXPANDED_A, lambda op: op.rename_column_contract("c", "a", "a2")),
    "rename_column_contract_revert": (
        lambda op: (EXPANDED_A(op), op.rename_column_contract("c", "a", "a2")),
        lambda op: op.rename_column_contract_revert("c", "a", "a2")),
    "alter_column_type_expand": (None, EXPANDED_TYPE),
    "alter_column_type_contract": (
        EXPANDED_TYPE, lambda op: op.alter_column_type_contract("c", "a", "a_big")),
}


def fingerprint(db: Database | Direct) -> str:
    """Columns, constraints, indexes, triggers and the data of c."""
    return db.sql("""
        SELECT (SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod) || ' '
                                  || attnotnull || ' ' || coalesce(pg_get_expr(adbin, adrelid), '-'),
                                  ', ' ORDER BY attname)
                FROM pg_attribute LEFT JOIN pg_attrdef ON adrelid = attrelid AND adnum = attnum
                WHERE attrelid = 'c'::regclass AND attnum > 0 AND NOT attisdropped)
            || ' | ' || (SELECT coalesce(string_agg(conname || ' ' || convalidated, ', '
                                                    ORDER BY conname), '')
                         FROM pg_constraint WHERE conrelid = 'c'::regclass AND contype <> 'n')
            || ' | ' || (SELECT coalesce(string_agg(pg_get_indexdef(indexrelid) || ' ' || indisvalid,
                                                    ', ' ORDER BY indexrelid::regclass::text), '')
                         FROM pg_index WHERE indrelid = 'c'::regclass)
            || ' | ' || (SELECT coalesce(string_agg(tgname, ', ' ORDER BY tgname), '')
                         FROM pg_trigger WHERE tgrelid = 'c'::regclass AND NOT tgisinternal)
            || ' | ' || (SELECT md5(string_agg(c::text, ',' ORDER BY id)) FROM c)""")


def test_a_crash_after_any_step_then_a_rerun_ends_as_an_uninterrupted_run(database: Database) -> None:
    """For every operation and every step of it: crash right after the step commits, run the
    operation again, compare with an uninterrupted run (catalog and data)."""
    db = Direct(database.url)
    for name, (setup, operation) in STEPS.items():

        def fresh(setup: Callable[[Operations], None] | None = setup) -> None:
            db.sql("DROP TABLE IF EXISTS c, p, runner_backfills")
            two_tables(db)
            if setup is not None:
                apply(db.url, setup, online_run()[0])

        fresh()
        with crash_after(None) as steps:
            apply(db.url, operation, online_run()[0])
        expected = fingerprint(db)
        assert steps, f"{name} reported no step"
        for k in range(1, len(steps) + 1):
            fresh()
            with crash_after(k), pytest.raises(Crash):
                apply(db.url, operation, online_run()[0])
            apply(db.url, operation, online_run()[0])
            assert fingerprint(db) == expected, f"{name}: crash after step {k} ({steps[k - 1]})"


class Direct:
    """Database.sql over one open connection (psql per statement is slow for a long loop)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn = psycopg2.connect(url)
        self.conn.autocommit = True

    def sql(self, statement: str) -> str:
        with self.conn.cursor() as cur:
            cur.execute(statement)
            row = cur.fetchone() if cur.description else None
        return "" if row is None else str(row[0])


# -- backfill ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def in_thread(fn: Callable[[], None]) -> Iterator[threading.Thread]:
    """Run fn in a thread; re-raise what it raised when the block ends."""
    failures: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            failures.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    yield thread
    thread.join(timeout=120)
    assert not thread.is_alive(), "the thread did not finish"
    if failures:
        raise failures[0]


def test_backfill_ends_under_heavy_inserts_sizes_its_batches_and_reports_progress(
        database: Database) -> None:
    """Bounded by the largest key at its start (pgroll#583 never ended under inserts)."""
    database.sql("CREATE TABLE t (id bigserial PRIMARY KEY, v int, done boolean NOT NULL DEFAULT "
                 "false); INSERT INTO t (v) SELECT g FROM generate_series(1, 20000) g")
    stop, inserted = threading.Event(), [0]

    def insert() -> None:
        with contextlib.closing(psycopg2.connect(database.url)) as conn:
            conn.autocommit = True
            while not stop.is_set():
                conn.cursor().execute("INSERT INTO t (v) SELECT g FROM generate_series(1, 200) g")
                inserted[0] += 200

    run, log = online_run(online_backfill_batch_size=50, online_backfill_batch_time=0.03,
                          online_backfill_progress_interval=0.1)
    with in_thread(insert):
        wait_for(lambda: inserted[0] > 0)
        at_start = inserted[0]
        apply(database.url, lambda op: op.backfill("t", {"done": "true"}), run)
        during = inserted[0] - at_start
        stop.set()
    upper = int(events(log, "backfill.start")[0]["upper_bound"])
    assert during > 0, "the inserts ran during the backfill"
    assert database.sql(f"SELECT count(*) FILTER (WHERE id <= {upper} AND NOT done) || ' ' || "
                        f"count(*) FILTER (WHERE id > {upper} AND done) FROM t") == "0 0"
    assert database.sql("SELECT state || ' ' || rows_done || ' ' || checkpoint FROM runner_backfills"
                        ) == f"done {upper} {upper}"
    progress = events(log, "backfill.progress")
    assert progress, log.getvalue()
    assert {"rows_done", "rows_estimate", "rows_per_s", "eta_s", "batch_size", "batch_ms"} <= set(progress[0])
    assert "rows/s" in progress[0]["msg"] and "ETA" in progress[0]["msg"]
    assert max(e["batch_size"] for e in progress) > 100, "the batch size grew toward 30 ms batches"


def test_backfill_waits_while_a_streaming_replica_lags(pg: Any, database: Database) -> None:
    database.sql("CREATE TABLE t (id bigint PRIMARY KEY, v int); "
                 "INSERT INTO t SELECT g, 0 FROM generate_series(1, 3000) g")
    replica = pg.standby()
    try:
        wait_for(lambda: database.sql("SELECT count(*) FROM pg_stat_replication WHERE state = "
                                      "'streaming'") == "1", timeout=30)
        replica.psql("SELECT pg_wal_replay_pause()")
        # 30 batches of 100 rows 50 ms apart: it takes 1.5 s, the replica lags 0.3 s well before
        run, log = online_run(online_backfill_max_replication_lag=0.3, online_backfill_batch_size=100,
                              online_backfill_max_batch_size=100, online_backfill_pause=0.05)

        def waiting() -> bool:
            return any(e.get("waiting") for e in events(log, "backfill.progress"))

        with in_thread(lambda: apply(database.url, lambda op: op.backfill("t", {"v": "1"}), run)):
            wait_for(waiting, timeout=30, what="the backfill never waited for the paused replica")
            done = database.sql("SELECT rows_done FROM runner_backfills")
            time.sleep(0.5)
            assert database.sql("SELECT rows_done FROM runner_backfills") == done, "it went on"
            replica.psql("SELECT pg_wal_replay_resume()")
    finally:
        replica.destroy()
    assert database.sql("SELECT count(*) FROM t WHERE v <> 1") == "0"
    line = next(e for e in events(log, "backfill.progress") if e.get("waiting"))
    assert "waiting: replica" in line["msg"] and "> 0.3s" in line["msg"], line


def test_replica_lag_counts_the_time_since_the_first_position_a_replica_has_not_replayed() -> None:
    samples = replicas.collections.deque([(10.0, 100.0), (11.0, 200.0), (12.0, 300.0)])
    assert replicas.estimate(samples, replay=300.0, reported=None, now=12.0) == 0.0
    assert replicas.estimate(samples, replay=150.0, reported=0.2, now=12.5) == 1.5
    assert replicas.estimate(samples, replay=50.0, reported=None, now=12.5) == 2.5
    assert replicas.estimate(samples, replay=250.0, reported=4.0, now=12.5) == 4.0


# -- the runner: the scenario chain, kill -9, signals, exit codes ---------------------------------

SCENARIO = REPO / "tests" / "scenarios"


def scenario_env(url: str, name: str = "online", **extra: str) -> dict[str, str]:
    return runner_env(url, ALEMBIC_CONFIG=str(SCENARIO / name / "alembic.ini"), LOG_FORMAT="json",
                      MIGRATION_LOCK_TIMEOUT="200ms", **extra)


def chain_fingerprint(db: Database) -> str:
    """Both tables' columns, constraints, indexes, triggers, and their data but orders.ref
    (random)."""
    return db.sql("""
        SELECT (SELECT string_agg(attrelid::regclass || '.' || attname || ' '
                                  || format_type(atttypid, atttypmod) || ' ' || attnotnull || ' '
                                  || coalesce(pg_get_expr(adbin, adrelid), '-'), ', '
                                  ORDER BY attrelid::regclass::text, attname)
                FROM pg_attribute LEFT JOIN pg_attrdef ON adrelid = attrelid AND adnum = attnum
                WHERE attrelid IN ('accounts'::regclass, 'orders'::regclass) AND attnum > 0
                  AND NOT attisdropped)
            || ' | ' || (SELECT string_agg(conname || ' ' || convalidated, ', ' ORDER BY conname)
                         FROM pg_constraint WHERE conrelid IN ('accounts'::regclass,
                                                              'orders'::regclass) AND contype <> 'n')
            || ' | ' || (SELECT string_agg(pg_get_indexdef(indexrelid) || ' ' || indisvalid, ', '
                                           ORDER BY indexrelid::regclass::text)
                         FROM pg_index WHERE indrelid IN ('accounts'::regclass, 'orders'::regclass))
            || ' | ' || (SELECT coalesce(string_agg(tgname, ', ' ORDER BY tgname), '')
                         FROM pg_trigger WHERE NOT tgisinternal)
            || ' | ' || (SELECT md5(string_agg(to_jsonb(a)::text, ',' ORDER BY id)) FROM accounts a)
            || ' | ' || (SELECT md5(string_agg(to_jsonb(o) - 'ref' #>> '{}', ',' ORDER BY id))
                         FROM orders o)""")


def test_the_online_chain_round_trips_through_expand_and_contract(database: Database) -> None:
    """Every operation and its inverse, through the runner: base -> n004 (expanded) -> n005
    (contracted) -> n004 -> n001 -> n005; each state the same whichever way it was reached."""
    env = scenario_env(database.url)
    states = {}
    for command, target in (("upgrade", "n004"), ("upgrade", "n005"), ("downgrade", "n004"),
                            ("downgrade", "n001"), ("upgrade", "n005")):
        result = run_runner([command, "--to", target], env)
        assert result.code == 0, result.err
        reached = chain_fingerprint(database)
        assert states.setdefault(target, reached) == reached, f"{command} to {target} differs"
        if target == "n005" and len(states) == 2:
            assert "ck_orders_amount " in result.err, "the contract says what goes with the column"
    final = states["n005"]
    for expected in ("accounts.email_address text true 'unknown'::text",
                     "orders.account_id bigint true -", "orders.amount_cents bigint true 0",
                     "orders.ref text true md5((random())::text)", "ck_orders_amount_cents true",
                     "fk_orders_account true", "uq_orders_ref true",
                     "CREATE INDEX ix_orders_account ON public.orders USING btree (account_id) true"):
        assert expected in final, final
    assert "accounts.email " not in final and "orders.amount " not in final
    assert "_sync" not in final and "runner_nn" not in final
    assert "orders_amount_amount_cents_sync" in states["n004"]
    assert states["n001"].split(" | ")[1:4] == ["accounts_pkey true, orders_pkey true",
                                                "CREATE UNIQUE INDEX accounts_pkey ON public.accounts "
                                                "USING btree (id) true, CREATE UNIQUE INDEX orders_pkey "
                                                "ON public.orders USING btree (id) true", ""]
    assert "orders.ref" not in states["n001"] and "orders.account_id bigint false" in states["n001"]
    assert database.sql("SELECT count(*) FROM orders WHERE amount_cents <> (id % 1000) * 100") == "0"


@pytest.mark.every_major
def test_not_null_steps_on_each_major(database: Database) -> None:
    """PostgreSQL 18 records NOT NULL as a constraint of its own (pg_constraint contype 'n'):
    the temporary check must not take its name, and both majors end without it."""
    two_tables(database)
    database.sql("ALTER TABLE c ADD CONSTRAINT c_p_id_not_null CHECK (true)")  # 18's default name
    run, _ = online_run()
    apply(database.url, lambda op: (op.set_not_null_online("c", "p_id"), op.add_column_online(
        "c", sa.Column("d", sa.Text, nullable=False, server_default=sa.text("md5(random()::text)")))),
        run)
    assert database.sql("SELECT string_agg(attname || ' ' || attnotnull, ', ' ORDER BY attname) FROM "
                        "pg_attribute WHERE attrelid = 'c'::regclass AND attname IN ('p_id', 'd')"
                        ) == "d true, p_id true"
    assert "runner_nn" not in database.sql("SELECT string_agg(conname, ' ') FROM pg_constraint")
    apply(database.url, lambda op: op.drop_not_null_online("c", "p_id"), run)
    assert database.sql("SELECT attnotnull FROM pg_attribute WHERE attrelid = 'c'::regclass "
                        "AND attname = 'p_id'") == "f"


# tests/scenarios/online_backfill's table: at 100 rows a batch, large enough that every stop lands
# mid-way however quick the start-up (6,000 were done before the kill once); the last rerun
# takes larger batches
ROWS = 20_000


def backfill_env(url: str, **extra: str) -> dict[str, str]:
    # a stopped run's backend can outlive its client by a moment, advisory lock and all: the
    # next run waits for it as in production rather than giving up after 200 ms
    return {**scenario_env(url, "online_backfill", ONLINE_BACKFILL_BATCH_SIZE="100",
                           ONLINE_BACKFILL_MAX_BATCH_SIZE="100", ONLINE_BACKFILL_PAUSE="40ms",
                           **extra), "MIGRATION_LOCK_TIMEOUT": "30s"}


def resumed(db: Database, proc: subprocess.Popen, before: int) -> bool:
    """True once the running rerun is 500 rows past before; fails at once if it exited."""
    if proc.poll() is not None:
        _out, err = proc.communicate()
        raise AssertionError(f"the rerun exited {proc.returncode} before resuming: {err}")
    return rows_done(db) >= before + 500


def rows_done(db: Database) -> int:
    """The running backfill's rows done (0 before it started)."""
    if db.sql("SELECT to_regclass('runner_backfills') IS NULL") == "t":
        return 0
    return int(db.sql("SELECT coalesce(max(rows_done), 0) FROM runner_backfills "
                      "WHERE state = 'running'"))


def test_deadline_sigterm_and_kill_9_stop_a_backfill_that_reruns_resume_exactly_once(
        database: Database) -> None:
    """RUN_DEADLINE (exit 9) and SIGTERM (143) stop it between batches, kill -9 wherever; each
    rerun continues from the checkpoint, redoing at most the batch that was running: every row
    is updated exactly once (hits = 1; the backfill has no WHERE that would hide a second pass)."""
    env = backfill_env(database.url)
    assert run_runner(["upgrade", "--to", "b001"], env).code == 0
    deadline = run_runner(["upgrade"], {**env, "RUN_DEADLINE": "2500ms"})
    assert deadline.code == 9, deadline.err

    before = rows_done(database)
    proc = start_runner(["upgrade"], env)
    wait_for(lambda: resumed(database, proc, before), timeout=60, what="it did not resume")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stopped = finish(proc)
    assert stopped.code == 143, stopped.err
    assert time.monotonic() - t0 < 10 and database.version() == "b001"

    before = rows_done(database)
    proc = start_runner(["upgrade"], env)
    wait_for(lambda: resumed(database, proc, before), timeout=60, what="it did not resume")
    proc.kill()
    proc.communicate(timeout=30)
    at_kill = rows_done(database)
    assert at_kill < ROWS, "the backfill ended before the kill: make it slower"
    # the last rerun may take larger batches: the checkpoint, not the batch size, says where
    rerun = run_runner(["upgrade"], {**env, "ONLINE_BACKFILL_MAX_BATCH_SIZE": "5000",
                                     "ONLINE_BACKFILL_PAUSE": "0"})
    assert rerun.code == 0, rerun.err
    resume = [json.loads(line) for line in rerun.lines if '"backfill.resume"' in line]
    assert resume and at_kill <= resume[0]["rows_done"] <= at_kill + 100, rerun.err
    assert database.sql("SELECT count(*) FILTER (WHERE hits = 1) || ' ' || count(*) FROM items") == \
        f"{ROWS} {ROWS}"
    assert database.sql("SELECT state || ' ' || rows_done FROM runner_backfills") == f"done {ROWS}"


def test_a_backfill_interrupted_then_its_table_recreated_starts_from_the_first_row(
        database: Database) -> None:
    """RUN_DEADLINE stops b002's backfill mid-way; a downgrade to base drops its table (b001's
    downgrade) and the upgrade creates it again: the checkpoint counts rows of the old table, so
    the backfill starts from the first row instead of resuming after the checkpoint (which left
    every row below it never updated). Every row of the new table is updated exactly once."""
    env = backfill_env(database.url)
    assert run_runner(["upgrade", "--to", "b001"], env).code == 0
    assert run_runner(["upgrade"], {**env, "RUN_DEADLINE": "2500ms"}).code == 9
    assert rows_done(database) > 0
    assert run_runner(["downgrade", "--to", "base", "--yes"], env).code == 0
    again = run_runner(["upgrade"], {**env, "ONLINE_BACKFILL_MAX_BATCH_SIZE": "5000",
                                     "ONLINE_BACKFILL_PAUSE": "0"})
    assert again.code == 0, again.err
    assert '"backfill.restart"' in again.err and '"backfill.resume"' not in again.err, again.err
    assert database.sql("SELECT count(*) FILTER (WHERE hits = 1) || ' ' || count(*) FROM items") == \
        f"{ROWS} {ROWS}"


def test_kill_9_mid_index_build_rerun_rebuilds_it_and_a_held_lock_exits_8(database: Database) -> None:
    """A kill -9 while CREATE INDEX CONCURRENTLY waits: the rerun drops the INVALID leftover and
    builds it again. Then a table lock held elsewhere: retries naming the holder, exit 8, the
    database at the last applied revision."""
    env = scenario_env(database.url, LOCK_RETRY_ATTEMPTS="2", LOCK_RETRY_MAX_WAIT="100ms")
    assert run_runner(["upgrade", "--to", "n002"], env).code == 0
    with snapshot_held(database.url):  # the build waits for it, INVALID meanwhile
        proc = start_runner(["upgrade", "--to", "n003"], env)
        wait_for(lambda: index_state(database, "ix_orders_account").startswith("invalid"), timeout=60,
                 what="the build did not start")
        proc.kill()
        proc.communicate(timeout=30)
        # its backend notices the dead client within seconds (client_connection_check_interval)
        wait_for(lambda: database.sql("SELECT count(*) FROM pg_stat_progress_create_index") == "0",
                 timeout=30, what="the killed runner's build went on")
    rerun = run_runner(["upgrade", "--to", "n003"], env)
    assert rerun.code == 0, rerun.err
    assert index_state(database, "ix_orders_account").startswith("valid")
    assert database.sql("SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'ix_orders_account%'") == "1"
    assert '"online.leftover"' in rerun.err, rerun.err

    with session_holding(database.url, "LOCK TABLE accounts IN ACCESS SHARE MODE") as holder:
        result = run_runner(["upgrade", "--to", "n004"], env)
    assert result.code == 8, result.err
    retry = [json.loads(line) for line in result.lines if '"online.retry"' in line]
    # every attempt of the schedule was made (the last one without a retry line after it), and each
    # retry names the holder
    assert retry and retry[-1]["attempt"] == retry[-1]["of"] - 1, result.err
    assert all(f"pid {holder}" in r["blockers"][0] for r in retry), result.err
    assert f"pid {holder}" in result.summary()["msg"] and "exit 8" in result.summary()["msg"]
    assert database.version() == "n003"
    assert database.sql("SELECT count(*) FROM information_schema.columns "
                        "WHERE column_name = 'email_address'") == "0"


class Writer(threading.Thread):
    """Application code writing one column of accounts as fast as it can: inserts in its own id
    range, updates of its own share of the existing rows. Remembers the last value it wrote to
    each row and every error it saw."""

    started = 0

    def __init__(self, url: str, column: str, share: int) -> None:
        super().__init__(daemon=True)
        self.url, self.column, self.share = url, column, share
        Writer.started += 1
        self.first_id = 1_000_000 * Writer.started
        self.written: dict[int, str] = {}
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:  # type: ignore[override]
        with contextlib.closing(psycopg2.connect(self.url)) as conn:
            conn.autocommit = True
            cur = conn.cursor()
            n = 0
            while not self.halt.is_set():
                n += 1
                value = f"{self.column}-{self.share}-{n}@example.com"
                try:
                    if n % 3:
                        row = (n * 2 + self.share) % 300 + 1  # this writer's half of the rows
                        cur.execute(f"UPDATE accounts SET {self.column} = %s WHERE id = %s", (value, row))
                    else:
                        row = self.first_id + n
                        cur.execute(f"INSERT INTO accounts (id, {self.column}, name) VALUES (%s, %s, 'w')",
                                    (row, value))
                    self.written[row] = value
                except psycopg2.Error as exc:
                    self.errors.append(str(exc).strip())

    def __enter__(self) -> Writer:
        self.start()
        wait_for(lambda: len(self.written) > 20 or self.errors, what="the writer did not write")
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.join(timeout=30)


def landed(db: Database, writer: Writer, column: str) -> list[int]:
    """Rows whose column does not hold what the writer last wrote there."""
    rows = dict(line.split("|", 1) for line in db.sql(
        f"SELECT id || '|' || coalesce({column}, '') FROM accounts").splitlines())
    return [row for row, value in writer.written.items() if rows.get(str(row)) != value]


def test_writers_see_no_error_and_lose_no_write_through_expand_and_contract(database: Database) -> None:
    """The new column and its trigger appear in one transaction, and go in one (pgroll#905/#906);
    old code writes email, new code writes email_address, side by side in between."""
    env = scenario_env(database.url)
    assert run_runner(["upgrade", "--to", "n003"], env).code == 0
    with Writer(database.url, "email", 0) as old:  # the old code, while the expand runs
        assert run_runner(["upgrade", "--to", "n004"], env).code == 0
        wait_for(lambda: len(old.written) > 200)
    assert old.errors == [] and landed(database, old, "email_address") == []

    with Writer(database.url, "email", 0) as old, Writer(database.url, "email_address", 1) as new:
        wait_for(lambda: len(old.written) > 200 and len(new.written) > 200)
    assert old.errors == [] and new.errors == []
    assert landed(database, old, "email_address") == [] and landed(database, new, "email") == []
    assert database.sql("SELECT count(*) FROM accounts WHERE email IS DISTINCT FROM email_address") == "0"

    with Writer(database.url, "email_address", 1) as new:  # the new code, while the contract runs
        assert run_runner(["upgrade", "--to", "n005"], env).code == 0
        wait_for(lambda: len(new.written) > 200)
    assert new.errors == [] and landed(database, new, "email_address") == []


def test_batch_size_follows_the_target_time_smoothly() -> None:
    sizer = backfill.Sizer(1000, target=0.15, maximum=50_000)
    assert sizer.batch(1000, 0.015) == 2000, "10x too fast: at most doubled"
    for _ in range(20):
        sizer.batch(sizer.size, sizer.size * 15e-6)  # 15 µs a row
    assert 9000 <= sizer.size <= 11000
    assert sizer.batch(sizer.size, sizer.size * 150e-6) >= 4500, "one slow batch: at most halved"
    assert sizer.batch(10, 5.0) == sizer.size, "a short last batch changes nothing"
    assert backfill.Sizer(1000, 0.15, 1500).batch(1000, 0.001) == 1500


def test_bad_online_settings_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["status"], environ={"DATABASE_URL": "postgresql://u@127.0.0.1/db",
                                         "ALEMBIC_CONFIG": str(REPO / "alembic.ini"),
                                         "ONLINE_BACKFILL_BATCH_TIME": "fast",
                                         "ONLINE_BACKFILL_MAX_BATCH_SIZE": "0"})
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "ONLINE_BACKFILL_BATCH_TIME='fast' is not a duration" in err
    assert "ONLINE_BACKFILL_MAX_BATCH_SIZE='0' must be a whole number from 1" in err
