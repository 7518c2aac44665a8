"""SIGTERM/SIGINT, SIGKILL, the run deadline and a crashed server, during a slow migration."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from tests.conftest import REPO, Database, finish, run_runner, runner_env, start_runner, wait_for
from tests.pgcluster import Cluster, free_port

pytestmark = pytest.mark.every_major  # lock and cancel behaviour differs between majors

LAB = str(REPO / "tests/scenarios/lab/alembic.ini")


def sleeping(database: Database) -> bool:
    return database.sql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' "
                        "AND state = 'active'") != "0"


def leftovers(database: Database) -> tuple[str, str]:
    return (database.sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"),
            database.sql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' "
                         "AND state = 'active'"))


@pytest.fixture
def at_l001(database: Database) -> Database:
    assert run_runner(["upgrade", "--to", "l001"], runner_env(database.url, ALEMBIC_CONFIG=LAB)).code == 0
    return database


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_cancels_running_statement(at_l001: Database, sig: int, code: int) -> None:
    db = at_l001
    proc = start_runner(["upgrade"], runner_env(db.url, ALEMBIC_CONFIG=LAB, LAB_MODE="sleep",
                                                LAB_SLEEP="60"))
    wait_for(lambda: sleeping(db))
    t0 = time.monotonic()
    proc.send_signal(sig)
    r = finish(proc, timeout=30)
    assert r.code == code, r.err
    assert time.monotonic() - t0 < 5
    assert db.version() == "l001"
    assert db.sql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'items' "
                  "AND column_name = 'flag'") == "0", "the cancelled revision must be rolled back"
    assert leftovers(db) == ("0", "0")
    assert "signal" in r.err and "interrupted" in r.err


def test_run_deadline_stops_cleanly(at_l001: Database) -> None:
    db = at_l001
    t0 = time.monotonic()
    r = run_runner(["upgrade"], runner_env(db.url, ALEMBIC_CONFIG=LAB, LAB_MODE="sleep",
                                           LAB_SLEEP="60", RUN_DEADLINE="4s"))
    took = time.monotonic() - t0
    assert r.code == 9, r.err
    assert took < 8
    assert "RUN_DEADLINE" in r.err
    assert db.version() == "l001" and leftovers(db) == ("0", "0")


def test_run_deadline_shorter_than_lock_wait(database: Database) -> None:
    import psycopg2

    from runner.lock import lock_key

    holder = psycopg2.connect(database.url)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (lock_key(database.name, "", "alembic_version"),))
        t0 = time.monotonic()
        r = run_runner(["upgrade"], runner_env(database.url, LOCK_WAIT_TIMEOUT="60s", RUN_DEADLINE="3s"))
        assert r.code == 9, r.err
        assert time.monotonic() - t0 < 6
        assert database.tables() == set()
    finally:
        holder.close()


def test_sigkill_runner_backend_goes_away(at_l001: Database) -> None:
    """After SIGKILL the server notices the dead client (client_connection_check_interval)."""
    db = at_l001
    proc = start_runner(["upgrade"], runner_env(db.url, ALEMBIC_CONFIG=LAB, LAB_MODE="sleep",
                                                LAB_SLEEP="120"))
    wait_for(lambda: sleeping(db))
    proc.kill()
    proc.communicate(timeout=10)
    t0 = time.monotonic()
    wait_for(lambda: leftovers(db) == ("0", "0"), timeout=15, every=0.2)
    assert time.monotonic() - t0 < 10
    assert db.version() == "l001"
    assert run_runner(["upgrade"], runner_env(db.url, ALEMBIC_CONFIG=LAB)).code == 0


@pytest.fixture
def own_cluster(pg: Cluster) -> Iterator[Cluster]:
    """A cluster of the same major that this test may stop, start and crash."""
    c = Cluster(pg.major).init().start()
    c.psql("CREATE DATABASE app")
    yield c
    c.destroy()


def test_postmaster_killed_mid_migration(own_cluster: Cluster) -> None:
    c = own_cluster
    db = Database(c, "app")
    env = runner_env(c.url("app"), ALEMBIC_CONFIG=LAB, LAB_MODE="sleep", LAB_SLEEP="60",
                     DB_WAIT_TIMEOUT="30s")
    assert run_runner(["upgrade", "--to", "l001"], env).code == 0
    proc = start_runner(["upgrade"], env)
    wait_for(lambda: sleeping(db))
    c.kill9()
    r = finish(proc, timeout=60)
    assert r.code not in (0, 143), r.err
    assert "Traceback" not in r.err
    c.start()
    assert db.version() == "l001"
    again = run_runner(["upgrade"], runner_env(c.url("app"), ALEMBIC_CONFIG=LAB))
    assert again.code == 0, again.err
    assert db.version() == "l003"


def test_database_started_late(own_cluster: Cluster) -> None:
    c = own_cluster
    c.stop()
    proc = start_runner(["upgrade"], runner_env(c.url("app"), DB_WAIT_TIMEOUT="40s"))
    time.sleep(5)
    c.start()
    r = finish(proc, timeout=60)
    assert r.code == 0, r.err
    assert "db.not_ready" in r.err and "attempt=" in r.err
    assert Database(c, "app").version() == "0005"


def test_database_never_ready() -> None:
    url = f"postgresql://nobody:x-secret-x@127.0.0.1:{free_port()}/app"
    t0 = time.monotonic()
    r = run_runner(["upgrade"], runner_env(url, DB_WAIT_TIMEOUT="3s"))
    took = time.monotonic() - t0
    assert r.code == 3, r.err
    assert 3 <= took < 7
    assert "DB_WAIT_TIMEOUT" in r.err and "Connection refused" in r.err
    assert "x-secret-x" not in r.err
