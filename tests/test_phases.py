"""Deploy phases: pre-deploy before the rollout, post-deploy after it, never out of order.

The scenario (tests/scenarios/phases) is an expand/contract rename in two releases: release 1 is
p001, p002 (pre-deploy) and p003 (post-deploy, drops the old column); release 2 (next.ini) adds
p004 (pre-deploy, on top of p003) and p005 (post-deploy). branched.ini is a branch and a merge.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import sqlalchemy as sa

from runner.lock.key import lock_key
from runner.online import state
from tests.conftest import REPO, Database, run_runner, runner_env

SCENARIO = REPO / "tests/scenarios/phases"


def phases_env(db: Database, ini: str = "alembic.ini", **extra: str) -> dict[str, str]:
    return runner_env(db.url, ALEMBIC_CONFIG=str(SCENARIO / ini), **extra)


def upgrade(db: Database, phase: str, *more: str, ini: str = "alembic.ini", **extra: str):
    return run_runner(["upgrade", "--phase", phase, *more], phases_env(db, ini, **extra))


def columns(db: Database) -> str:
    return db.sql("SELECT string_agg(column_name, ',' ORDER BY column_name) FROM "
                  "information_schema.columns WHERE table_name = 'users'")


def test_pre_deploy_then_post_deploy(database: Database) -> None:
    db, env = database, phases_env(database)
    r = upgrade(db, "pre-deploy")
    assert r.code == 0, r.err
    assert db.version() == "p002" and columns(db) == "full_name,id,name"
    assert "post-deploy revision(s) left pending (p003)" in r.err
    s = run_runner(["status"], env)
    assert "pending:  p003\n  pre-deploy:  none\n  post-deploy: p003\n" in s.out, s.out
    assert run_runner(["status", "--check", "--phase", "pre-deploy"], env).code == 0
    assert run_runner(["status", "--check", "--phase", "post-deploy"], env).code == 10
    assert run_runner(["status", "--check"], env).code == 10
    # the application's pods start: every pre-deploy revision is there
    t0 = time.monotonic()
    w = run_runner(["wait", "--until-head"], {**env, "HEAD_POLL_INTERVAL": "30s"})
    assert w.code == 0 and time.monotonic() - t0 < 15, w.err
    assert "has every pre-deploy revision of head p003 (and 1 post-deploy" in w.err
    again = upgrade(db, "pre-deploy")
    assert again.code == 0 and "nothing to do" in again.err
    r = upgrade(db, "post-deploy")
    assert r.code == 0, r.err
    assert db.version() == "p003" and columns(db) == "full_name,id"
    assert run_runner(["status", "--check", "--phase", "post-deploy"], env).code == 0


def test_a_fleet_runs_each_phase_and_its_status_says_which_is_done(pg, tmp_path: Path) -> None:
    """TARGETS_FILE: the pre-deploy phase on every target, a status table that tells "pre-deploy
    done" from "behind", and --check per phase (exit 14: a fleet with targets pending)."""
    names = [f"ph_{i}_{time.monotonic_ns() % 10**8}" for i in (1, 2)]
    for name in names:
        pg.psql(f"CREATE DATABASE {name}")
    try:
        (tmp_path / "targets.txt").write_text("\n".join(names) + "\n")
        env = runner_env(None, ALEMBIC_CONFIG=str(SCENARIO / "alembic.ini"),
                         TARGETS_FILE=str(tmp_path / "targets.txt"),
                         DATABASE_URL_TEMPLATE=pg.url("{name}"))
        assert run_runner(["upgrade", "--phase", "pre-deploy"], env).code == 0
        for name in names:
            assert Database(pg, name).version() == "p002"
        s = run_runner(["status"], env)
        done = "behind (1 pending: 0 pre-deploy, 1 post-deploy)"
        assert s.out.count(" p002 ") == 2 and s.out.count(done) == 2, s.out
        assert run_runner(["status", "--check", "--phase", "pre-deploy"], env).code == 0
        assert run_runner(["status", "--check", "--phase", "post-deploy"], env).code == 14
        assert run_runner(["upgrade", "--phase", "post-deploy"], env).code == 0
        assert run_runner(["status", "--check", "--phase", "post-deploy"], env).code == 0
        assert Database(pg, names[0]).version() == "p003"
    finally:
        for name in names:
            pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=False)


def test_post_deploy_refuses_before_its_pre_deploy_revisions(database: Database) -> None:
    assert upgrade(database, "all", "--to", "p001").code == 0
    r = upgrade(database, "post-deploy")
    assert r.code == 7, r.err
    assert "post-deploy revision(s) p003 depend on pre-deploy revision(s) that have not run " \
           "(p003 needs p002)" in r.err
    assert database.version() == "p001" and columns(database) == "id,name"


def insert_backfill(db: Database, name: str, revision: str) -> None:
    engine = sa.create_engine(db.url.replace("postgresql://", "postgresql+psycopg2://", 1))
    with engine.begin() as conn:
        state.ensure(conn, None)
        conn.execute(sa.text("INSERT INTO runner_backfills (name, revision, relation, key_column, "
                             "assignment, rows_done, rows_estimate, state) VALUES (:n, :r, 'users', "
                             "'id', 'full_name = name', 10, 20, 'running')"), {"n": name, "r": revision})
    engine.dispose()


def test_post_deploy_refuses_while_a_backfill_is_unfinished(database: Database) -> None:
    db = database
    assert upgrade(db, "pre-deploy").code == 0
    insert_backfill(db, "users_full_name", "p002")
    r = upgrade(db, "post-deploy")
    assert r.code == 7, r.err
    assert "must not run while a backfill is unfinished: users_full_name (revision p002, " \
           "running, 10 rows done)" in r.err
    assert db.version() == "p002" and columns(db) == "full_name,id,name"
    s = run_runner(["status", "--check", "--phase", "post-deploy"], phases_env(db))
    assert s.code == 10 and "  users_full_name: running, 10 of ~20 rows, revision p002" in s.out, s.out
    db.sql("UPDATE runner_backfills SET state = 'done', finished_at = now()")
    r = upgrade(db, "post-deploy")
    assert r.code == 0, r.err
    assert db.version() == "p003"


def test_all_never_runs_post_deploy_past_an_unfinished_backfill(database: Database) -> None:
    """Development (`all`): a revision that leaves its backfill unfinished stops the chain before
    the post-deploy revision (checked right before it); a rerun refuses before anything runs."""
    db = database
    r = run_runner(["upgrade"], phases_env(db, PHASES_LEAVE_BACKFILL="1"))
    assert r.code == 7, r.err
    assert "post-deploy revision(s) p003 must not run while a backfill is unfinished" in r.err
    assert "the database stays at the last revision applied" in r.err
    assert db.version() == "p002" and columns(db) == "full_name,id,name"
    r = run_runner(["upgrade"], phases_env(db))
    assert r.code == 7 and "users_full_name" in r.err, r.err
    assert db.version() == "p002"


def test_next_release_refuses_while_the_previous_post_deploy_has_not_run(database: Database) -> None:
    db = database
    assert upgrade(db, "pre-deploy").code == 0  # release 1's pre-deploy Job; its post-deploy never ran
    r = upgrade(db, "pre-deploy", ini="next.ini")
    assert r.code == 7, r.err
    assert "pre-deploy revision(s) p004 cannot run before the rollout" in r.err
    assert "p004 descends from p003" in r.err and "upgrade --phase post-deploy --to p003" in r.err
    assert "re-parent" in r.err
    assert db.version() == "p002" and columns(db) == "full_name,id,name"
    s = run_runner(["status"], phases_env(db, "next.ini"))
    assert "  pre-deploy:  p004 (after post-deploy p003)\n  post-deploy: p003, p005\n" in s.out, s.out
    r = upgrade(db, "post-deploy", ini="next.ini")
    assert r.code == 7 and "p005 needs p004" in r.err and "p003 can run now" in r.err, r.err
    # the fix the messages name, then release 2's two phases
    assert upgrade(db, "post-deploy", "--to", "p003", ini="next.ini").code == 0
    assert upgrade(db, "pre-deploy", ini="next.ini").code == 0
    assert db.version() == "p004"
    assert upgrade(db, "post-deploy", ini="next.ini").code == 0
    assert db.version() == "p005"


def test_branch_and_merge(database: Database) -> None:
    db, env = database, phases_env(database, "branched.ini")
    r = run_runner(["upgrade", "--phase", "pre-deploy"], env)
    assert r.code == 0, r.err
    assert db.version() == "b003"
    assert db.sql("SELECT to_regclass('b002_done') IS NULL") == "t"
    assert "  post-deploy: b002, b004\n" in run_runner(["status"], env).out
    assert run_runner(["wait", "--until-head"], env).code == 0
    r = run_runner(["upgrade", "--phase", "post-deploy"], env)
    assert r.code == 0, r.err
    assert db.version() == "b004"
    assert {f"public.b00{n}_done" for n in range(1, 5)} <= db.tables()


def test_a_pre_deploy_merge_of_a_post_deploy_branch_refuses(database: Database) -> None:
    env = phases_env(database, "branched.ini", B004_PHASE="pre-deploy")
    r = run_runner(["upgrade", "--phase", "pre-deploy"], env)
    assert r.code == 7, r.err
    assert "b004 descends from b002" in r.err
    assert database.version() == ""


def test_a_pre_deploy_copy_never_waits_at_the_start_up_gate(database: Database, tmp_path: Path) -> None:
    """With the no-op facts recorded (as in the image), a copy behind the recorded head would wait
    at the start-up gate for a leader to bring the database to that head; in the pre-deploy phase
    the leader stops short of it (p002, not p003). Here another copy holds the gate: a pre-deploy
    copy must not wait for it (it would until LOCK_WAIT_TIMEOUT: exit 4), but find nothing to do."""
    scripts = tmp_path / "phases"
    shutil.copytree(SCENARIO, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    env = runner_env(database.url, ALEMBIC_CONFIG=str(scripts / "alembic.ini"), LOCK_WAIT_TIMEOUT="3s")
    recorded = subprocess.run([sys.executable, "-m", "runner.fastpath", "record", "--strict"],
                              env={**env, "DATABASE_URL": ""}, cwd=scripts, capture_output=True,
                              text=True, timeout=60)
    assert recorded.returncode == 0, recorded.stderr
    assert run_runner(["upgrade", "--phase", "pre-deploy"], env, cwd=scripts).code == 0
    gate = psycopg2.connect(database.url)
    gate.autocommit = True
    try:
        with gate.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (lock_key(database.name, "", "alembic_version",
                                                                 purpose="alembic-migrate-gate"),))
        r = run_runner(["upgrade", "--phase", "pre-deploy"], env, cwd=scripts)
    finally:
        gate.close()
    assert r.code == 0 and "nothing to do" in r.err, r.err
    assert database.version() == "p002"
