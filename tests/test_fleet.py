"""Fleets: many tenant databases or schemas in one run, against real PostgreSQL, S3 and processes.

One scenario per major: ten databases on the newest (with backups to S3), ten schemas on
PostgreSQL 15. In each, one target is locked by someone else, one has a migration that fails and
one cannot be reached (databases) or was never provisioned (schemas): the others migrate, the
fleet exits 14 and its summary names the failed targets with their own exit codes. SIGTERM (or
SIGKILL) stops every worker with each target at a clean revision. The target list, sharding and
the summary's size bound are tested as pure functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg2
import pytest

from runner import report
from runner.config import Settings
from runner.context import Run
from runner.errors import ConfigError
from runner.exitcodes import ExitCode
from runner.fleet import results, shard, targets
from runner.lock.key import lock_key
from runner.log import EventLog
from tests.conftest import REPO, Database, finish, run_runner, runner_env, start_runner, wait_for
from tests.pgcluster import APP_PASSWORD, Cluster, bindir, free_port
from tests.result import Result
from tests.s3_fixtures import S3Server

TENANTS = str(REPO / "tests/scenarios/tenants/alembic.ini")
HEAD = "0005"


# -- helpers --------------------------------------------------------------------------------------
@contextlib.contextmanager
def holding_migration_lock(db: Database, schema: str = "") -> Iterator[None]:
    """Hold the runner's migration lock for db (and schema) as another session would."""
    conn = psycopg2.connect(db.url)
    conn.autocommit = True
    try:
        conn.cursor().execute("SELECT pg_advisory_lock(%s)", (lock_key(db.name, schema, "alembic_version"),))
        yield
    finally:
        conn.close()


def per_target(r: Result) -> dict[str, dict]:
    """The fleet.target events of a JSON-log run, by target (each target exactly once)."""
    events = [json.loads(line) for line in r.lines if '"event": "fleet.target"' in line]
    by_target = {e["target"]: e for e in events}
    assert len(by_target) == len(events), "a target was reported twice"
    return by_target


def status_table(out: str) -> dict[str, tuple[str, str]]:
    """Parse `status`'s fleet table into {target: (revision, state)}."""
    rows = out.strip().splitlines()
    assert rows[0].split() == ["target", "revision", "state"], out
    parsed = {}
    for row in rows[1:]:
        target, revision, state = row.split(None, 2)
        parsed[target] = (revision, state)
    return parsed


def schema_version(db: Database, schema: str) -> str:
    """The revision stamped in schema's own alembic_version ('' when it has none)."""
    if db.sql(f"SELECT to_regclass('{schema}.alembic_version') IS NOT NULL") != "t":
        return ""
    return db.sql(f"SELECT string_agg(version_num, ',') FROM {schema}.alembic_version")


def runner_sessions(db: Database) -> str:
    return db.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'migration-runner/%'")


def advisory_locks(db: Database) -> str:
    return db.sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")


def processes_with(marker: str) -> list[int]:
    """Pids of live processes whose environment carries marker (the fleet, its forkserver, workers)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
    return found


@pytest.fixture
def fleet_dbs(pg: Cluster) -> Iterator[list[Database]]:
    """Nine fresh databases in the shared cluster."""
    stem = f"fleet_{uuid.uuid4().hex[:6]}"
    dbs = [Database(pg, f"{stem}_{i}") for i in range(9)]
    for db in dbs:
        pg.psql(f"CREATE DATABASE {db.name}")
    yield dbs
    for db in dbs:
        pg.psql(f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE)", check=False)


# -- ten databases, with backups -----------------------------------------------------------------
def test_database_fleet_isolates_failures(pg: Cluster, fleet_dbs: list[Database], s3_server: S3Server,
                                          bucket: str, tmp_path: Path) -> None:
    ok, locked, broken = fleet_dbs[:7], fleet_dbs[7], fleet_dbs[8]
    broken.sql("CREATE SCHEMA billing")  # revision 0002 creates it: fails there, rolled back
    gone = f"127.0.0.1:{free_port()}/gone"  # nothing listens: never ready
    listing = tmp_path / "targets"
    listing.write_text("# tenant databases\n" + "\n".join(d.name for d in [*ok, locked]) + "\n\n"
                       f"{broken.url}   # a full URL\n"
                       f"postgresql://app:{quote(APP_PASSWORD, safe='')}@{gone}\n")
    message = tmp_path / "termination-log"
    env = runner_env(None, TARGETS_FILE=str(listing), DATABASE_URL_TEMPLATE=pg.url("{name}"),
                     LOG_FORMAT="json", DB_WAIT_TIMEOUT="2s", LOCK_WAIT_TIMEOUT="2s",
                     BACKUP_MODE="required", BACKUP_S3_URI=f"s3://{bucket}/fleet",
                     PG_DUMP_BIN=str(bindir(pg.major) / "pg_dump"), **s3_server.env())
    with holding_migration_lock(locked):
        r = run_runner(["upgrade", "--parallel", "4"],
                       {**env, "TERMINATION_MESSAGE_PATH": str(message)})
    assert r.code == ExitCode.TARGETS_FAILED, r.err
    broken_name = f"127.0.0.1:{pg.port}/{broken.name}"
    summary = r.summary()
    assert (summary["targets"], summary["outcomes"]) == (10, {"migrated": 7, "failed": 3})
    assert {f["target"]: f["exit_code"] for f in summary["failed"]} == {
        locked.name: ExitCode.LOCK_TIMEOUT, broken_name: ExitCode.MIGRATION_FAILED,
        gone: ExitCode.DB_NOT_READY}
    reasons = {f["target"]: f["error"] for f in summary["failed"]}
    assert "migration lock not acquired" in reasons[locked.name]
    assert "revision 0002 failed" in reasons[broken_name] and "billing" in reasons[broken_name]
    assert "not ready" in reasons[gone]
    terminated = json.loads(message.read_text())
    assert (terminated["failed"], terminated["exit_code"]) == (summary["failed"], 14)
    assert "3 of 10 targets failed" in terminated["error"] and "3 of 10 targets failed" in summary["msg"]
    # one line per target while running; the others migrated, each backed up under its own prefix
    lines = per_target(r)
    assert set(lines) == {*(d.name for d in [*ok, locked]), broken_name, gone}
    keys = s3_server.keys(bucket)
    for db in ok:
        assert db.version() == HEAD and {"public.customers", "billing.invoices"} <= db.tables()
        assert lines[db.name]["exit_code"] == 0 and lines[db.name]["backup"] in keys
        assert lines[db.name]["backup"].startswith(f"fleet/{db.name}/")
    assert broken.version() == "0001", "the failing revision must roll back alone"
    assert locked.version() == "" and locked.tables() == set()
    assert len(keys) == 2 * 8, "a backup and its manifest per target that had work to do"
    wait_for(lambda: [runner_sessions(db) for db in fleet_dbs] == ["0"] * 9 and advisory_locks(locked) == "0",
             what="runner sessions or advisory locks left behind")
    # status over the fleet: one table; the unreachable target is unknown, so the run fails
    st = run_runner(["status"], env)
    assert st.code == ExitCode.TARGETS_FAILED, st.err
    table = status_table(st.out)
    assert {table[d.name] for d in ok} == {(HEAD, "at head")}
    assert table[broken_name] == ("0001", "behind (4 pending)")
    assert table[locked.name] == ("base", "behind (5 pending)")
    assert table[gone][0] == "-" and table[gone][1].startswith("unknown (exit 3: ")


# -- ten schemas in one database ------------------------------------------------------------------
@pytest.mark.pg("15")
def test_schema_fleet_isolates_failures(database: Database) -> None:
    tenants = [f"tenant_{i}" for i in range(10)]
    ok, locked, broken, ghost = tenants[:7], tenants[7], tenants[8], tenants[9]
    database.sql("; ".join(f"CREATE SCHEMA {t}" for t in tenants[:9])
                 + f"; CREATE TABLE {broken}.invoices (x int)")  # t002 creates it: fails there
    env = runner_env(database.url, ALEMBIC_CONFIG=TENANTS, TARGET_SCHEMAS=",".join(tenants),
                     LOG_FORMAT="json", LOCK_WAIT_TIMEOUT="2s")
    with holding_migration_lock(database, schema=locked):
        r = run_runner(["upgrade"], env)
    assert r.code == ExitCode.TARGETS_FAILED, r.err
    summary = r.summary()
    assert summary["outcomes"] == {"migrated": 7, "failed": 3}
    failed = {f["target"]: f for f in summary["failed"]}
    assert {t: f["exit_code"] for t, f in failed.items()} == {
        locked: ExitCode.LOCK_TIMEOUT, broken: ExitCode.MIGRATION_FAILED, ghost: ExitCode.MIGRATION_FAILED}
    assert "revision t002 failed" in failed[broken]["error"]
    assert f'schema "{ghost}" does not exist' in failed[ghost]["error"]
    # each tenant migrated in its own schema, with its own version table (env.py got -x tenant=)
    for t in ok:
        assert schema_version(database, t) == "t003"
        assert {f"{t}.accounts", f"{t}.invoices", f"{t}.alembic_version"} <= database.tables()
    assert schema_version(database, broken) == "t001"
    assert schema_version(database, locked) == "" and f"{locked}.accounts" not in database.tables()
    assert database.sql(f"SELECT count(*) FROM pg_namespace WHERE nspname = '{ghost}'") == "0"
    assert not {t for t in database.tables() if t.startswith("public.")}, "nothing lands in public"
    wait_for(lambda: (runner_sessions(database), advisory_locks(database)) == ("0", "0"),
             what="runner sessions or advisory locks left behind")


@pytest.mark.pg("15")
def test_fail_fast_starts_nothing_after_a_failure(database: Database) -> None:
    tenants = ["never_provisioned", "tenant_a", "tenant_b"]
    database.sql("CREATE SCHEMA tenant_a; CREATE SCHEMA tenant_b")
    r = run_runner(["upgrade", "--fail-fast", "--parallel", "1"],
                   runner_env(database.url, ALEMBIC_CONFIG=TENANTS, TARGET_SCHEMAS=",".join(tenants),
                              LOG_FORMAT="json"))
    assert r.code == ExitCode.TARGETS_FAILED, r.err
    assert r.summary()["outcomes"] == {"failed": 1, "not started": 2}
    assert schema_version(database, "tenant_a") == schema_version(database, "tenant_b") == ""


# -- signals: every target ends at a clean revision ------------------------------------------------
def sleeping(db: Database) -> int:
    return int(db.sql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' "
                      "AND state = 'active'"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_signal_stops_every_worker_at_a_clean_revision(database: Database, sig: int) -> None:
    """SIGTERM: the workers cancel their statements and the fleet exits 143 with its summary.
    SIGKILL of the main process: the workers notice it died and stop the same way."""
    tenants = [f"t{i}" for i in range(6)]
    database.sql("; ".join(f"CREATE SCHEMA {t}" for t in tenants))
    marker = f"fleet-test-{uuid.uuid4().hex}"
    proc = start_runner(["upgrade", "--parallel", "3"], runner_env(
        database.url, ALEMBIC_CONFIG=TENANTS, TARGET_SCHEMAS=",".join(tenants), TENANT_SLEEP="60",
        LOG_FORMAT="json", FLEET_TEST_MARKER=marker))
    try:
        wait_for(lambda: sleeping(database) == 3, what="three tenants never reached revision t002")
        t0 = time.monotonic()
        proc.send_signal(sig)
        r = finish(proc, timeout=30)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    wait_for(lambda: not processes_with(marker), timeout=15, what="fleet processes outlived the run")
    wait_for(lambda: (runner_sessions(database), advisory_locks(database)) == ("0", "0"), timeout=15,
             what="runner sessions or advisory locks left behind")
    versions = [schema_version(database, t) for t in tenants]
    assert sorted(versions) == ["", "", "", "t001", "t001", "t001"], versions
    assert not [t for t in tenants if f"{t}.invoices" in database.tables()], "t002 must roll back"
    if sig == signal.SIGTERM:
        assert r.code == ExitCode.SIGTERM and took < 10, r.err
        assert r.summary()["outcomes"] == {"interrupted": 3, "not started": 3}


# -- a server that stops answering: the deadline still reports every result -----------------------
def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state first, then the parent's pid)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(root: int) -> list[int]:
    """Every live descendant of root: the fleet's forkserver and resource tracker, their workers."""
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError):
            children.setdefault(int(_stat(pid)[1]), []).append(int(pid))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pids: list[int]) -> list[int]:
    """Those of pids that are still running (a zombie has finished)."""
    left = []
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            if _stat(pid)[0] != "Z":
                left.append(pid)
    return left


def test_hung_server_at_the_deadline_keeps_every_result(database: Database, tmp_path: Path) -> None:
    """Two tenants' backends stopped (SIGSTOP) mid-revision when RUN_DEADLINE comes: the fleet
    still exits 9 within 5 s of it, its summary and termination message keep the three results
    that completed, report the two stuck tenants as interrupted (their ledger rows ended) and the
    rest as not started, and no process of the run (workers, forkserver, resource tracker)
    outlives it."""
    done, stuck, later = ["t0", "t1", "t2"], ["t3", "t4"], ["t5", "t6"]
    tenants = done + stuck + later
    database.sql("; ".join(f"CREATE SCHEMA {t}" for t in tenants))
    env = runner_env(database.url, ALEMBIC_CONFIG=TENANTS, LOG_FORMAT="json")
    assert run_runner(["upgrade", "--parallel", "3"], {**env, "TARGET_SCHEMAS": ",".join(done)}).code == 0
    message, deadline = tmp_path / "termination-log", 10  # room to reach t002 on a loaded machine
    t0 = time.monotonic()
    proc = start_runner(["upgrade", "--parallel", "2"], {
        **env, "TARGET_SCHEMAS": ",".join(tenants), "TENANT_SLEEP": "60",
        "RUN_DEADLINE": f"{deadline}s", "TERMINATION_MESSAGE_PATH": str(message)})
    pids: list[int] = []
    try:
        wait_for(lambda: sleeping(database) == 2, what="the two tenants never reached revision t002")
        pids = [int(p) for p in database.sql("SELECT pid FROM pg_stat_activity WHERE query LIKE "
                                             "'SELECT pg_sleep%' AND state = 'active'").split()]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        tree = process_tree(proc.pid)
        assert time.monotonic() - t0 < deadline, "too slow to stop the backends before the deadline"
        assert len(tree) >= 4, tree  # forkserver, resource tracker, two workers
        r = finish(proc, timeout=60)
        took = time.monotonic() - t0
        rows = database.sql(" UNION ALL ".join(
            f"SELECT outcome || ',' || exit_code || ',' || (finished_at IS NOT NULL) FROM {t}.runner_history"
            for t in stuck))
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        proc.kill()
    assert r.code == ExitCode.RUN_DEADLINE, r.err
    assert took < deadline + 5, f"{took:.1f}s: the Job's activeDeadlineSeconds would have ended it"
    assert alive(tree) == [], "a process of the run outlived it"
    summary, written = r.summary(), json.loads(message.read_bytes())
    expected = {"nothing to do": 3, "interrupted": 2, "not started": 2}
    assert summary["outcomes"] == written["outcomes"] == expected, r.err
    assert {f["target"]: f["exit_code"] for f in written["failed"]} == {t: 9 for t in stuck}
    assert rows.split() == ["deadline,9,true"] * 2, "the stuck tenants' ledger rows must be ended"
    assert all(line.startswith("{") for line in r.lines), "a line that is not an event (a warning?)"
    assert sum('"event": "summary"' in line for line in r.lines) == 1
    wait_for(lambda: sleeping(database) == 0, what="the resumed backends kept running their statements")
    assert [schema_version(database, t) for t in tenants] == ["t003"] * 3 + ["t001"] * 2 + [""] * 2


# -- bad input: one line, exit 2, nothing touched --------------------------------------------------
@pytest.mark.parametrize("bad_line,extra,problem", [
    ("two words", {}, "TARGETS_FILE line 2 is malformed"),
    ("SAME_DATABASE_AS_LOCALHOST", {}, "TARGETS_FILE line 2 repeats line 1"),
    ("", {"JOB_COMPLETION_INDEX": "1"}, "JOB_COMPLETION_INDEX is set but JOB_COMPLETIONS is not"),
])
def test_bad_fleet_input_changes_nothing(database: Database, tmp_path: Path, bad_line: str,
                                         extra: dict[str, str], problem: str) -> None:
    """The valid target listed first is not touched: the whole list is checked first."""
    listing = tmp_path / "targets"
    same = database.url.replace("@127.0.0.1:", "@LocalHost:")  # the same database, by another name
    bad_line = bad_line.replace("SAME_DATABASE_AS_LOCALHOST", same)
    listing.write_text(f"{database.name}\n{bad_line}\n{database.url}\n" if bad_line else database.name)
    env = runner_env(None, TARGETS_FILE=str(listing), DATABASE_URL_TEMPLATE=database.cluster.url("{name}"),
                     **extra)
    r = run_runner(["upgrade"], env)
    assert r.code == ExitCode.CONFIG, r.err
    errors = [line for line in r.lines if " ERROR " in line]
    assert len(errors) == 1 and problem in errors[0], r.err
    assert "line 3 repeats line 1" in r.err or not bad_line, "every problem is named at once"
    assert "Traceback" not in r.err and database.tables() == set()


# -- the target list, sharding and the summary, as functions ----------------------------------------
TEMPLATE = "postgresql://app:pw@db.internal:5432/{name}"


def listed(tmp_path: Path, text: str, template: str = TEMPLATE) -> list[targets.Target]:
    path = tmp_path / "targets"
    path.write_text(text)
    return targets.from_file(path, template)


def test_targets_file_names_urls_comments(tmp_path: Path) -> None:
    found = listed(tmp_path, "# fleet\nacme\n\n  globex  # EU\nweird%name/x\n"
                   "postgresql+psycopg2://u:p@other:6432/initech?sslmode=require\n")
    assert [t.name for t in found] == ["acme", "globex", "weird%name/x", "other:6432/initech"]
    assert [t.line for t in found] == [2, 4, 5, 6]
    from runner import dburl

    assert dburl.parse(found[2].url).database == "weird%name/x", "names are percent-encoded"
    assert dburl.parse(found[0].url).render() == "postgresql://app:***@db.internal:5432/acme"
    host = listed(tmp_path, "eu-1\n", "postgresql://app@{name}.db.internal/app")
    assert dburl.parse(host[0].url).host == "eu-1.db.internal"


HOSTILE_NAMES = ["db?host=evil.example&port=5433&sslmode=disable", "a@evil.example:5433/b", "x/../y",
                 "100%25?", "tenant_ü_日本", "db#frag", "a:b", "x&dbname=other", "+plus+"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_name_changes_only_the_database(tmp_path: Path, name: str) -> None:
    """Whatever a name holds, it lands intact in the database name, percent-encoded in the URL,
    and every other part of the URL (server, port, user, password, parameters) stays the
    template's, also once the worker reads the URL again."""
    from runner import dburl

    template = "postgresql://app:pw@db.internal:5432/{name}?sslmode=require"
    (target,) = listed(tmp_path, name, template)
    url = dburl.parse(target.url)
    assert (url.host, url.port, url.username, url.password) == ("db.internal", 5432, "app", "pw")
    assert dict(url.query) == {"sslmode": "require"} and url.database == name


@pytest.mark.parametrize("name", ["evil.example:5433", "x@evil", "a/b", "h?port=1", "ü", "a%2Fb"])
def test_a_name_that_cannot_be_a_host_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=r"TARGETS_FILE line 1: the name .* does not fit"):
        listed(tmp_path, f"{name}\n", "postgresql://app@{name}.db.internal/app")


@pytest.mark.parametrize("name", ["evil.example:5433", "a/b", "h?port=1&host=evil", "ü"])
def test_a_name_in_the_user_changes_only_the_user(tmp_path: Path, name: str) -> None:
    from runner import dburl

    (target,) = listed(tmp_path, f"{name}\n", "postgresql://{name}:pw@db.internal/app")
    url = dburl.parse(target.url)
    assert (url.username, url.password, url.host, url.port, url.database, dict(url.query)) == (
        name, "pw", "db.internal", None, "app", {})


def test_a_template_query_cannot_override_the_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"query sets dbname, which overrides the \{name\} in its database"):
        listed(tmp_path, "acme\n", "postgresql://app@db/{name}?dbname=other")


@pytest.mark.parametrize("first,second", [
    ("postgresql://u@localhost/acme", "postgresql://u@127.0.0.1:5432/acme"),
    ("postgresql://u@127.0.0.1/acme", "postgresql://u@[::1]/acme"),
    ("postgresql://u@127.0.0.2:5432/acme", "postgresql://u@LOCALHOST.:5432/acme"),
    ("postgresql://u@[::ffff:127.0.0.1]/acme", "postgresql://other@localhost/acme"),
    ("postgresql://u@Db.Internal/acme", "postgresql://u@db.internal:5432/acme?sslmode=require"),
    ("postgresql://u@db/acme", "postgresql://u@elsewhere/x?host=db&dbname=acme"),
    ("postgresql://u@h/acme", "postgresql://u@h/acme"),
])
def test_two_lines_for_one_database_are_refused(tmp_path: Path, first: str, second: str) -> None:
    with pytest.raises(ConfigError, match="TARGETS_FILE line 2 repeats line 1"):
        listed(tmp_path, f"{first}\n{second}\n")


@pytest.mark.parametrize("first,second", [
    ("postgresql://u@localhost/acme", "postgresql://u@localhost:5433/acme"),  # two servers
    ("postgresql://u@db/acme", "postgresql://u@db/Acme"),  # database names are case-sensitive
    ("postgresql://u@db-1/acme", "postgresql://u@db-2/acme"),  # names are not resolved (proxies)
])
def test_different_databases_are_kept(tmp_path: Path, first: str, second: str) -> None:
    assert len(listed(tmp_path, f"{first}\n{second}\n")) == 2


def test_an_injected_server_is_never_contacted(database: Database, tmp_path: Path) -> None:
    """`name?host=...&port=...` must not reach another server (today it migrated it, with the
    template's password): the name is looked for as a database of the template's server."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    contacted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                contacted.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    name = f"{database.name}?host=127.0.0.1&port={listener.getsockname()[1]}"
    (tmp_path / "targets").write_text(name + "\n")
    env = runner_env(None, TARGETS_FILE=str(tmp_path / "targets"), LOG_FORMAT="json",
                     DATABASE_URL_TEMPLATE=database.cluster.url("{name}"), DB_AUTH_TIMEOUT="0",
                     DB_WAIT_TIMEOUT="3s")
    try:
        r = run_runner(["status"], env)
    finally:
        stop.set()
    assert r.code == ExitCode.TARGETS_FAILED, r.err
    assert contacted == [], "the runner connected to the server named inside a target name"
    (failed,) = r.summary()["failed"]
    assert failed["exit_code"] == ExitCode.AUTH_FAILED  # looked for on the template's server:
    assert failed["error"].startswith(f"database 127.0.0.1:{database.cluster.port}/{name} refused")
    assert f'database \\"{name}\\" does not exist' in r.err


@pytest.mark.parametrize("text,template,problem", [
    ("acme\nacme\n", TEMPLATE, "line 2 repeats line 1"),
    ("acme\npostgresql://x:y@db.internal/acme\n", TEMPLATE, "line 2 repeats line 1"),
    ("acme corp\n", TEMPLATE, "line 1 is malformed"),
    ("acme\n", "", "line 1 is a name, but DATABASE_URL_TEMPLATE is not set"),
    ("acme\n", "postgresql://app@db/{name}_{region}", "a placeholder other than {name}"),
    ("acme\n", "postgresql://app@db/app", "DATABASE_URL_TEMPLATE has no {name}"),
    ("a/b\n", "postgresql://app@{name}.db/app", "line 1: the name 'a/b' does not fit"),
    ("x" * 64 + "\n", TEMPLATE, "longer than 63 bytes"),
    ("mysql://u:p@h/d\n", TEMPLATE, "TARGETS_FILE line 1 uses 'mysql'"),
    ("# nothing\n\n", TEMPLATE, "lists no targets"),
])
def test_bad_target_lists_are_refused_naming_the_line(tmp_path: Path, text: str, template: str,
                                                      problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        listed(tmp_path, text, template)
    assert problem in str(exc.value)
    assert ":pw@" not in str(exc.value) and "x:y@" not in str(exc.value), "a URL was quoted"


def test_target_schemas_are_checked() -> None:
    url = Settings().database_url.set(database="app")
    assert [t.tenant for t in targets.from_schemas(("a", "b-2"), url)] == ["a", "b-2"]
    for schemas, problem in [(("a", "a"), "item 2 (a) repeats item 1"),
                             (("a", "x;drop"), "item 2 is not a schema name"), ((), "lists no schemas")]:
        with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
            targets.from_schemas(schemas, url)


def test_sharding_is_stable_and_complete() -> None:
    names = [f"tenant-{i}" for i in range(300)]
    owners = {n: shard.owner(n, 4) for n in names}
    assert set(owners.values()) == {0, 1, 2, 3}
    assert min(list(owners.values()).count(i) for i in range(4)) > 50, "roughly balanced"
    mine = [shard.mine(names, names, i, 4) for i in range(4)]
    assert sorted(n for part in mine for n in part) == sorted(names), "each target in exactly one shard"
    more = [f"new-{i}" for i in range(50)] + names
    for i in range(4):
        assert [n for n in shard.mine(more, more, i, 4) if n in owners] == mine[i], "a tenant moved"
    moved = [n for n in names if shard.owner(n, 5) != owners[n]]
    assert all(shard.owner(n, 5) == 4 for n in moved), "a new index only takes, never reshuffles"
    assert 30 < len(moved) < 100


@pytest.mark.parametrize("index,completions,problem", [
    (None, 3, "JOB_COMPLETIONS is set but JOB_COMPLETION_INDEX is not"),
    (3, 3, "JOB_COMPLETION_INDEX=3 is not below JOB_COMPLETIONS=3"),
])
def test_shard_position_is_checked(index: int | None, completions: int, problem: str) -> None:
    settings = dataclasses.replace(Settings(), job_completion_index=index, job_completions=completions)
    with pytest.raises(ConfigError, match=problem):
        shard.position(settings)
    assert shard.position(dataclasses.replace(settings, job_completion_index=1)) == (1, completions)


def test_summary_and_termination_message_stay_bounded() -> None:
    """Kubernetes keeps 4096 bytes of a termination message: 500 failed targets with long names
    and reasons still give whole, valid JSON, with the count of the ones left out."""
    failed = [{"target": f"tenant-{'é' * 40}-{i}", "exit_code": 6, "outcome": "failed",
               "error": "revision 0002 failed and was rolled back: " + "x" * 400} for i in range(500)]
    done = [{"target": f"ok-{i}", "exit_code": 0, "outcome": "migrated"} for i in range(300)]
    run = Run(settings=Settings(), log=EventLog(), command="upgrade")
    run.summary.update(parallel=8, **results.summary(done + failed))
    error = results.failure(done + failed)
    assert error is not None and "500 of 800 targets failed" in error and "and 497 more" in error
    message = json.dumps(report.summary(run, ExitCode.TARGETS_FAILED, error), ensure_ascii=False)
    assert len(message.encode()) <= 4000 < 4096
    data = json.loads(message)
    assert data["outcomes"] == {"migrated": 300, "failed": 500}
    assert 5 < len(data["failed"]) < 500 and data["failed_omitted"] == 500 - len(data["failed"])
