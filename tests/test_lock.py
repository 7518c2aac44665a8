"""The migration lock: ten runners at once, a foreign holder, and lock-key scoping."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time

import psycopg2

from runner.lock.key import lock_key
from tests.conftest import REPO, Database, finish, run_runner, runner_env, start_runner

LAB = str(REPO / "tests/scenarios/lab/alembic.ini")


def test_ten_runners_exactly_one_applies(database: Database) -> None:
    # a slow revision keeps the holder busy long enough for every waiter to see it
    env = runner_env(database.url, ALEMBIC_CONFIG=LAB, LAB_MODE="sleep", LAB_SLEEP="2",
                     LOG_FORMAT="text")
    procs = [start_runner(["upgrade"], env) for _ in range(10)]
    results = [finish(p) for p in procs]
    assert [r.code for r in results] == [0] * 10, [r.err for r in results if r.code]
    migrated = [r for r in results if "outcome=migrated" in r.err]
    noops = [r for r in results if 'outcome="nothing to do"' in r.err]
    assert len(migrated) == 1 and len(noops) == 9
    holder_pid = re.search(r"lock.acquired", migrated[0].err)
    assert holder_pid
    waiters = [r for r in noops if "lock.waiting" in r.err]
    assert waiters, "at least one runner must have waited for the lock"
    for w in waiters:
        line = next(line for line in w.lines if "lock.waiting" in line)
        assert "holder_pid=" in line and "holder_application_name=migration-runner/lock/" in line
        assert "holder_since=" in line
        # a waiter reads the revision on each poll and stops once it is there: no lock taken
        assert "lock.not_needed" in w.err and "lock.acquired" not in w.err, w.err
    assert database.version() == "l003"
    assert database.sql("SELECT count(*) FROM l002_done") == "0"


def test_storm_with_recorded_facts_waits_at_the_gate(database: Database, tmp_path) -> None:
    """With the no-op facts recorded (as the image does), copies that find another copy migrating
    wait for it without running env.py (runner.lock.gate), then find nothing to do."""
    shutil.copytree(REPO / "tests/scenarios/lab", tmp_path / "lab",
                    ignore=shutil.ignore_patterns("__pycache__"))
    ini = str(tmp_path / "lab/alembic.ini")
    env = runner_env(database.url, ALEMBIC_CONFIG=ini, LAB_MODE="sleep", LAB_SLEEP="2")
    assert run_runner(["upgrade", "--to", "l001"], env).code == 0
    recorded = subprocess.run([sys.executable, "-m", "runner.fastpath", "record", "--strict", "-c", ini],
                              env=env, cwd=REPO, capture_output=True, text=True)
    assert recorded.returncode == 0, recorded.stderr
    results = [finish(p) for p in [start_runner(["upgrade"], env) for _ in range(5)]]
    assert [r.code for r in results] == [0] * 5, [r.err for r in results if r.code]
    assert sum("outcome=migrated" in r.err for r in results) == 1
    gated = [r for r in results if "another copy of this upgrade is migrating" in r.err]
    assert len(gated) >= 3, [r.err for r in results]
    for r in gated:
        assert "lock.not_needed" in r.err and "lock.acquired" not in r.err and "alembic" not in r.err
        assert 'outcome="nothing to do"' in r.err
    assert database.version() == "l003"
    assert database.sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == "0"


def test_foreign_holder_times_out_with_exit_4(database: Database) -> None:
    env = runner_env(database.url, LOCK_WAIT_TIMEOUT="3s")
    key = lock_key(database.name, "", "alembic_version")
    holder = psycopg2.connect(database.url, application_name="manual-maintenance")
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (key,))
        holder.commit()
        t0 = time.monotonic()
        r = run_runner(["upgrade"], env)
        took = time.monotonic() - t0
        assert r.code == 4, r.err
        assert 3 <= took < 10
        assert "manual-maintenance" in r.err and "LOCK_WAIT_TIMEOUT" in r.err
        assert database.tables() == set()
    finally:
        holder.close()
    # once released, the same run succeeds
    assert run_runner(["upgrade"], env).code == 0


def test_lock_key_scopes_database_and_version_table() -> None:
    base = lock_key("shop", "", "alembic_version")
    assert base == lock_key("shop", "", "alembic_version")
    assert len({base, lock_key("shop2", "", "alembic_version"),
                lock_key("shop", "meta", "alembic_version"),
                lock_key("shop", "", "other_version")}) == 4
    assert -(2**63) <= base < 2**63


def test_other_version_table_is_not_blocked(database: Database) -> None:
    """Two applications in one database, with their own version tables, don't block each other."""
    key = lock_key(database.name, "", "alembic_version")
    holder = psycopg2.connect(database.url)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (key,))
        env = runner_env(database.url, ALEMBIC_CONFIG=str(REPO / "tests/scenarios/foreign/alembic.ini"),
                         LOCK_WAIT_TIMEOUT="2s")
        assert run_runner(["upgrade"], env).code == 0
    finally:
        holder.close()


def test_no_advisory_lock_left_after_run(database: Database) -> None:
    assert run_runner(["upgrade"], runner_env(database.url)).code == 0
    assert database.sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == "0"
