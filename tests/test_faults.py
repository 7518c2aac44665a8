"""Faults: a server restarted or killed mid-run, a server that starts late or never, credentials
that are wrong or arrive late. Each gives its documented exit code and one line saying what
happened, and leaves the database at the last good revision.

The restarts use a cluster of their own (restarting the shared one would break other tests),
shared by this module; each test works in a database of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from runner.lock.key import lock_key
from tests.conftest import NEWEST, REPO, Database, finish, run_runner, runner_env, start_runner, wait_for
from tests.pgcluster import APP_PASSWORD, PASSWORD, Cluster, free_port
from tests.result import Result
from tests.test_signals import read_until, sleeping

LAB = str(REPO / "tests/scenarios/lab/alembic.ini")


@pytest.fixture(scope="module")
def restartable() -> Iterator[Cluster]:
    """A cluster these tests may stop, restart and crash."""
    c = Cluster(NEWEST).init().start()
    yield c
    c.destroy()


@pytest.fixture
def fresh(restartable: Cluster) -> Database:
    if restartable.postmaster_pid() is None:  # a test failed while the server was down
        restartable.start()
    name = f"f_{uuid.uuid4().hex[:10]}"
    restartable.psql(f"CREATE DATABASE {name}")
    return Database(restartable, name)


def _error_line(r: Result) -> str:
    errors = [line for line in r.lines if " ERROR " in line]
    assert len(errors) == 1, r.err
    assert "Traceback" not in r.err
    return errors[0]


@pytest.mark.parametrize("how", ["fast", "immediate", "kill9"])
def test_server_lost_mid_migration_exits_11(fresh: Database, how: str) -> None:
    """A restart (fast, immediate) or a crash during a revision: exit 11, retriable; the revision
    rolled back, and once the server is back a plain rerun finishes the job."""
    db, c = fresh, fresh.cluster
    env = runner_env(db.url, ALEMBIC_CONFIG=LAB, LAB_MODE="sleep", LAB_SLEEP="60")
    assert run_runner(["upgrade", "--to", "l001"], env).code == 0
    proc = start_runner(["upgrade"], env)
    wait_for(lambda: sleeping(db))
    t0 = time.monotonic()
    c.kill9() if how == "kill9" else c.stop(how)
    r = finish(proc, timeout=60)
    took = time.monotonic() - t0
    c.start()
    assert r.code == 11, r.err
    assert took < 10, "a lost connection is noticed at once, not after a timeout"
    line = _error_line(r)
    assert "lost the connection to the database while revision l002 ran" in line
    assert "server closed the connection unexpectedly" in line
    assert db.version() == "l001"
    assert db.sql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'items' "
                  "AND column_name = 'flag'") == "0", "the interrupted revision must be rolled back"
    if how == "kill9":  # the retry a Job would make
        again = run_runner(["upgrade"], runner_env(db.url, ALEMBIC_CONFIG=LAB))
        assert again.code == 0, again.err
        assert db.version() == "l003"


def test_server_restarted_mid_backfill_exits_11_and_the_rerun_resumes_it(fresh: Database) -> None:
    """A restart while an online backfill runs (each batch its own transaction, outside the
    revision's): exit 11 naming the server's reason, not SQLAlchemy's "Can't reconnect until
    invalid transaction is rolled back" that the operation's clean-up raised after it; the ledger
    warning does not send anyone to check privileges; the rerun resumes from the checkpoint and
    every row is updated exactly once."""
    from tests.test_online import ROWS, backfill_env, rows_done

    db, c = fresh, fresh.cluster
    env = backfill_env(db.url)
    assert run_runner(["upgrade", "--to", "b001"], env).code == 0
    proc = start_runner(["upgrade"], env)
    wait_for(lambda: rows_done(db) >= 500, timeout=60, what="the backfill did not start")
    c.stop("fast")
    r = finish(proc, timeout=60)
    c.start()
    assert r.code == 11, r.err
    assert "Traceback" not in r.err
    line = r.summary()["msg"]
    assert "lost the connection to the database while revision b002 ran" in line, line
    assert "Can't reconnect" not in line and "rollback()" not in line, line
    assert "privileges" not in r.err, r.err
    done = rows_done(db)
    assert 500 <= done < ROWS and db.version() == "b001"
    again = run_runner(["upgrade"], env)
    assert again.code == 0, again.err
    assert '"backfill.resume"' in again.err, again.err
    assert db.sql("SELECT count(*) FILTER (WHERE hits = 1) || ' ' || count(*) FROM items") == f"{ROWS} {ROWS}"


def test_restart_while_waiting_for_the_lock_reconnects(fresh: Database) -> None:
    """Waiting for the lock changes nothing, so a lost connection is simply opened again."""
    db, c = fresh, fresh.cluster
    holder = psycopg2.connect(db.url, application_name="manual-maintenance")
    holder.autocommit = True
    with holder.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", (lock_key(db.name, "", "alembic_version"),))
    proc = start_runner(["upgrade"], runner_env(db.url, LOCK_WAIT_TIMEOUT="60s"))
    seen = read_until(proc, "lock.waiting")
    c.stop("fast")  # ends the holder's session too, and with it its lock
    c.start()
    r = finish(proc, timeout=60)
    holder.close()
    assert r.code == 0, seen + r.err
    assert "lock.reconnect" in r.err and "nothing was changed: connecting again" in r.err
    assert "lock.acquired" in r.err
    assert db.version() == "0005"


def backend_of(db: Database, query: str) -> int:
    return int(db.sql(f"SELECT pid FROM pg_stat_activity WHERE query LIKE '{query}%' AND state = 'active'"))


@pytest.mark.parametrize("stop", ["deadline", "SIGTERM"])
def test_hung_server_mid_migration_still_reports_and_exits(fresh: Database, tmp_path: Path,
                                                           stop: str) -> None:
    """A backend that stops answering (SIGSTOP: its TCP connection stays up, so keepalives never
    end it, and the cancel request waits too): RUN_DEADLINE (or SIGTERM) still ends the run
    within 5 s, with its summary line, its termination message and its ledger row ended from a
    fresh connection; once the backend resumes, its transaction is gone."""
    db = fresh
    message = tmp_path / "termination-log"
    deadline = 6 if stop == "deadline" else 0
    env = runner_env(db.url, ALEMBIC_CONFIG=LAB, LAB_MODE="sleep", LAB_SLEEP="60", LOG_FORMAT="json",
                     RUN_DEADLINE=f"{deadline}s", TERMINATION_MESSAGE_PATH=str(message))
    assert run_runner(["upgrade", "--to", "l001"], env).code == 0
    t0 = time.monotonic()
    proc = start_runner(["upgrade"], env)
    wait_for(lambda: sleeping(db))
    pid = backend_of(db, "SELECT pg_sleep")
    os.kill(pid, signal.SIGSTOP)
    try:
        if stop == "SIGTERM":
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
        r = finish(proc, timeout=60)
        took = time.monotonic() - t0
        row = db.sql("SELECT outcome, exit_code, finished_at IS NOT NULL FROM runner_history "
                     "ORDER BY started_at DESC LIMIT 1")  # read while the backend is still stopped
    finally:
        os.kill(pid, signal.SIGCONT)
    code, outcome = (9, "deadline") if stop == "deadline" else (143, "interrupted")
    assert r.code == code, r.err
    assert took < deadline + 5, f"{took:.1f}s: the Job would have killed it first"
    summary, written = r.summary(), json.loads(message.read_bytes())
    assert summary["exit_code"] == written["exit_code"] == code and summary["run_id"] == written["run_id"]
    assert "and the run did not stop within 2s: the database did not answer the cancel" in summary["msg"]
    assert ("RUN_DEADLINE" if stop == "deadline" else "SIGTERM") in written["error"]
    assert "ledger" not in written, "the row was ended from a fresh connection"
    assert sum('"event": "summary"' in line for line in r.lines) == 1, "reported once, not by both threads"
    assert row == f"{outcome}|{code}|t", "the ledger row must not stay 'running'"
    assert "Traceback" not in r.err
    wait_for(lambda: not sleeping(db), what="the resumed backend kept running its statement")
    assert db.version() == "l001" and "public.l002_done" not in db.tables()


def test_database_started_late(fresh: Database) -> None:
    c = fresh.cluster
    c.stop()
    proc = start_runner(["upgrade"], runner_env(fresh.url, DB_WAIT_TIMEOUT="40s"))
    seen = read_until(proc, "db.not_ready")
    c.start()
    r = finish(proc, timeout=60)
    assert r.code == 0, seen + r.err
    assert "attempt=" in seen
    assert fresh.version() == "0005"


def test_database_never_ready() -> None:
    url = f"postgresql://nobody:x-secret-x@127.0.0.1:{free_port()}/app"
    t0 = time.monotonic()
    r = run_runner(["upgrade"], runner_env(url, DB_WAIT_TIMEOUT="1s"))
    took = time.monotonic() - t0
    assert r.code == 3, r.err
    assert 1 <= took < 5
    line = _error_line(r)
    assert "DB_WAIT_TIMEOUT" in line
    # the driver's two lines stay two sentences on one line
    assert "Connection refused / Is the server running on that host" in line
    assert "x-secret-x" not in r.err


# -- authentication: its own hint each, retried for DB_AUTH_TIMEOUT, then exit 12 -------------------

def test_wrong_password_exits_12_after_the_auth_window(database: Database) -> None:
    url = database.cluster.url(database.name, password=PASSWORD + "x")
    t0 = time.monotonic()
    r = run_runner(["upgrade"], runner_env(url, DB_AUTH_TIMEOUT="1s", DB_WAIT_TIMEOUT="60s"))
    took = time.monotonic() - t0
    assert r.code == 12, r.err
    assert 1 <= took < 10, "retried for DB_AUTH_TIMEOUT, not for DB_WAIT_TIMEOUT"
    line = _error_line(r)
    assert "password authentication failed" in line and "retried for DB_AUTH_TIMEOUT (1s)" in line
    assert "check the user and password in DATABASE_URL" in line
    assert "check that it is running" not in r.err
    assert "db.not_ready" in r.err
    assert database.tables() == set()


def test_missing_database_fails_at_once_without_auth_window(database: Database) -> None:
    url = database.cluster.url(f"{database.name}_missing")
    r = run_runner(["status"], runner_env(url, DB_AUTH_TIMEOUT="0"))
    assert r.code == 12, r.err
    line = _error_line(r)
    assert f'database "{database.name}_missing" does not exist' in line
    assert "the runner never creates roles or databases" in line and "not retried" in line


def test_role_provisioned_late_is_waited_for(database: Database) -> None:
    """An operator creates the role (or the Secret catches up) while the runner retries."""
    role = f"late_{database.name}"
    url = database.cluster.url(database.name, user=role, password=APP_PASSWORD)
    proc = start_runner(["wait"], runner_env(url, DB_AUTH_TIMEOUT="30s"))
    seen = read_until(proc, "db.not_ready")
    assert "password authentication failed" in seen and "check the user and password" in seen
    database.sql(f"CREATE ROLE {role} LOGIN PASSWORD '{APP_PASSWORD}'")
    r = finish(proc, timeout=60)
    assert r.code == 0, seen + r.err
    assert "db.ready" in r.err


def test_fault_codes_are_documented() -> None:
    from runner.exitcodes import DESCRIPTIONS, ExitCode

    assert DESCRIPTIONS[ExitCode.CONNECTION_LOST][1] is True, "a lost connection is worth a retry"
    assert DESCRIPTIONS[ExitCode.AUTH_FAILED][1] is False, "a new pod reads the same Secret"
    doc = (REPO / "docs/faults.md").read_text()
    for needle in ("| 11, retriable |", "| 12 after `DB_AUTH_TIMEOUT`", "| 143 / 130 |",
                   "INVALID_INDEX_POLICY"):
        assert needle in doc, f"docs/faults.md does not mention {needle}"


# -- a runner whose machine vanishes: no FIN, no RST (issue 23, item 16) ---------------------------

@pytest.mark.every_major
def test_runner_sessions_ask_the_server_for_keepalives(database: Database) -> None:
    """Every runner session sets the server's side of TCP keepalives (and tcp_user_timeout)."""
    import sqlalchemy as sa

    from runner import db as rdb
    from runner import dburl
    from runner.config import Settings
    from runner.context import Run
    from runner.log import EventLog

    run = Run(settings=Settings(database_url=dburl.parse(database.url)), log=EventLog(), command="status")
    run.server_version = int(database.sql("SHOW server_version_num"))
    with rdb.connect(run, "lock", autocommit=True) as conn:
        got = {name: conn.execute(sa.text(f"SHOW {name}")).scalar_one() for name in
               ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count",
                "tcp_user_timeout")}
    assert got == {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "5",
                   "tcp_keepalives_count": "3", "tcp_user_timeout": "20000"}  # ms


def test_pg_dump_sessions_ask_the_server_for_keepalives(database: Database) -> None:
    """pg_dump's sessions hold ACCESS SHARE on every table it dumps: left behind by a vanished
    runner for the kernel's two hours, they would make every later copy's migration exit 8.
    What libpq_env gives pg_dump (psql here, the same libpq) asks for the server's keepalives;
    not tcp_user_timeout, which some kernels apply to a dump stalled by a slow upload."""
    import subprocess

    from runner import dburl, procs
    from runner.config import Settings
    from runner.context import Run
    from runner.log import EventLog

    # the URL's own options (which libpq prefers to PGOPTIONS) are kept, and get them too
    for url, work_mem in ((database.url, "4096"), (database.url + "?options=-c%20work_mem%3D8MB", "8192")):
        run = Run(settings=Settings(database_url=dburl.parse(url)), log=EventLog(), command="backup")
        env, conninfo = procs.libpq_env(run, "backup")
        out = subprocess.run(
            [str(database.cluster.bin / "psql"), "-X", "-At", "--no-password", "-d", conninfo, "-c",
             "SELECT string_agg(name || '=' || setting, ' ' ORDER BY name) FROM pg_settings WHERE "
             "name IN ('tcp_keepalives_idle', 'tcp_keepalives_interval', 'tcp_keepalives_count', "
             "'tcp_user_timeout', 'work_mem')"], env=env, capture_output=True, text=True, timeout=30,
            check=True)
        assert out.stdout.strip() == ("tcp_keepalives_count=3 tcp_keepalives_idle=5 "
                                      f"tcp_keepalives_interval=5 tcp_user_timeout=0 work_mem={work_mem}"), \
            out.stderr


def test_the_start_up_gate_session_asks_for_keepalives_and_keeps_pgoptions(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate's session idles for the whole of its leader's run: without server keepalives a
    vanished leader would hold it for the kernel's two hours, and every later copy exit 4."""
    import psycopg2

    from runner import dburl
    from runner.config import Settings
    from runner.context import Run
    from runner.fastpath.answer import gate_params
    from runner.log import EventLog

    monkeypatch.setenv("PGOPTIONS", "-c search_path=gate_test")
    run = Run(settings=Settings(database_url=dburl.parse(database.url)), log=EventLog(), command="upgrade")
    conn = psycopg2.connect(**gate_params(run))
    try:
        with conn.cursor() as cur:
            got = {}
            for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count",
                         "search_path"):
                cur.execute(f"SHOW {name}")
                got[name] = cur.fetchone()[0]
    finally:
        conn.close()
    assert got == {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "5",
                   "tcp_keepalives_count": "3", "search_path": "gate_test"}


def require_iptables() -> None:
    """Skip (or, with CI=true, fail) when packets cannot be dropped on the loopback interface."""
    import shutil
    import subprocess

    problem = None
    if not shutil.which("iptables"):
        problem = "iptables is not installed (apt-get install iptables; docker.io depends on it)"
    elif os.geteuid() != 0:
        problem = "dropping packets with iptables needs root"
    elif subprocess.run(["iptables", "-w", "-S", "INPUT"], capture_output=True).returncode:
        problem = "iptables cannot list the INPUT chain here"
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true requires iptables for the vanished-runner test: {problem}", pytrace=False)
    pytest.skip(problem)


@contextlib.contextmanager
def dropped(ports: list[int], server_port: int) -> Iterator[None]:
    """Drop every packet between these client ports and the server on the loopback interface, as
    a network partition would: nothing arrives, nothing is refused."""
    import subprocess

    rules = [rule for port in ports for rule in (
        ["-i", "lo", "-p", "tcp", "--sport", str(port), "--dport", str(server_port), "-j", "DROP"],
        ["-i", "lo", "-p", "tcp", "--sport", str(server_port), "--dport", str(port), "-j", "DROP"])]
    added = []
    try:
        for rule in rules:
            subprocess.run(["iptables", "-w", "-I", "INPUT", *rule], check=True)
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run(["iptables", "-w", "-D", "INPUT", *rule], check=False)


def test_vanished_runner_loses_the_lock_within_30s(runner_image: str, database: Database) -> None:
    """A runner in a container holds the migration lock mid-revision; its container is frozen and
    its network cut without a FIN or RST (dropped on lo): the server ends its sessions itself
    (server-side keepalives), so a second runner gets the lock within 30 s, not ~2 hours."""
    from tests.docker_harness import docker, start_container
    from tests.test_image import SLOWPOKE, container_env

    require_iptables()
    db = database
    env = container_env(db, ALEMBIC_CONFIG="/scenario/alembic.ini", SLOWPOKE_SLEEP="600")
    box = start_container(runner_image, ["upgrade"], env, volumes=[f"{SLOWPOKE}:/scenario:ro"])
    try:
        def slow_revision_running() -> bool:
            assert box.proc.poll() is None, box.wait().err
            return sleeping(db)

        wait_for(slow_revision_running, timeout=60, every=0.2, what="the slow revision never started")
        ports = [int(p) for p in db.sql("SELECT client_port FROM pg_stat_activity WHERE "
                                        "application_name LIKE 'migration-runner/%'").split()]
        assert len(ports) >= 2, ports  # the lock's session and the migration's, at least
        with dropped(ports, db.cluster.port):
            docker("pause", box.name)  # the machine is gone: no new connection either
            t0 = time.monotonic()
            second = start_runner(["upgrade"], runner_env(
                db.url, ALEMBIC_CONFIG=str(SLOWPOKE / "alembic.ini"), LOCK_WAIT_TIMEOUT="40s"))
            seen = read_until(second, "lock.acquired")
            took = time.monotonic() - t0
            r = finish(second, timeout=60)
    finally:
        docker("unpause", box.name, check=False)
        box.kill()
    assert took < 30, f"the vanished runner kept the lock for {took:.0f}s"
    assert r.code == 0, seen + r.err
    assert db.version() == "s001"
