"""Never freeze production: the lock_timeout schedule + retries, blocker reports, CONCURRENTLY,
statement_timeout."""

from __future__ import annotations

import io
import random
import threading
import time

import psycopg2
import pytest

from runner import config
from runner.context import Run
from runner.errors import ConfigError, RunDeadline
from runner.log import EventLog
from runner.migrate import lockschedule
from tests.autovacuum_worker import vacuuming
from tests.conftest import (
    NEWEST,
    REPO,
    Database,
    finish,
    run_runner,
    runner_env,
    start_runner,
    wait_for,
)
from tests.pgcluster import APP_PASSWORD

pytestmark = pytest.mark.every_major  # lock and cancel behaviour differs between majors

LAB = str(REPO / "tests/scenarios/lab/alembic.ini")
LOCK_TIMEOUT = 1.0  # MIGRATION_LOCK_TIMEOUT here: the fixed schedule's, and CONCURRENTLY's
CEILING = config.Settings().lock_timeout_ceiling  # the escalating schedule's longest (default)


def lab_env(db: Database, **extra: str) -> dict[str, str]:
    return runner_env(db.url, ALEMBIC_CONFIG=LAB, MIGRATION_LOCK_TIMEOUT=f"{LOCK_TIMEOUT}s",
                      LOCK_RETRY_MAX_WAIT="1s", **extra)


# -- the schedule (pure) ---------------------------------------------------------------------------
def test_escalating_schedule_starts_short_and_keeps_todays_patience() -> None:
    s = config.Settings()  # the defaults: 100 ms doubling to 500 ms; fixed: 10 x 4 s
    nominal = lockschedule.attempts(s, rand=lambda: 0.0)
    jittered = [lockschedule.attempts(s, rand=random.Random(seed).random) for seed in (1, 2)]
    timeouts = [a.lock_timeout for a in nominal]
    assert timeouts[:4] == [0.1, 0.2, 0.4, 0.5] and set(timeouts[3:]) == {0.5}
    assert all(a.lock_timeout > 0 for a in nominal), "an attempt without lock_timeout freezes the app"
    assert [a.number for a in nominal] == list(range(1, len(nominal) + 1)) and nominal[-1].pause == 0
    pauses = [a.pause for a in nominal[:-2]]  # the one before the last is cut to fit the patience
    assert pauses == sorted(pauses) and pauses[0] == 0.5 and max(pauses) == s.lock_retry_max_wait
    for run in jittered:  # same timeouts; every pause after the first jittered by up to 1 s
        assert [a.lock_timeout for a in run] == timeouts
        assert all(0 <= j.pause - n.pause <= 1 for j, n in zip(run[1:-2], nominal[1:-2], strict=True))
    assert [a.pause for a in jittered[0]] != [a.pause for a in jittered[1]]
    # today's patience: 10 attempts of 4 s and 92 s of pauses; the escalating schedule spends the same
    fixed = lockschedule.attempts(config.Settings(lock_timeout_schedule="fixed"), rand=lambda: 0.0)
    assert [a.lock_timeout for a in fixed] == [4.0] * 10
    assert sum(a.lock_timeout + a.pause for a in fixed) == lockschedule.patience(s) == 132.0
    assert sum(a.lock_timeout + a.pause for a in nominal) == pytest.approx(132.0)
    assert len(nominal) == 12 and sum(timeouts) == pytest.approx(5.2)  # 5.2 s of lock waits


def test_schedule_settings_are_checked() -> None:
    env = {"DATABASE_URL": "postgresql://u@h/d", "ALEMBIC_CONFIG": LAB}
    with pytest.raises(ConfigError, match=r"LOCK_TIMEOUT_START .* must not exceed LOCK_TIMEOUT_CEILING"):
        config.load({**env, "LOCK_TIMEOUT_START": "2s"})
    with pytest.raises(ConfigError, match="greater than LOCK_TIMEOUT_CEILING"):
        config.load({**env, "LOCK_TIMEOUT_CEILING": "10s", "MIGRATION_STATEMENT_TIMEOUT": "5s"})
    with pytest.raises(ConfigError, match="LOCK_TIMEOUT_SCHEDULE='gitlab' is not one of"):
        config.load({**env, "LOCK_TIMEOUT_SCHEDULE": "gitlab"})
    tiny = config.load({**env, "LOCK_RETRY_ATTEMPTS": "1", "MIGRATION_LOCK_TIMEOUT": "50ms"})
    assert lockschedule.attempts(tiny) == [lockschedule.Attempt(1, 0.1, 0.0)]  # never none


def test_retries_end_as_the_deadline_when_run_deadline_runs_out_before_the_schedule() -> None:
    """lockschedule.call serves the revision retries and every online step: when RUN_DEADLINE is
    spent with attempts left, the run stops as the deadline (exit 9), not as retries exhausted."""
    class Timeout(Exception):
        pass

    now, tried = [0.0], []
    run = Run(settings=config.Settings(run_deadline=10.0), log=EventLog(stream=io.StringIO()),
              command="test", clock=lambda: now[0], started=0.0)
    plan = [lockschedule.Attempt(n, 0.1, 0.0) for n in (1, 2, 3)]

    def attempt(a: lockschedule.Attempt) -> None:
        tried.append(a.number)
        now[0] += 6.0  # each attempt spends 6 s of the 10 s budget
        raise Timeout

    with pytest.raises(RunDeadline):
        lockschedule.call(run, attempt, retry_on=(Timeout,), on_retry=lambda *_: None, schedule=plan)
    assert tried == [1, 2]
    now[0], tried[:] = 0.0, []  # no deadline: every attempt, then the schedule's end re-raises
    run = Run(settings=config.Settings(), log=EventLog(stream=io.StringIO()), command="test",
              clock=lambda: now[0], started=0.0)
    with pytest.raises(Timeout):
        lockschedule.call(run, attempt, retry_on=(Timeout,), on_retry=lambda *_: None, schedule=plan)
    assert tried == [1, 2, 3]


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
    """The escalating schedule (the default): attempts of 100 ms, 200 ms, 400 ms, 500 ms... time
    out while the blocker holds on; a later attempt gets through; no read waits beyond the
    ceiling. Each attempt really runs with its own lock_timeout (the retry log names both)."""
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
    assert "hit lock_timeout (100ms); rolled back, retrying with 200ms" in r.err
    assert "hit lock_timeout (200ms); rolled back, retrying with 400ms" in r.err
    assert "application_name=app-blocker" in r.err and "xact_age_s=" in r.err
    assert "FOR UPDATE" in r.err and "secret-literal-42" not in r.err, "literals must be scrubbed"
    assert worst < CEILING + 0.5, f"an application read waited {worst:.2f}s"
    assert len(reader.latencies) > 20


def test_blocker_never_leaves_exit_8_unchanged(at) -> None:
    db = at("l001")
    hold = blocker(db, "SELECT count(*) FROM items")
    env = lab_env(db, LOCK_RETRY_ATTEMPTS="3")  # patience: 3 x 1 s + 1 s of pauses = 4 s
    schedule = lockschedule.attempts(config.load(env))
    try:
        t0 = time.monotonic()
        r = run_runner(["upgrade"], env)
        assert r.code == 8, r.err
        assert time.monotonic() - t0 < 15
        assert f"in {len(schedule)} attempts over" in r.err and "app-blocker" in r.err
        assert "lock_timeout 100ms doubling to 500ms" in r.err
        assert db.version() == "l001"
        assert db.sql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'items' "
                      "AND column_name = 'flag'") == "0"
    finally:
        hold.close()


@pytest.mark.pg(NEWEST)  # autovacuum's lock and its cancellation do not differ between majors
def test_a_revision_queued_behind_autovacuum_cancels_it_and_gets_through(at) -> None:
    """PostgreSQL cancels an autovacuum worker for a waiting lock only after deadlock_timeout
    (1 s): attempts of 100-500 ms never wait that long, so without the runner's help they queue
    behind the whole vacuum and the schedule (1.5 s here) ends in exit 8."""
    db = at("l001")
    # enough pages that the slowed vacuum outlasts the runner's start-up on a busy machine
    db.sql("INSERT INTO items SELECT g, 'n' || g FROM generate_series(101, 30000) g")
    with vacuuming(db, "items", "UPDATE items SET note = note || '!' WHERE id % 2 = 0") as worker:
        r = run_runner(["upgrade", "--to", "l002"], runner_env(
            db.url, ALEMBIC_CONFIG=LAB, MIGRATION_LOCK_TIMEOUT="100ms", LOCK_RETRY_ATTEMPTS="10",
            LOCK_RETRY_MAX_WAIT="50ms"))
    assert r.code == 0, r.err
    assert db.version() == "l002"
    cancelled = [line for line in r.err.splitlines() if "autovacuum.cancelled" in line]
    assert len(cancelled) == 1 and f"pid {worker}:" in cancelled[0], r.err


def test_concurrent_index_waits_are_bounded_and_retried(at) -> None:
    db = at("l002")
    # an old snapshot makes CREATE INDEX CONCURRENTLY wait; its wait obeys lock_timeout, and each
    # timed-out attempt leaves its index INVALID: this run's own leftover, dropped before the
    # retry even with INVALID_INDEX_POLICY=refuse (which is about leftovers of other runs)
    repeatable = psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ
    hold = blocker(db, "SELECT count(*) FROM items", isolation=repeatable)
    proc = start_runner(["upgrade"], lab_env(db, LOCK_RETRY_ATTEMPTS="30", INVALID_INDEX_POLICY="refuse",
                                             LOCK_TIMEOUT_SCHEDULE="fixed"))
    wait_until_runner_waits_on_a_lock(db)
    time.sleep(3 * LOCK_TIMEOUT)  # longer than lock_timeout: at least one attempt times out
    hold.commit()
    hold.close()
    r = finish(proc)
    assert r.code == 0, r.err
    assert "migrate.retry" in r.err
    assert "dropping INVALID index public.ix_items_note, left by an interrupted build" in r.err
    assert db.version() == "l003"
    assert db.sql("SELECT string_agg(indisvalid::text, ',') FROM pg_index WHERE indexrelid = "
                  "'ix_items_note'::regclass") == "true"


@pytest.mark.pg(NEWEST)  # the hook is the same on every major; CONCURRENTLY's waits are tested on each above
def test_concurrently_keeps_migration_lock_timeout_under_the_escalating_schedule(at) -> None:
    """CREATE INDEX CONCURRENTLY blocks no application query, and its wait for an older snapshot
    obeys lock_timeout: it keeps MIGRATION_LOCK_TIMEOUT instead of the schedule's 100 ms, so a
    snapshot a little older than the build does not fail it (and rebuild the index) again and again."""
    db = at("l002")
    hold = blocker(db, "SELECT count(*) FROM items",
                   isolation=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ)
    proc = start_runner(["upgrade"], runner_env(db.url, ALEMBIC_CONFIG=LAB, MIGRATION_LOCK_TIMEOUT="8s"))
    wait_until_runner_waits_on_a_lock(db)
    time.sleep(3 * CEILING)  # longer than any escalating attempt, shorter than MIGRATION_LOCK_TIMEOUT
    hold.commit()
    hold.close()
    r = finish(proc)
    assert r.code == 0, r.err
    assert "migrate.retry" not in r.err and "index.leftover" not in r.err
    assert db.version() == "l003"


def _leave_invalid_index(db: Database) -> None:
    """An interrupted CREATE INDEX CONCURRENTLY: a unique build over duplicates fails half-way."""
    out = db.sql("CREATE UNIQUE INDEX CONCURRENTLY ix_items_note ON items ((id > 0))", check=False)
    assert out == ""
    assert db.sql("SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_items_note'::regclass") == "f"


def _someone_elses_invalid_index(db: Database, owner: str) -> None:
    """app.users_email_uq: another team's failed CREATE UNIQUE INDEX CONCURRENTLY, owned by owner."""
    db.sql(f"CREATE ROLE {owner}; CREATE SCHEMA app AUTHORIZATION {owner}; "
           "CREATE TABLE app.users (email text); INSERT INTO app.users VALUES ('a'), ('a'); "
           f"ALTER TABLE app.users OWNER TO {owner}")
    db.sql("CREATE UNIQUE INDEX CONCURRENTLY users_email_uq ON app.users (email)", check=False)


def test_killed_build_leftover_dropped_someone_elses_left_alone(database: Database) -> None:
    """kill -9 during CREATE INDEX CONCURRENTLY leaves the index INVALID: the next run drops and
    rebuilds it. app.users_email_uq, INVALID and owned by another role, is reported and untouched
    (the runner's role could not even drop it)."""
    db, role = database, f"mig_{database.name}"
    db.sql(f"CREATE ROLE {role} LOGIN PASSWORD '{APP_PASSWORD}'; ALTER DATABASE {db.name} OWNER TO {role}")
    env = runner_env(db.cluster.url(db.name, user=role, password=APP_PASSWORD), ALEMBIC_CONFIG=LAB,
                     MIGRATION_LOCK_TIMEOUT="60s")
    assert run_runner(["upgrade", "--to", "l002"], env).code == 0
    _someone_elses_invalid_index(db, f"team_{db.name}")
    hold = blocker(db, "SELECT count(*) FROM items",
                   isolation=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ)
    proc = start_runner(["upgrade"], env)
    wait_until_runner_waits_on_a_lock(db)  # the build waits for the old snapshot
    proc.kill()
    proc.communicate(timeout=10)
    wait_for(lambda: db.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
                            "'migration-runner/%'") == "0", what="the killed runner's sessions stayed")
    hold.commit()
    hold.close()
    invalid = ("SELECT string_agg(indexrelid::regclass::text, ',' ORDER BY 1) FROM pg_index "
               "WHERE NOT indisvalid")
    assert db.sql(invalid) == "app.users_email_uq,ix_items_note"
    r = run_runner(["upgrade"], env)
    assert r.code == 0, r.err
    assert "dropping INVALID index public.ix_items_note, left by an interrupted build" in r.err
    assert "INVALID index app.users_email_uq (owner team_" in r.err and "left alone" in r.err
    assert db.sql(invalid) == "app.users_email_uq", "someone else's index must stay as it was"
    assert db.version() == "l003"
    assert db.sql("SELECT pg_get_indexdef('ix_items_note'::regclass)") == \
        "CREATE INDEX ix_items_note ON public.items USING btree (note)"


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
