"""SIGTERM/SIGINT in every phase, SIGKILL and the run deadline, during a slow migration and before.

(A restarted or crashed server is in test_faults.py.)"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.conftest import NEWEST, REPO, Database, finish, run_runner, runner_env, start_runner, wait_for
from tests.pgcluster import free_port

pytestmark = pytest.mark.every_major  # lock and cancel behaviour differs between majors

LAB = str(REPO / "tests/scenarios/lab/alembic.ini")


COOKBOOK = str(REPO / "tests/scenarios/cookbook/alembic.ini")


def read_until(proc: subprocess.Popen, needle: str) -> str:
    """Read the runner's stderr until a line contains needle (or it exits); return what was read."""
    seen = ""
    while needle not in seen:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    assert needle in seen, seen
    return seen


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

    from runner.lock.key import lock_key

    holder = psycopg2.connect(database.url)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (lock_key(database.name, "", "alembic_version"),))
        t0 = time.monotonic()
        r = run_runner(["upgrade"], runner_env(database.url, LOCK_WAIT_TIMEOUT="60s", RUN_DEADLINE="3s"))
        assert r.code == 9, r.err
        assert time.monotonic() - t0 < 3 + 5  # RUN_DEADLINE + its bound, not LOCK_WAIT_TIMEOUT's 60 s
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


@pytest.mark.pg(NEWEST)  # the same on every major: no statement runs
@pytest.mark.parametrize("command,sig,code", [(["status"], signal.SIGINT, 130),
                                              (["upgrade"], signal.SIGTERM, 143)])
def test_signal_during_startup_stops_a_noop(database: Database, command: list[str], sig: int,
                                           code: int) -> None:
    """A signal while a command that would change nothing is still starting (here: an env.py that
    takes 1 s to load) ends it with the signal's code, not 0."""
    env = runner_env(database.url, ALEMBIC_CONFIG=COOKBOOK, FAST_PATH="off")
    assert run_runner(["upgrade"], env).code == 0  # so that upgrade is a no-op
    proc = start_runner(command, dict(env, COOKBOOK_ENV_SLEEP="1"))
    seen = read_until(proc, "db.ready")
    proc.send_signal(sig)
    r = finish(proc, timeout=30)
    assert r.code == code, seen + r.err
    assert f"interrupted by {signal.Signals(sig).name}" in r.err
    assert database.version() == "c001"


def test_signal_while_waiting_for_the_database() -> None:
    url = f"postgresql://nobody:x@127.0.0.1:{free_port()}/app"
    proc = start_runner(["wait"], runner_env(url, DB_WAIT_TIMEOUT="60s"))
    read_until(proc, "db.not_ready")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    r = finish(proc, timeout=30)
    assert r.code == 143, r.err
    assert time.monotonic() - t0 < 3
