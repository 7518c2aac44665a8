"""Never freeze production: lock_timeout + retries, blocker reports, CONCURRENTLY, statement_timeout."""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest

from tests.conftest import REPO, Database, finish, run_runner, runner_env, start_runner, wait_for

pytestmark = pytest.mark.every_major  # lock and cancel behaviour differs between majors

LAB = str(REPO / "tests/scenarios/lab/alembic.ini")
LOCK_TIMEOUT = 1.0


def lab_env(db: Database, **extra: str) -> dict[str, str]:
    return runner_env(db.url, ALEMBIC_CONFIG=LAB, MIGRATION_LOCK_TIMEOUT=f"{LOCK_TIMEOUT}s",
                      LOCK_RETRY_MAX_WAIT="1s", **extra)


@pytest.fixture
def at(database: Database):
    def upgrade_to(rev: str) -> Database:
        assert run_runner(["upgrade", "--to", rev], runner_env(database.url, ALEMBIC_CONFIG=LAB)).code == 0
        return database
    return upgrade_to


def blocker(db: Database, sql: str, isolation: int | None = None) -> psycopg2.extensions.connection:
    """An application session that opens a transaction and keeps it open."""
    conn = psycopg2.connect(db.url, application_name="app-blocker")
    if isolation is not None:
        conn.set_session(isolation_level=isolation)
    with conn.cursor() as cur:
        cur.execute(sql)
    return conn


def wait_until_runner_waits_on_a_lock(db: Database) -> None:
    """Start the blocker's clock only once the migration really waits (startup is slow under load)."""
    wait_for(lambda: db.sql("SELECT count(*) FROM pg_stat_activity WHERE "
                            "application_name LIKE 'migration-runner/migrate/%' AND wait_event_type = "
                            "'Lock'") != "0", timeout=20, every=0.05)


class Reader(threading.Thread):
    """The application: reads the table in a loop and records how long each read took."""

    def __init__(self, db: Database) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg2.connect(db.url, application_name="app-reader")
        self.conn.autocommit = True
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with self.conn.cursor() as cur:
            while not self.stop.is_set():
                t0 = time.monotonic()
                cur.execute("SELECT count(*) FROM items")
                cur.fetchone()
                self.latencies.append(time.monotonic() - t0)
                time.sleep(0.02)

    def finish(self) -> float:
        self.stop.set()
        self.join(timeout=30)
        self.conn.close()
        return max(self.latencies)


def test_blocked_migration_never_freezes_reads_and_retries(at) -> None:
    db = at("l001")
    hold = blocker(db, "SELECT * FROM items WHERE note = 'secret-literal-42' FOR UPDATE")
    reader = Reader(db)
    reader.start()
    proc = start_runner(["upgrade", "--to", "l002"], lab_env(db, LOCK_RETRY_ATTEMPTS="30"))
    wait_until_runner_waits_on_a_lock(db)
    time.sleep(3 * LOCK_TIMEOUT)  # several attempts time out while the blocker holds on
    hold.commit()
    hold.close()
    r = finish(proc)
    worst = reader.finish()
    assert r.code == 0, r.err
    assert db.version() == "l002"
    assert "migrate.retry" in r.err
    assert "application_name=app-blocker" in r.err and "xact_age_s=" in r.err
    assert "FOR UPDATE" in r.err and "secret-literal-42" not in r.err, "literals must be scrubbed"
    assert worst < LOCK_TIMEOUT + 0.75, f"an application read waited {worst:.2f}s"
    assert len(reader.latencies) > 20


def test_blocker_never_leaves_exit_8_unchanged(at) -> None:
    db = at("l001")
    hold = blocker(db, "SELECT count(*) FROM items")
    try:
        t0 = time.monotonic()
        r = run_runner(["upgrade"], lab_env(db, LOCK_RETRY_ATTEMPTS="3"))
        assert r.code == 8, r.err
        assert time.monotonic() - t0 < 15
        assert "3 attempts" in r.err and "app-blocker" in r.err
        assert db.version() == "l001"
        assert db.sql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'items' "
                      "AND column_name = 'flag'") == "0"
    finally:
        hold.close()


def test_concurrent_index_waits_are_bounded_and_retried(at) -> None:
    db = at("l002")
    # an old snapshot makes CREATE INDEX CONCURRENTLY wait; its wait obeys lock_timeout
    repeatable = psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ
    hold = blocker(db, "SELECT count(*) FROM items", isolation=repeatable)
    proc = start_runner(["upgrade"], lab_env(db, LOCK_RETRY_ATTEMPTS="30"))
    wait_until_runner_waits_on_a_lock(db)
    time.sleep(3 * LOCK_TIMEOUT)  # longer than lock_timeout: at least one attempt times out
    hold.commit()
    hold.close()
    r = finish(proc)
    assert r.code == 0, r.err
    assert "migrate.retry" in r.err and "index.invalid" in r.err
    assert db.version() == "l003"
    assert db.sql("SELECT string_agg(indisvalid::text, ',') FROM pg_index WHERE indexrelid = "
                  "'ix_items_note'::regclass") == "true"


def _leave_invalid_index(db: Database) -> None:
    """An interrupted CREATE INDEX CONCURRENTLY: a unique build over duplicates fails half-way."""
    out = db.sql("CREATE UNIQUE INDEX CONCURRENTLY ix_items_note ON items ((id > 0))", check=False)
    assert out == ""
    assert db.sql("SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_items_note'::regclass") == "f"


def test_invalid_index_from_earlier_attempt_is_dropped_and_rebuilt(at) -> None:
    db = at("l002")
    _leave_invalid_index(db)
    r = run_runner(["upgrade"], lab_env(db))
    assert r.code == 0, r.err
    assert "dropping INVALID index public.ix_items_note" in r.err
    assert db.sql("SELECT indisvalid::text || ' ' || pg_get_indexdef(indexrelid) FROM pg_index "
                  "WHERE indexrelid = 'ix_items_note'::regclass") == \
        "true CREATE INDEX ix_items_note ON public.items USING btree (note)"


def test_invalid_index_refused_when_policy_refuse(at) -> None:
    db = at("l002")
    _leave_invalid_index(db)
    r = run_runner(["upgrade"], lab_env(db, INVALID_INDEX_POLICY="refuse"))
    assert r.code == 7, r.err
    assert "DROP INDEX CONCURRENTLY public.ix_items_note" in r.err
    assert db.version() == "l002"
    assert db.sql("SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_items_note'::regclass") == "f"


def test_statement_timeout_stops_runaway_statement(at) -> None:
    db = at("l001")
    t0 = time.monotonic()
    r = run_runner(["upgrade"], lab_env(db, LAB_MODE="sleep", LAB_SLEEP="60",
                                        MIGRATION_STATEMENT_TIMEOUT="2s"))
    assert r.code == 6, r.err
    assert time.monotonic() - t0 < 10
    assert "revision l002 failed and was rolled back: statement_timeout" in r.err
    assert db.version() == "l001"


def test_failed_migration_names_revision_and_error(at) -> None:
    db = at("l001")
    r = run_runner(["upgrade"], lab_env(db, LAB_MODE="fail"))
    assert r.code == 6, r.err
    assert "revision l002 failed and was rolled back: duplicate key value" in r.err
    assert db.version() == "l001"
    assert db.sql("SELECT to_regclass('l002_done') IS NULL") == "t"
