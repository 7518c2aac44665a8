"""upgrade / downgrade / status / plan against real PostgreSQL 15 and 18."""

from __future__ import annotations

import json

from tests.conftest import REPO, Database, run_runner, runner_env

SAMPLE_TABLES = {"public.customers", "public.orders", "billing.invoices", "public.alembic_version",
                 "billing.customer_totals"}


def test_upgrade_from_empty_then_noop(database: Database) -> None:
    env = runner_env(database.url, LOG_FORMAT="json")
    first = run_runner(["upgrade"], env)
    assert first.code == 0, first.err
    assert database.version() == "0005"
    assert SAMPLE_TABLES <= database.tables()
    s = first.summary()
    assert s["applied"] == ["0001", "0002", "0003", "0004", "0005"]
    assert s["from"] == "base" and s["to"] == "0005" and s["exit_code"] == 0
    assert {"wait", "lock", "migrate"} <= set(s["durations_s"])
    # the CONCURRENTLY index exists and is valid; the data migration ran
    assert database.sql("SELECT indisvalid FROM pg_index WHERE indexrelid = "
                        "'ix_orders_customer_created'::regclass") == "t"
    second = run_runner(["upgrade"], env)
    assert second.code == 0
    s2 = second.summary()
    assert s2["outcome"] == "nothing to do" and s2["applied"] == []
    assert "lock" not in s2["durations_s"], "the fast path must not take the lock"


def test_data_migration_backfills(database: Database) -> None:
    env = runner_env(database.url)
    assert run_runner(["upgrade", "--to", "0004"], env).code == 0
    database.sql("INSERT INTO customers (email, name) VALUES ('Ann@Example.COM', 'Ann'), "
                 "('bo@b.org', 'Bo')")
    assert run_runner(["upgrade"], env).code == 0
    assert database.sql("SELECT string_agg(email_domain, ',' ORDER BY id) FROM customers") == \
        "example.com,b.org"


def test_upgrade_to_and_downgrade_round_trip(database: Database) -> None:
    env = runner_env(database.url, LOG_FORMAT="json")
    first = run_runner(["upgrade", "--to", "+2"], env)  # relative from base, as Alembic counts
    assert first.code == 0, first.err
    assert database.version() == "0002" and first.summary()["applied"] == ["0001", "0002"]
    assert "billing.invoices" in database.tables()
    assert run_runner(["upgrade"], env).code == 0
    assert database.version() == "0005"
    r = run_runner(["downgrade", "--to", "-1"], env)
    assert r.code == 0, r.err
    assert database.version() == "0004"
    assert r.summary()["outcome"] == "downgraded" and r.summary()["applied"] == ["0005"]
    assert run_runner(["downgrade", "--to", "0002"], env).code == 0
    assert database.version() == "0002"
    assert "billing.customer_totals" not in database.tables()
    assert database.sql("SELECT to_regclass('ix_orders_customer_created') IS NULL") == "t"
    refused = run_runner(["downgrade", "--to", "base"], env)
    assert refused.code == 2 and "--yes" in refused.err
    assert database.version() == "0002"
    assert run_runner(["downgrade", "--to", "base", "--yes"], env).code == 0
    assert database.version() == ""
    # the runner's own tables outlive the migrations: the ledger (runner_history*) records them,
    # runner_backfills keeps 0005's backfill (runner.owntables)
    assert database.tables() <= {"public.alembic_version", "public.runner_history",
                                 "public.runner_history_revisions", "public.runner_backfills"}
    assert run_runner(["upgrade"], env).code == 0
    assert database.version() == "0005"


def test_status_check(database: Database) -> None:
    env = runner_env(database.url)
    behind = run_runner(["status", "--check"], env)
    assert behind.code == 10
    assert "pending:  0001, 0002, 0003, 0004, 0005" in behind.out
    assert run_runner(["upgrade", "--to", "0003"], env).code == 0
    plain = run_runner(["status"], env)
    assert plain.code == 0 and "current:  0003" in plain.out and "pending:  0004, 0005" in plain.out
    assert run_runner(["upgrade"], env).code == 0
    at_head = run_runner(["status", "--check"], env)
    assert at_head.code == 0 and "pending:  none" in at_head.out


def test_plan_prints_pending_sql_without_changing_anything(database: Database) -> None:
    env = runner_env(database.url)
    assert run_runner(["upgrade", "--to", "0003"], env).code == 0
    r = run_runner(["plan", "--to", "0004"], env)
    assert r.code == 0, r.err
    assert "CREATE VIEW billing.customer_totals" in r.out
    assert "CREATE TABLE customers" not in r.out  # only the pending range
    # 0005's online operation decides its steps from the catalog: no offline SQL for it (exit 7,
    # one line naming the revision; plan --scratch runs it on a throwaway database instead)
    refused = run_runner(["plan"], env)
    assert refused.code == 7 and refused.out == "", refused.err
    failed = [line for line in refused.lines if "ERROR" in line]
    assert len(failed) == 1 and "revision 0005 (migrations/versions/0005_customer_email_domain.py) cannot " \
        "be rendered offline (add_column_online(customers): an online operation" in failed[0], failed
    assert "'plan --scratch'" in failed[0] and "Traceback" not in refused.err
    assert database.version() == "0003"
    assert run_runner(["upgrade"], env).code == 0
    assert "nothing to do" in run_runner(["plan"], env).out


def test_wait_command(database: Database) -> None:
    r = run_runner(["wait"], runner_env(database.url))
    assert r.code == 0 and "db.ready" in r.err
    assert database.tables() == set()


def test_foreign_env_builds_its_own_engine(database: Database) -> None:
    """An env.py that ignores the runner's connection, with a %, @ and : in the password."""
    from tests.pgcluster import APP_PASSWORD

    database.sql(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'; "
                 f"GRANT ALL ON DATABASE {database.name} TO app; "
                 f"ALTER DATABASE {database.name} OWNER TO app")
    url = database.cluster.url(database.name, user="app", password=APP_PASSWORD,
                               driver="postgresql+psycopg2")
    # PGOPTIONS carries the attempt's lock_timeout (the escalating schedule's first: 300ms here)
    env = runner_env(url, ALEMBIC_CONFIG=str(REPO / "tests/scenarios/foreign/alembic.ini"),
                     LOCK_TIMEOUT_START="300ms")
    r = run_runner(["upgrade"], env)
    assert r.code == 0, r.err
    assert database.sql("SELECT string_agg(version_num, ',') FROM meta.foreign_version") == "f002"
    app, lock_timeout = database.sql("SELECT app || ' ' || lock_timeout FROM seen_app").split()
    assert app.startswith("migration-runner/migrate/") and lock_timeout == "300ms"
    again = run_runner(["status", "--check"], env)
    assert again.code == 0 and "current:  f002" in again.out
    assert run_runner(["downgrade", "--to", "f001"], env).code == 0
    assert database.sql("SELECT version_num FROM meta.foreign_version") == "f001"


def test_env_reading_a_bare_postgresql_url_from_the_environment(database: Database) -> None:
    """env.py taking DATABASE_URL itself (the FastAPI templates' way), a bare postgresql://:
    SQLAlchemy 2.1 would load psycopg 3, which the image does not ship (exit 2, `No module named
    'psycopg'`); without psycopg 3 the runner makes it mean psycopg2, as before 2.1."""
    import importlib.util

    assert importlib.util.find_spec("psycopg") is None, "psycopg 3 is installed: nothing to prove"
    assert database.url.startswith("postgresql://")
    env = runner_env(database.url, ALEMBIC_CONFIG=str(REPO / "tests/scenarios/environ_url/alembic.ini"),
                     BACKUP_MODE="off")
    r = run_runner(["upgrade"], env)
    assert r.code == 0, r.err
    assert database.sql("SELECT version_num || ' ' || (SELECT count(*) FROM notes) "
                        "FROM alembic_version") == "e001 0"
    assert run_runner(["downgrade", "--to", "base", "--yes"], env).code == 0
    assert database.sql("SELECT to_regclass('notes') IS NULL") == "t"


def test_an_async_env_py_migrates_and_verifies(database: Database) -> None:
    """The env.py of `alembic init -t async` (an AsyncEngine of its own, asyncpg): upgrade runs
    its online operations over asyncpg's connection; verify hands env.py the scratch database
    with the application's driver (VERIFY_DATABASE_URL says none) and reads its fingerprints and
    locks through asyncpg (one statement per execute, no psycopg2 paramstyle)."""
    from tests.test_verify import report, verify_env

    url = database.cluster.url(database.name, driver="postgresql+asyncpg")
    ini = str(REPO / "tests/scenarios/async_env/alembic.ini")
    env = runner_env(url, ALEMBIC_CONFIG=ini, BACKUP_MODE="off")
    r = run_runner(["upgrade"], env)
    assert r.code == 0, r.err
    assert database.sql("SELECT (SELECT version_num FROM alembic_version) || ' ' || "
                        "count(*) FILTER (WHERE code = upper(name)) FROM items") == "x002 3000"
    v = run_runner(["verify", "--format", "json"],
                   {**verify_env(database.cluster, ALEMBIC_CONFIG=ini), "DATABASE_URL": url})
    assert v.code == 0, v.err
    doc = report(v)
    assert doc["findings"] == [] and doc["summary"]["revisions"] == 2
    assert doc["online_operations"]["x002"] == ["create_index_online(ix_items_name, items)",
                                                "add_column_online(items)"]


def test_old_cookbook_env_gets_the_runners_connection(database: Database) -> None:
    """env.py from Alembic's older cookbook: `config.attributes.get("connection") or
    engine_from_config(...)`, then `with connectable.connect() as connection:`."""
    env = runner_env(database.url, ALEMBIC_CONFIG=str(REPO / "tests/scenarios/cookbook/alembic.ini"),
                     MIGRATION_LOCK_TIMEOUT="3s", LOCK_TIMEOUT_SCHEDULE="fixed")
    r = run_runner(["upgrade"], env)
    assert r.code == 0, r.err
    assert database.version() == "c001"
    app, lock_timeout = database.sql("SELECT app || ' ' || lock_timeout FROM cookbook_seen").split()
    assert app.startswith("migration-runner/migrate/") and lock_timeout == "3s"
    again = run_runner(["status", "--check"], env)
    assert again.code == 0 and "current:  c001" in again.out


def test_models_match_database_alembic_check(database: Database, tmp_path) -> None:
    """`alembic check` (models vs database) finds nothing to generate after upgrade head."""
    import subprocess
    import sys
    from pathlib import Path

    assert run_runner(["upgrade"], runner_env(database.url)).code == 0
    ini = tmp_path / "alembic.ini"
    url = database.url.replace("postgresql://", "postgresql+psycopg2://").replace("%", "%%")
    ini.write_text((REPO / "alembic.ini").read_text().replace("%(here)s", str(REPO)).replace(
        "[alembic]\n", f"[alembic]\nsqlalchemy.url = {url}\n", 1))
    alembic = str(Path(sys.executable).with_name("alembic"))
    out = subprocess.run([alembic, "-c", str(ini), "check"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No new upgrade operations detected" in out.stdout + out.stderr


def test_termination_message_has_json_summary(database: Database, tmp_path) -> None:
    path = tmp_path / "termination-log"
    env = runner_env(database.url, TERMINATION_MESSAGE_PATH=str(path))
    r = run_runner(["upgrade", "--to", "0002"], env)
    assert r.code == 0
    msg = json.loads(path.read_text())
    assert msg["command"] == "upgrade" and msg["exit_code"] == 0 and msg["to"] == "0002"
    assert msg["applied"] == ["0001", "0002"]
    failed = run_runner(["upgrade", "--to", "zzz"], env)
    assert failed.code == 7
    msg = json.loads(path.read_text())
    assert msg["exit_code"] == 7 and "zzz" in msg["error"]


def test_any_postgresql_driver_url_is_accepted(database: Database) -> None:
    """The app may use asyncpg or psycopg 3; the runner's own connections use psycopg2."""
    for driver in ("postgresql+asyncpg", "postgresql+psycopg", "postgres"):
        url = database.cluster.url(database.name, driver=driver)
        r = run_runner(["status"], runner_env(url))
        assert r.code == 0, f"{driver}: {r.err}"
    url = database.cluster.url(database.name, driver="postgresql+asyncpg")
    assert run_runner(["upgrade"], runner_env(url)).code == 0
    assert database.version() == "0005"
