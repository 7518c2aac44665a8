"""SQLite for local development (issue 20, docs/sqlite.md): the same chain on `sqlite:///path.db`.

Real files, real runner processes, the real S3 server (moto) on loopback; no PostgreSQL except
where the reverse of a refusal needs one.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from runner import cli, dburl
from runner.backup.manifest import check_target_format
from runner.errors import ConfigError
from runner.verify import sqlite_fingerprint
from tests.conftest import REPO, Database, finish, run_runner, runner_env, start_runner, wait_for
from tests.result import Result
from tests.s3_fixtures import S3Server

SCENARIO = REPO / "tests/scenarios/sqlite/alembic.ini"


def env_for(path: Path, **extra: str) -> dict[str, str]:
    return runner_env(f"sqlite:///{path}", **extra)


def rows(path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


def tables(path: Path) -> set[str]:
    return {r[0] for r in rows(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}


def schema(path: Path) -> dict[str, dict[str, str]]:
    """The fingerprint verify compares (the version table and the runner's own tables left out)."""
    engine = sa.create_engine(f"sqlite:///{path}", poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        return sqlite_fingerprint.read(conn, [(None, t) for t in (
            "alembic_version", "runner_history", "runner_history_revisions", "runner_backfills")])


def error_line(result: Result) -> str:
    lines = [line for line in result.lines if "ERROR" in line or '"level": "error"' in line]
    assert len(lines) == 1 and "Traceback" not in result.err, result.err
    return lines[0]


# -- the URL --------------------------------------------------------------------------------------
def test_url_forms_are_sqlalchemys_and_odd_ones_are_refused() -> None:
    for text, path in (("sqlite:///app.db", "app.db"), ("sqlite:////var/lib/app.db", "/var/lib/app.db"),
                       ("sqlite+pysqlite:///dir/a%20b.db", "dir/a b.db")):
        url = dburl.parse(text)
        assert (url.is_sqlite, url.database, url.safe_target) == (True, path, path)
        assert url.database == make_url(text).database  # SQLAlchemy reads the same file
        assert dburl.parse(url.render()).database == path
    assert dburl.parse("sqlite:////srv/data/app.db").name == "app.db"
    for text, needle in (("sqlite://", "in-memory"), ("sqlite:///:memory:", "in-memory"),
                         ("sqlite:///file:app.db?mode=ro&uri=true", "in-memory or URI-form"),
                         ("sqlite:///app.db?timeout=5", "query string"),
                         ("sqlite://host/app.db", "user or host"),
                         ("sqlite+libsql:///app.db", "sqlite+libsql")):
        with pytest.raises(dburl.UrlError, match="DATABASE_URL") as caught:
            dburl.parse(text)
        assert needle in str(caught.value), text


# -- what cannot work on SQLite: exit 2, one line, nothing touched --------------------------------
@pytest.fixture
def no_signal_watcher() -> Iterator[None]:
    """cli.main blocks SIGTERM/SIGINT once the settings are good: in-process it must never get there."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before, "a case got past the settings"


def test_what_cannot_work_on_sqlite_is_refused(tmp_path: Path, capsys, no_signal_watcher) -> None:
    db = tmp_path / "app.db"
    cases = [
        (["upgrade"], {"TARGET_SCHEMAS": "a,b"}, "fleets of databases or schemas are PostgreSQL-only"),
        (["upgrade"], {"DATABASE_URL": "", "TARGETS_FILE": str(tmp_path / "t"),
                       "DATABASE_URL_TEMPLATE": "sqlite:///{name}.db"},
         "fleets of databases are PostgreSQL-only"),
        (["upgrade"], {"BACKUP_MODE": "restore-point", "BACKUP_S3_URI": "s3://bucket/x"},
         "BACKUP_MODE=restore-point needs PostgreSQL's WAL archive"),
        (["upgrade"], {"BACKUP_MODE": "both", "BACKUP_S3_URI": "s3://bucket/x"}, "BACKUP_MODE=both"),
        (["verify"], {"VERIFY_DATABASE_URL": f"sqlite:///{tmp_path}/v.db"}, "verify needs none for SQLite"),
        (["verify"], {"VERIFY_TEMPLATE": "tpl"}, "VERIFY_TEMPLATE is for a PostgreSQL verify server"),
        (["plan", "--scratch"], {"VERIFY_EXTENSIONS": "postgis"}, "VERIFY_EXTENSIONS"),
        (["upgrade"], {"BACKUP_MODE": "required"}, "BACKUP_S3_URI is not set: set it to s3://BUCKET/PREFIX, "
         "or BACKUP_MODE=off"),
    ]
    for argv, extra, needle in cases:
        code = cli.main(argv, env_for(db, **extra))
        err = capsys.readouterr().err
        assert code == 2, f"{argv} {extra}: exit {code}\n{err}"
        assert needle in error_line(Result(code, "", err)), err
        assert not db.exists() and not (tmp_path / "app.db-migration-lock").exists()


def test_what_cannot_work_on_sqlite_is_refused_before_connecting(tmp_path: Path) -> None:
    db, targets = tmp_path / "app.db", tmp_path / "targets"
    targets.write_text(f"sqlite:///{db}\n")
    r = run_runner(["status"], env_for(db, DATABASE_URL="", TARGETS_FILE=str(targets)))
    assert r.code == 2 and "TARGETS_FILE line 1 is a SQLite file" in error_line(r)
    r = run_runner(["restore", "--backup", "app/app.db/20260101T000000Z-1a2b3c4d.restorepoint", "--yes"],
                   env_for(db, BACKUP_S3_URI="s3://bucket/x"))
    assert r.code == 2 and "a SQLite database has none" in error_line(r)
    assert not db.exists()


def test_a_backup_restores_into_its_own_kind_of_database_only() -> None:
    sqlite_backup = {"key": "p/app.db/1-a.sqlite.zst", "format": "sqlite"}
    dump = {"key": "p/app/1-a.pgdump.zst", "format": "custom"}
    check_target_format(sqlite_backup, True)
    check_target_format(dump, False)
    with pytest.raises(ConfigError, match=r"SQLite database file \(format sqlite\) and the target is a "
                       "PostgreSQL database"):
        check_target_format(sqlite_backup, False)
    with pytest.raises(ConfigError, match=r"PostgreSQL dump \(format custom, pg_dump\) and the target is "
                       "a SQLite file"):
        check_target_format(dump, True)


# -- wait: the directory, the file, who creates it --------------------------------------------------
def test_wait_rules(tmp_path: Path) -> None:
    missing_dir = tmp_path / "not-mounted" / "app.db"
    r = run_runner(["upgrade"], env_for(missing_dir, DB_WAIT_TIMEOUT="1s"))
    assert r.code == 3 and "does not exist (SQLite keeps its journal next to the file)" in error_line(r)
    assert not missing_dir.parent.exists()

    db = tmp_path / "app.db"
    for command in (["status"], ["downgrade", "--to", "base", "--yes"]):
        t0 = time.monotonic()
        r = run_runner(command, env_for(db, BACKUP_S3_URI="s3://bucket/x"))
        assert r.code == 12 and "'upgrade' creates it" in error_line(r), r.err
        assert time.monotonic() - t0 < 10 and not db.exists(), command
    r = run_runner(["wait"], env_for(db, DB_WAIT_TIMEOUT="1s"))
    assert r.code == 3 and "does not exist yet ('upgrade' creates it)" in error_line(r)
    assert not db.exists()

    db.write_text("this is not a database, but it is long enough to have a header" * 10)
    r = run_runner(["status"], env_for(db))
    assert r.code == 2 and "is not a SQLite database" in error_line(r)


# -- the commands on the sample chain --------------------------------------------------------------
def test_sample_chain_upgrade_status_history_plan_downgrade(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    env = env_for(db)
    up = run_runner(["upgrade", "--to", "0003"], env)
    assert up.code == 0, up.err
    assert {"customers", "orders", "invoices", "alembic_version", "runner_history",
            "runner_history_revisions"} <= tables(db)
    with sqlite3.connect(db) as conn:  # the application can insert: the ids are numbered
        conn.execute("INSERT INTO customers (email, name) VALUES ('Ann@Example.ORG', 'Ann')")
    plan = run_runner(["plan", "--to", "0004"], env)  # 0005's backfill reads the table: --scratch only
    assert plan.code == 0 and "CREATE VIEW customer_totals" in plan.out and "0003 -> 0004" in plan.out
    assert run_runner(["upgrade"], env).code == 0
    assert rows(db, "SELECT email_domain FROM customers") == [("example.org",)]  # the data migration
    assert rows(db, "SELECT * FROM customer_totals") == [(1, "Ann@Example.ORG", 0, 0)]
    status = run_runner(["status", "--check"], env)
    assert status.code == 0 and "current:  0005" in status.out and "last run:" in status.out
    down = run_runner(["downgrade", "--to", "0002"], env)
    assert down.code == 0, down.err
    assert "customer_totals" not in {r[0] for r in rows(db, "SELECT name FROM sqlite_master")}
    history = run_runner(["history", "--format", "json"], env)
    runs = json.loads(history.out)
    assert [(h["command"], h["from"], h["to"], h["outcome"]) for h in runs] == [
        ("downgrade", "0005", "0002", "downgraded"), ("upgrade", "0003", "0005", "migrated"),
        ("upgrade", "base", "0003", "migrated")]
    assert rows(db, "SELECT revision, kind FROM runner_history_revisions ORDER BY 1") == [
        ("0001", "applied"), ("0002", "applied")]


# -- a revision is one transaction, DDL included ---------------------------------------------------
def test_sigterm_interrupts_a_running_statement(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    env = env_for(db, ALEMBIC_CONFIG=str(SCENARIO))
    assert run_runner(["upgrade", "--to", "s002"], env).code == 0
    proc = start_runner(["upgrade"], {**env, "SQLITE_TEST": "slow"})  # s003 never ends by itself
    assert proc.stderr is not None
    seen = ""
    while "upgrading s003" not in seen:
        line = proc.stderr.readline()
        assert line, "the runner ended before s003"
        seen += line
    wait_for(lambda: _running_s003(db), timeout=30, what="s003 did not take the write lock")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    r = finish(proc, timeout=30)
    assert r.code == 143 and time.monotonic() - t0 < 5, seen + r.err
    assert "interrupted" in r.err
    assert rows(db, "SELECT version_num FROM alembic_version") == [("s002",)]


def _running_s003(db: Path) -> bool:
    """s003 holds the write lock while its endless statement runs: a write attempt times out."""
    try:
        with sqlite3.connect(db, timeout=0.05) as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True


def test_online_operations_a_failed_revision_and_an_edited_one(tmp_path: Path) -> None:
    own = tmp_path / "chain"
    (own / "versions").mkdir(parents=True)
    for source in [SCENARIO.parent / "alembic.ini", SCENARIO.parent / "env.py",
                   *(SCENARIO.parent / "versions").glob("*.py")]:
        (own / source.relative_to(SCENARIO.parent)).write_text(source.read_text())
    db = tmp_path / "app.db"
    env = env_for(db, ALEMBIC_CONFIG=str(own / "alembic.ini"), ONLINE_BACKFILL_BATCH_SIZE="2")
    assert run_runner(["upgrade", "--to", "s001"], env).code == 0
    before = schema(db)
    # s002: the online operations; s003 creates a table, then fails: its DDL rolls back with it
    r = run_runner(["upgrade"], {**env, "SQLITE_TEST": "fail"})
    assert r.code == 6 and "revision s003 failed and was rolled back: no such function" in error_line(r)
    assert "half_done" not in tables(db)
    assert rows(db, "SELECT version_num FROM alembic_version") == [("s002",)]
    assert rows(db, "SELECT rev FROM audit ORDER BY rev") == [("s001",), ("s002",)]
    assert rows(db, "SELECT name, code FROM items ORDER BY id") == [("apple", "APPLE"), ("pear", "PEAR"),
                                                                 ("plum", "PLUM")]
    assert rows(db, "SELECT state, rows_done, rows_updated FROM runner_backfills") == [("done", 3, 3)]
    items = rows(db, "SELECT sql FROM sqlite_master WHERE tbl_name = 'items' ORDER BY name")
    assert "CREATE INDEX ix_items_name ON items (name)" in [s for (s,) in items]
    assert "CONSTRAINT ck_items_qty CHECK (qty >= 0)" in items[0][0] and "name TEXT NOT NULL" in items[0][0]
    with pytest.raises(sqlite3.IntegrityError), sqlite3.connect(db) as conn:  # the check holds
        conn.execute("INSERT INTO items (name, qty) VALUES ('fig', -1)")
    status = run_runner(["status"], env)
    assert "items.code: add_column_online: done, 3 of ~3 rows, revision s002" in status.out, status.err
    r = run_runner(["upgrade"], {**env, "SQLITE_TEST": "expand"})
    assert r.code == 6 and "rename_column_expand: expand/contract" in error_line(r)
    assert run_runner(["downgrade", "--to", "s001"], env).code == 0
    assert schema(db) == before  # every online operation undone
    script = own / "versions/s001_tables.py"  # checksums: an applied revision edited
    script.write_text(script.read_text().replace("('plum', 0)", "('plum', 3)"))
    r = run_runner(["upgrade"], env)
    assert r.code == 7 and "revision s001 was edited after it was applied" in error_line(r)
    assert run_runner(["repair", "s001"], env).code == 0
    assert rows(db, "SELECT kind FROM runner_history_revisions WHERE revision = 's001'") == [("repaired",)]
    with sqlite3.connect(db) as conn:  # a ledger damaged by hand: repair rebuilds its table
        conn.execute("ALTER TABLE runner_history_revisions DROP COLUMN checksum")
    assert run_runner(["repair"], env).code == 0
    assert rows(db, "SELECT revision, length(checksum) FROM runner_history_revisions") == [("s001", 64)]


# -- the lock --------------------------------------------------------------------------------------
def test_ten_runners_on_one_file_apply_each_revision_once(tmp_path: Path) -> None:
    db = tmp_path / "app.db"  # missing: every runner may create it, one migrates it
    env = env_for(db, ALEMBIC_CONFIG=str(SCENARIO), RACE_SLEEP="0.4", LOG_FORMAT="json")
    procs = [start_runner(["upgrade"], env) for _ in range(10)]
    results = [finish(p, timeout=180) for p in procs]
    assert [r.code for r in results] == [0] * 10, [r.err for r in results if r.code]
    assert sorted(rows(db, "SELECT rev, count(*), count(DISTINCT pid) FROM audit GROUP BY rev")) == [
        ("s001", 1, 1), ("s002", 1, 1), ("s003", 1, 1)]
    applied = [step["revision"] for (steps,) in rows(db, "SELECT steps FROM runner_history")
               for step in json.loads(steps) if step["outcome"] == "applied"]
    assert sorted(applied) == ["s001", "s002", "s003"]
    outcomes = sorted(r.summary()["outcome"] for r in results)
    assert outcomes.count("migrated") >= 1 and set(outcomes) <= {"migrated", "nothing to do"}


def test_the_lock_is_the_kernels_and_dies_with_its_holder(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    env = env_for(db, ALEMBIC_CONFIG=str(SCENARIO))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, sys, time\n"
        f"fd = os.open({str(db) + '-migration-lock'!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'elsewhere', 'run_id': 'r1', "
        "'command': 'upgrade', 'since': 'then'}).encode())\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        r = run_runner(["upgrade"], {**env, "LOCK_WAIT_TIMEOUT": "1s"})
        assert r.code == 4, r.err
        assert f"held by pid {holder.pid} on elsewhere (upgrade, run r1)" in error_line(r)
        assert rows(db, "SELECT count(*) FROM sqlite_master WHERE name = 'items'") == [(0,)]
    finally:
        holder.kill()  # SIGKILL: no chance to unlock; the kernel releases the flock
        holder.wait()
    assert run_runner(["upgrade"], env).code == 0


# -- backup and restore through S3 -----------------------------------------------------------------
def test_backup_before_migrating_listed_restored_and_checked(tmp_path: Path, s3_server: S3Server,
                                                            bucket: str) -> None:
    db = tmp_path / "app.db"
    env = env_for(db, ALEMBIC_CONFIG=str(SCENARIO), BACKUP_MODE="required",
                  BACKUP_S3_URI=f"s3://{bucket}/dev", **s3_server.env())
    assert run_runner(["upgrade", "--to", "s001"], {**env, "BACKUP_MODE": "off"}).code == 0
    up = run_runner(["upgrade", "--to", "s002"], {**env, "LOG_FORMAT": "json"})
    assert up.code == 0, up.err
    key = up.summary()["backup"]
    assert key.startswith("dev/app.db/") and key.endswith(".sqlite.zst")
    stored, manifest = (s3_server.client.get_object(Bucket=bucket, Key=k)["Body"].read()
                        for k in (key, key + ".manifest.json"))
    manifest = json.loads(manifest)
    assert (manifest["format"], manifest["alembic_revision"], manifest["size"], manifest["sha256"]) == (
        "sqlite", ["s001"], len(stored), hashlib.sha256(stored).hexdigest())
    listed = run_runner(["backups"], env)
    assert listed.code == 0 and key in listed.out

    gz = run_runner(["backup"], {**env, "BACKUP_COMPRESSION": "gzip", "LOG_FORMAT": "json"})
    assert gz.code == 0 and gz.summary()["backup"].endswith(".sqlite.gz")
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM items")
    r = run_runner(["restore", "--backup", gz.summary()["backup"], "--yes"], env)
    assert r.code == 0, r.err
    assert rows(db, "SELECT count(*) FROM items") == [(3,)]
    assert rows(db, "SELECT version_num FROM alembic_version") == [("s002",)]
    r = run_runner(["restore", "--backup", key, "--yes"], env)  # the one taken before s002
    assert r.code == 0 and rows(db, "SELECT version_num FROM alembic_version") == [("s001",)]
    commands = [c for (c,) in rows(db, "SELECT command FROM runner_history ORDER BY started_at")]
    assert commands.count("restore") == 2 and commands.count("upgrade") == 2  # kept across restores

    body = bytearray(s3_server.client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[-100] ^= 0xFF  # same size, other bytes
    s3_server.client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM items")
    r = run_runner(["restore", "--backup", key, "--yes"], env)
    assert r.code == 5 and "does not match its manifest" in error_line(r)
    assert rows(db, "SELECT count(*) FROM items") == [(0,)]  # the file was not touched

    dump_key = key.rsplit("/", 1)[0] + "/20260101T000000Z-0badf00d.pgdump.zst"  # a pg_dump's manifest
    fake = {"manifest_version": 1, "key": dump_key, "bucket": bucket, "database": "app.db",
            "created": "2026-01-01T00:00:00+00:00", "alembic_revision": ["s001"], "server_version": "18.1",
            "size": 0, "sha256": "0" * 64, "format": "custom", "compression": "zstd",
            "pg_dump_version": "pg_dump (PostgreSQL) 18.1"}
    s3_server.client.put_object(Bucket=bucket, Key=dump_key + ".manifest.json", Body=json.dumps(fake))
    r = run_runner(["restore", "--backup", dump_key, "--yes"], env)
    assert r.code == 2 and "is a PostgreSQL dump (format custom, pg_dump) and the target is a SQLite " \
        "file" in error_line(r)
    assert rows(db, "SELECT count(*) FROM items") == [(0,)]


def test_a_sqlite_backup_is_refused_by_postgresql(tmp_path: Path, s3_server: S3Server, bucket: str,
                                                  database: Database) -> None:
    db = tmp_path / database.name  # a file named like the database: its backups share the folder
    sqlite3.connect(db).close()
    sqlite_env = env_for(db, ALEMBIC_CONFIG=str(SCENARIO), BACKUP_S3_URI=f"s3://{bucket}/p",
                         LOG_FORMAT="json", **s3_server.env())
    key = run_runner(["backup"], sqlite_env).summary()["backup"]
    pg_env = runner_env(database.url, BACKUP_S3_URI=f"s3://{bucket}/p", **s3_server.env())
    r = run_runner(["restore", "--backup", key, "--yes"], pg_env)
    assert r.code == 2 and "is a SQLite database file (format sqlite) and the target is a PostgreSQL " \
        "database" in error_line(r)
    assert database.tables() <= {"public.runner_history", "public.runner_history_revisions"}


# -- verify and plan --scratch ---------------------------------------------------------------------
def test_verify_and_plan_scratch_on_a_temporary_file(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    env = env_for(db)
    r = run_runner(["verify"], env)
    assert r.code == 0, r.out + r.err
    assert "5 revision(s) round-tripped; lint off; models match" in r.out
    assert "lint (Squawk) and the lock observation are PostgreSQL's: off on SQLite" in r.err
    assert not db.exists()  # the scratch is a temporary file, never DATABASE_URL's
    assert run_runner(["upgrade", "--to", "0003"], env).code == 0
    plan = run_runner(["plan", "--scratch"], env)
    assert plan.code == 0 and "-- Running upgrade 0004 -> 0005" in plan.out
    assert "ALTER TABLE customers ADD COLUMN email_domain TEXT;" in plan.out and "\nBEGIN;" not in plan.out
    assert "-- op.add_column_online(customers): an online operation" in plan.out
    with sqlite3.connect(db) as conn:  # drift: an index added by hand
        conn.execute("CREATE INDEX ix_by_hand ON customers (name)")
    r = run_runner(["verify", "--against"], env)
    assert r.code == 13 and "+ index main.ix_by_hand (INDEX ON customers (name))" in r.out, r.out


def test_verify_finds_a_downgrade_that_does_not_undo_its_upgrade(tmp_path: Path) -> None:
    own = tmp_path / "chain"
    (own / "versions").mkdir(parents=True)
    for name in ("alembic.ini", "env.py", "versions/s001_tables.py"):
        (own / name).write_text((SCENARIO.parent / name).read_text())
    (own / "versions/s002_leaky.py").write_text(
        'revision = "s002"\ndown_revision = "s001"\nfrom alembic import op\n\n\n'
        'def upgrade():\n    op.execute("CREATE INDEX ix_qty ON items (qty)")\n\n\n'
        'def downgrade():\n    pass\n')
    r = run_runner(["verify"], env_for(tmp_path / "app.db", ALEMBIC_CONFIG=str(own / "alembic.ini")))
    assert r.code == 13
    assert "the downgrade does not undo the upgrade: + index main.ix_qty (INDEX ON items (qty))" in r.out
