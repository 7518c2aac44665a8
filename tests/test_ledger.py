"""The ledger: a row per run that changed something or failed, checksums of applied revisions,
`history`, `stamp`, `repair`, and a ledger that never fails a good migration.

Real PostgreSQL (the newest major; two tests on 15 so the DDL and queries run on the oldest
supported major too), real runner processes, a real S3 server for the restore.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from runner.ledger import checksum
from tests.conftest import (
    REPO,
    SECRETS,
    Database,
    finish,
    run_runner,
    runner_env,
    start_runner,
    wait_for,
)
from tests.pgcluster import APP_PASSWORD, PASSWORD, bindir
from tests.s3_fixtures import S3Server

LAB = str(REPO / "tests/scenarios/lab/alembic.ini")
FOREIGN = str(REPO / "tests/scenarios/foreign/alembic.ini")
WHO = dict(RUNNER_IMAGE_VERSION="2.4.1", RUNNER_IMAGE_REVISION="0123456789abcdef0123",
           POD_NAME="migrate-abc12", JOB_NAME="migrate")


def runs(db: Database, where: str = "public.runner_history") -> list[dict]:
    """The ledger's rows, oldest first."""
    out = db.sql(f"SELECT coalesce(json_agg(r ORDER BY r.started_at), '[]') FROM {where} r")
    return json.loads(out)


def sums(db: Database, where: str = "public.runner_history_revisions") -> dict[str, tuple[str, str]]:
    """{revision: (kind, checksum)} from the revisions table."""
    lines = db.sql(f"SELECT revision || ' ' || kind || ' ' || checksum FROM {where} ORDER BY 1")
    return {rev: (kind, digest) for rev, kind, digest in (ln.split() for ln in lines.splitlines())}


def assert_no_secret_in_ledger(db: Database, schema: str = "public", table: str = "runner_history") -> None:
    text = db.sql(f"SELECT (SELECT coalesce(json_agg(r)::text, '') FROM {schema}.{table} r) || "
                  f"(SELECT coalesce(json_agg(c)::text, '') FROM {schema}.{table}_revisions c)")
    assert text, "the ledger is empty"
    for secret in SECRETS:
        assert secret not in text, "a password reached the ledger"


def ledger_tables(db: Database) -> set[str]:
    return {t for t in db.tables() if ".runner_history" in t}


def sleeping(db: Database) -> bool:
    return db.sql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' "
                  "AND state = 'active'") != "0"


# -- checksums ------------------------------------------------------------------------------------
REVISION = '''\
"""Create {table}.

Revision ID: {rev}
"""
from alembic import op

revision = "{rev}"
down_revision = {down!r}


def upgrade() -> None:
    op.execute("CREATE TABLE {table} (id int PRIMARY KEY, name text)")


def downgrade() -> None:
    op.execute("DROP TABLE {table}")
'''

# what black / ruff format, an editor and a reviewer's comment do to the same revision
REFORMATTED = '''\
# -*- coding: utf-8 -*-
"""A docstring rewritten after the revision ran."""
from alembic import op  # the only import

revision = 'r1'
down_revision = None

def upgrade(
) -> None:
    # reformatted by hand
    op.execute(
        'CREATE TABLE t1 (id int PRIMARY KEY, name text)',
    )


def downgrade() -> None:
    """Docstrings are not code."""
    op.execute(("DROP TABLE t1"))
'''


def test_checksum_covers_the_code_not_its_formatting() -> None:
    original = REVISION.format(rev="r1", down=None, table="t1")
    base = checksum.of_source(original)
    assert len(base) == 64
    same = [REFORMATTED, REFORMATTED.replace("\n", "\r\n"), original.replace("\n", "\r"),
            original.encode("utf-8-sig"), original.replace("    ", "\t")]
    assert [checksum.of_source(s) for s in same] == [base] * len(same)
    edits = [original.replace("int PRIMARY KEY", "bigint PRIMARY KEY"),
             original.replace("DROP TABLE t1", "DROP TABLE IF EXISTS t1"),
             original.replace('down_revision = None', 'down_revision = "r0"'),
             original + "\nimport os\n",
             original.replace("def downgrade() -> None:", "def downgrade() -> int:")]
    assert len({checksum.of_source(s) for s in edits} | {base}) == len(edits) + 1
    # f-strings: literal parts are joined, so the split a parser version chooses does not matter
    assert checksum.of_source('x = f"a" f"b{y}" "c"') == checksum.of_source('x = f"ab{y}c"')
    assert checksum.of_source('x = f"a{y}"') != checksum.of_source('x = f"b{y}"')


# every construct a revision may use; its checksum is pinned: changing the canonical form would
# make every checksum recorded in the field look edited
SAMPLE = '''\
"""Docstring."""
import os
from alembic import op as alembic_op


@staticmethod
def upgrade(*args, key: int = 1_000, **kw) -> None:
    async def inner(x):
        async with x as y:
            return [z async for z in y if (w := z) > 0.5]
    name = f"{os.sep!r:>{key}} and {kw['a']=}" "tail" if args else {1: -1j, ...: (1,)}
    match args:
        case [1, *rest] | {"k": _}:
            alembic_op.execute(lambda v=None: v ** 2 // 3 @ 4)
    try:
        del kw[::2]
    except* (ValueError, TypeError) as exc:
        raise RuntimeError(exc) from None
    finally:
        global G
    with open(name) as f, open(name):
        assert f, (yield from f)


class Meta(type, metaclass=type):
    x: "int" = 0
'''
SAMPLE_CHECKSUM = "d290ac725fe4b3bfe56f400f5b003cf4f66a07547f9234c9cc7107c5f5da83c8"


def test_checksum_is_the_same_on_every_python() -> None:
    """Images run Python 3.13, tests 3.11: the same file must give the same checksum on both."""
    assert checksum.of_source(SAMPLE) == SAMPLE_CHECKSUM
    pythons = {str(p) for p in Path.home().glob(".pyenv/versions/3.1[0-9]*/bin/python3")}
    pythons |= {p for v in range(12, 16) if (p := shutil.which(f"python3.{v}")) and ".pyenv" not in p}
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('c', sys.argv[1]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.of_source(sys.argv[2]))")
    for python in sorted(pythons):
        out = subprocess.run([python, "-c", code, checksum.__file__, SAMPLE], capture_output=True,
                             text=True, timeout=30)
        if "SyntaxError" in out.stderr:  # an interpreter older than the sample's syntax
            continue
        assert out.stdout.strip() == SAMPLE_CHECKSUM, f"{python}: {out.stdout}{out.stderr}"


def scenario(root: Path, revs: list[str]) -> Path:
    """An Alembic environment of its own (so the test can edit applied revisions)."""
    (root / "versions").mkdir(parents=True)
    (root / "alembic.ini").write_text("[alembic]\nscript_location = %(here)s\n")
    (root / "env.py").write_text(textwrap.dedent('''\
        from alembic import context

        connection = context.config.attributes["connection"]
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
    '''))
    for i, rev in enumerate(revs):
        write_revision(root, rev, revs[i - 1] if i else None)
    return root


def write_revision(root: Path, rev: str, down: str | None, body: str | None = None) -> Path:
    path = root / "versions" / f"{rev}.py"
    path.write_text(body or REVISION.format(rev=rev, down=down, table=f"t_{rev}"))
    return path


def test_edited_revision_refused_then_allowed_then_repaired(database: Database, tmp_path: Path) -> None:
    scen = scenario(tmp_path / "scen", ["r1", "r2", "r3", "r4"])
    env = runner_env(database.url, ALEMBIC_CONFIG=str(scen / "alembic.ini"), LOG_FORMAT="json")

    # 1. the ledger disabled: nothing of it is created
    r = run_runner(["upgrade", "--to", "r2"], {**env, "HISTORY_TABLE": "off"})
    assert r.code == 0, r.err
    assert database.version() == "r2" and ledger_tables(database) == set()

    # 2. the first run with the ledger baselines what was applied without it, records what it applies
    r = run_runner(["upgrade", "--to", "r3"], env)
    assert r.code == 0, r.err
    recorded = sums(database)
    assert {rev: kind for rev, (kind, _) in recorded.items()} == \
        {"r1": "baseline", "r2": "baseline", "r3": "applied"}
    assert recorded["r1"][1] == checksum.of_file(scen / "versions/r1.py")
    assert [(x["command"], x["from_revision"], x["to_revision"], x["outcome"]) for x in runs(database)] \
        == [("upgrade", "r2", "r3", "migrated")]

    # 3. reformatting r1 (CRLF, quotes, comments) is fine; a real edit of r2 is refused
    reformatted = REFORMATTED.replace(" t1", " t_r1").replace("\n", "\r\n")
    (scen / "versions/r1.py").write_bytes(reformatted.encode())
    write_revision(scen, "r2", "r1", REVISION.format(rev="r2", down="r1", table="t_r2")
                   .replace("name text", "name text NOT NULL"))
    edited = checksum.of_file(scen / "versions/r2.py")
    r = run_runner(["upgrade"], env)
    assert r.code == 7, r.err
    error = r.summary()["msg"]
    assert "revision r2 was edited after it was applied" in error and "r1" not in error
    assert recorded["r2"][1] in error and edited in error and "repair r2" in error
    assert database.version() == "r3" and database.sql("SELECT to_regclass('t_r4')") == ""
    refused = runs(database)[-1]
    assert (refused["outcome"], refused["exit_code"], refused["to_revision"]) == ("refused", 7, "r3")

    # 4. ALLOW_EDITED_REVISIONS lets a run through, without re-recording
    r = run_runner(["upgrade", "--to", "r4"], {**env, "ALLOW_EDITED_REVISIONS": "r2"})
    assert r.code == 0, r.err
    assert "ledger.edited" in r.err and database.version() == "r4"
    assert sums(database)["r2"] == recorded["r2"]

    # 5. repair re-records the reviewed edit (and only it); the run is in the history
    r = run_runner(["repair"], env)
    assert r.code == 0, r.err
    after = sums(database)
    assert after["r2"] == ("repaired", edited) and after["r1"] == recorded["r1"]
    repair = runs(database)[-1]
    assert (repair["command"], repair["outcome"], repair["steps"]) == \
        ("repair", "repaired", [{"revision": "r2", "outcome": "repaired", "old": recorded["r2"][1],
                                  "new": edited}])

    # 6. a failing revision whose error carries the passwords: recorded failed, secrets masked
    write_revision(scen, "r5", "r4", textwrap.dedent('''\
        import os

        revision = "r5"
        down_revision = "r4"


        def upgrade() -> None:
            raise RuntimeError("cannot log in with " + os.environ["DATABASE_URL"] + " or "
                               + os.environ["LEAK"])
    '''))
    r = run_runner(["upgrade"], {**env, "LEAK": PASSWORD})  # the runner's own password
    assert r.code == 6, r.err
    failed = runs(database)[-1]
    assert (failed["outcome"], failed["exit_code"], failed["to_revision"]) == ("failed", 6, "r4")
    assert failed["steps"][0]["revision"] == "r5" and failed["steps"][0]["outcome"] == "failed"
    assert "revision r5 failed" in failed["error"] and "***" in failed["error"]
    assert_no_secret_in_ledger(database)


@pytest.mark.parametrize("damage,problem", [
    ("ALTER TABLE runner_history_revisions ALTER COLUMN checksum TYPE bytea USING decode(checksum, 'hex')",
     "its checksum column is bytea, not text"),
    ("ALTER TABLE runner_history_revisions DROP COLUMN checksum", "its checksum column is missing"),
], ids=["checksum-retyped", "checksum-dropped"])
def test_damaged_checksum_column_refuses_until_repair_rebuilds_it(database: Database, tmp_path: Path,
                                                                  damage: str, problem: str) -> None:
    scen = scenario(tmp_path / "scen", ["r1", "r2", "r3"])
    env = runner_env(database.url, ALEMBIC_CONFIG=str(scen / "alembic.ini"), LOG_FORMAT="json")
    assert run_runner(["upgrade", "--to", "r2"], env).code == 0
    recorded = sums(database)
    database.sql(damage)
    database.sql("ALTER TABLE runner_history ALTER COLUMN error TYPE bytea USING convert_to(error, 'UTF8')")
    for args in (["upgrade"], ["upgrade", "--to", "r2"]):  # with work, and a no-op
        r = run_runner(args, env)
        assert r.code == 7, r.err
        message = r.summary()["msg"]
        assert problem in message and "'python -m runner repair'" in message, message
        assert "<memory at" not in r.err + r.out
    assert database.version() == "r2" and database.sql("SELECT to_regclass('t_r3')") == ""
    history = run_runner(["history"], env)  # a bytea column prints as hex, never <memory at 0x...>
    assert history.code == 0 and "<memory at" not in history.out + history.err, history.out
    r = run_runner(["repair"], env)
    assert r.code == 0, r.err
    assert "ledger.rebuild" in r.err and "<memory at" not in r.err
    assert {rev: kind for rev, (kind, _) in sums(database).items()} == {"r1": "repaired", "r2": "repaired"}
    assert {rev: digest for rev, (_, digest) in sums(database).items()} == \
        {rev: digest for rev, (_, digest) in recorded.items()}
    assert database.sql("SELECT format_type(atttypid, NULL) || ' ' || attnotnull FROM pg_attribute "
                        "WHERE attrelid = 'runner_history_revisions'::regclass AND attname = 'checksum'") \
        == "text true"
    r = run_runner(["upgrade"], env)
    assert r.code == 0 and database.version() == "r3", r.err


def test_deleted_ledger_row_refuses_until_repair_records_it(database: Database, tmp_path: Path) -> None:
    scen = scenario(tmp_path / "scen", ["r1", "r2", "r3", "r4"])
    env = runner_env(database.url, ALEMBIC_CONFIG=str(scen / "alembic.ini"), LOG_FORMAT="json")
    assert run_runner(["upgrade", "--to", "r3"], env).code == 0
    recorded = sums(database)
    # a row deleted below rows that remain: an edit of r2 would go unnoticed, and re-baselining
    # it would take the edited script as the truth
    database.sql("DELETE FROM runner_history_revisions WHERE revision = 'r2'")
    write_revision(scen, "r2", "r1", REVISION.format(rev="r2", down="r1", table="t_r2")
                   .replace("name text", "name text NOT NULL"))
    for args in (["upgrade"], ["upgrade", "--to", "r3"]):  # with work, and a no-op
        r = run_runner(args, env)
        assert r.code == 7, r.err
        message = r.summary()["msg"]
        assert "applied revision r2 has no checksum in the ledger public.runner_history_revisions" in message
        assert "(r3)" in message and "'python -m runner repair r2'" in message, message
    assert database.version() == "r3" and "r2" not in sums(database)
    write_revision(scen, "r2", "r1")  # reviewed: the script is the one that ran
    r = run_runner(["repair", "r2"], env)
    assert r.code == 0, r.err
    assert sums(database)["r2"] == ("repaired", recorded["r2"][1])
    repair = runs(database)[-1]
    assert repair["steps"] == [{"revision": "r2", "outcome": "repaired", "old": None,
                                "new": recorded["r2"][1]}]
    assert "r2 (none -> " in run_runner(["history", "--limit", "1"], env).out
    # the newest row gone looks like a run killed before it recorded: baselined, as before
    database.sql("DELETE FROM runner_history_revisions WHERE revision = 'r3'")
    r = run_runner(["upgrade"], env)
    assert r.code == 0 and "ledger.baseline" in r.err and database.version() == "r4", r.err
    assert sums(database)["r3"][0] == "baseline"


def test_binary_values_print_as_hex() -> None:
    from runner.redact import redact_data

    assert redact_data({"checksum": memoryview(b"\x01\xab")}) == {"checksum": "\\x01ab"}


def test_upgrade_failure_downgrade_rows_history_and_status(database: Database) -> None:
    env = runner_env(database.url, ALEMBIC_CONFIG=LAB, LOG_FORMAT="json", **WHO)
    assert run_runner(["upgrade", "--to", "l001"], env).code == 0
    # a revision that fails is rolled back, and still recorded (the ledger writes outside its transaction)
    r = run_runner(["upgrade"], {**env, "LAB_MODE": "fail"})
    assert r.code == 6, r.err
    assert database.version() == "l001" and database.sql("SELECT to_regclass('l002_done')") == ""
    assert run_runner(["upgrade"], env).code == 0
    before = runs(database)
    noop = run_runner(["upgrade"], env)  # nothing to do: no lock, and the ledger is not touched
    assert noop.code == 0 and "ledger" not in noop.err and runs(database) == before
    r = run_runner(["downgrade", "--to", "l001"], env)
    assert r.code == 0, r.err

    rows = runs(database)
    assert [(x["command"], x["from_revision"], x["to_revision"], x["outcome"], x["exit_code"])
            for x in rows] == [("upgrade", "base", "l001", "migrated", 0),
                               ("upgrade", "l001", "l001", "failed", 6),
                               ("upgrade", "l001", "l003", "migrated", 0),
                               ("downgrade", "l003", "l001", "downgraded", 0)]
    failed = rows[1]
    assert [(s["revision"], s["outcome"]) for s in failed["steps"]] == [("l002", "failed")]
    assert failed["error"].startswith("revision l002 failed and was rolled back: duplicate key")
    assert [(s["revision"], s["outcome"]) for s in rows[2]["steps"]] == [("l002", "applied"),
                                                                         ("l003", "applied")]
    assert [(s["revision"], s["to"]) for s in rows[3]["steps"]] == [("l003", "l002"), ("l002", "l001")]
    assert all(s["seconds"] >= 0 for x in rows for s in x["steps"])
    for x in rows:
        assert (x["image_version"], x["image_revision"], x["host"], x["job_name"]) == \
            ("2.4.1", "0123456789abcdef0123", "migrate-abc12", "migrate")
        assert x["runner_version"] and x["db_user"] == "admin" and len(x["run_id"]) == 8
        assert x["finished_at"] >= x["started_at"]
    assert {rev: kind for rev, (kind, _) in sums(database).items()} == {"l001": "applied"}
    assert_no_secret_in_ledger(database)

    text = run_runner(["history"], env)
    assert text.code == 0, text.err
    lines = text.out.splitlines()
    assert lines[0].split() == ["started", "(UTC)", "run", "command", "from", "->", "to", "outcome",
                                "exit", "took", "image", "host"]
    mains = [ln for ln in lines[1:] if not ln.startswith(" ")]
    assert [ln.split()[3:7] for ln in mains] == [
        ["downgrade", "l003", "->", "l001"], ["upgrade", "l001", "->", "l003"],
        ["upgrade", "l001", "->", "l001"], ["upgrade", "base", "->", "l001"]]
    assert "downgraded" in mains[0] and "2.4.1@0123456789ab" in mains[0] and "migrate-abc12" in mains[0]
    assert any(ln.split()[:2] == ["downgraded", "l003"] for ln in lines)
    assert any(ln.split()[0] == "error" and "duplicate key" in ln for ln in lines)

    js = run_runner(["history", "--format", "json", "--limit", "2"], env)
    newest = json.loads(js.out)
    assert [x["command"] for x in newest] == ["downgrade", "upgrade"]
    assert newest[0]["run_id"] == rows[3]["run_id"] and newest[0]["job"] == "migrate"
    assert newest[0]["started"].endswith("Z") and newest[0]["seconds"] > 0

    status = run_runner(["status"], env)
    last = [ln for ln in status.out.splitlines() if ln.startswith("last run:")]
    assert len(last) == 1 and "downgrade l003 -> l001: downgraded (exit 0" in last[0]
    assert rows[3]["run_id"] in last[0]


def test_sigterm_lock_timeout_and_concurrent_runners(database: Database) -> None:
    env = runner_env(database.url, ALEMBIC_CONFIG=LAB)
    assert run_runner(["upgrade", "--to", "l001"], env).code == 0
    # SIGTERM mid-revision: rolled back, recorded as interrupted
    proc = start_runner(["upgrade"], {**env, "LAB_MODE": "sleep", "LAB_SLEEP": "60"})
    wait_for(lambda: sleeping(database))
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, timeout=30).code == 143
    # one runner migrates slowly (until the test lets it go); one gives up waiting for the lock;
    # one waits and finds nothing to do
    import psycopg2

    gate = psycopg2.connect(database.url)
    try:
        with gate.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(4242)")
        holder = start_runner(["upgrade"], {**env, "LAB_MODE": "hold", "LAB_HOLD_KEY": "4242"})
        wait_for(lambda: database.sql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                                      "'DO $$ BEGIN WHILE NOT pg_try_advisory_lock_shared%'") != "0",
                 timeout=60, what="the holder never reached l002")
        waiter = start_runner(["upgrade"], env)
        impatient = run_runner(["upgrade"], {**env, "LOCK_WAIT_TIMEOUT": "1s"})
        assert impatient.code == 4, impatient.err
    finally:
        gate.close()  # lets the holder finish l002
    assert finish(holder).code == 0 and finish(waiter).code == 0
    assert database.version() == "l003"

    rows = runs(database)
    assert [(x["outcome"], x["exit_code"], x["from_revision"], x["to_revision"]) for x in rows] == [
        ("migrated", 0, "base", "l001"), ("interrupted", 143, "l001", "l001"),
        ("migrated", 0, "l001", "l003"), ("lock timeout", 4, "l001", "l001")]
    interrupted, migrated, timed_out = rows[1], rows[2], rows[3]
    assert [(s["revision"], s["outcome"]) for s in interrupted["steps"]] == [("l002", "failed")]
    assert "SIGTERM" in interrupted["error"]
    assert timed_out["steps"] == [] and "LOCK_WAIT_TIMEOUT" in timed_out["error"]
    assert len({x["id"] for x in rows}) == len({x["run_id"] for x in rows}) == 4
    assert [s["revision"] for s in migrated["steps"]] == ["l002", "l003"]
    assert all(x["finished_at"] for x in rows), "no row may stay 'running'"
    recorded = database.sql("SELECT string_agg(revision || ':' || kind || ':' || run_id, ' ' "
                            "ORDER BY revision) FROM runner_history_revisions")
    assert recorded == (f"l001:applied:{rows[0]['run_id']} l002:applied:{migrated['run_id']} "
                        f"l003:applied:{migrated['run_id']}")


@pytest.mark.pg("15")  # the ledger's SQL on the oldest supported major too
def test_stamp_adopts_an_existing_database(database: Database) -> None:
    env = runner_env(database.url, ALEMBIC_CONFIG=LAB)
    database.sql("CREATE TABLE items (id int PRIMARY KEY, note text)")  # made before Alembic
    r = run_runner(["stamp", "l001"], env)
    assert r.code == 2 and "--yes" in r.err
    assert database.version() == "" and ledger_tables(database) == set()
    r = run_runner(["stamp", "l001", "--yes"], env)
    assert r.code == 0, r.err
    assert database.version() == "l001"
    assert run_runner(["upgrade"], env).code == 0
    r = run_runner(["stamp", "l002", "--yes"], env)  # back down, without running l003's downgrade
    assert r.code == 0, r.err
    assert database.version() == "l002" and database.sql("SELECT to_regclass('ix_items_note')") != ""

    rows = runs(database)
    assert [(x["command"], x["from_revision"], x["to_revision"], x["outcome"], x["steps"])
            for x in rows][::2] == [("stamp", "base", "l001", "stamped", []),
                                    ("stamp", "l003", "l002", "stamped", [])]
    assert {rev: kind for rev, (kind, _) in sums(database).items()} == \
        {"l001": "stamped", "l002": "applied"}


@pytest.mark.pg("15")
def test_ledger_in_a_non_public_schema_with_its_own_name(database: Database) -> None:
    """The foreign env.py keeps its version table in schema meta: the ledger goes there too."""
    env = runner_env(database.url, ALEMBIC_CONFIG=FOREIGN, HISTORY_TABLE="audit_log",
                     LOG_FORMAT="json")
    r = run_runner(["upgrade"], env)
    assert r.code == 0, r.err
    assert {"meta.audit_log", "meta.audit_log_revisions"} <= database.tables()
    assert not {t for t in database.tables() if t.startswith("public.") and "audit" in t}
    rows = runs(database, "meta.audit_log")
    assert [(x["from_revision"], x["to_revision"]) for x in rows] == [("base", "f002")]
    assert set(sums(database, "meta.audit_log_revisions")) == {"f001", "f002"}
    assert_no_secret_in_ledger(database, "meta", "audit_log")
    listed = json.loads(run_runner(["history", "--format", "json"], env).out)
    assert [x["run_id"] for x in listed] == [rows[0]["run_id"]]


def test_restore_is_recorded_and_keeps_the_history(database: Database, s3_server: S3Server,
                                                   bucket: str) -> None:
    tools = bindir(database.cluster.major)
    env = runner_env(database.url, ALEMBIC_CONFIG=LAB, LOG_FORMAT="json", BACKUP_MODE="required",
                     BACKUP_S3_URI=f"s3://{bucket}/ledger", PG_DUMP_BIN=str(tools / "pg_dump"),
                     PG_RESTORE_BIN=str(tools / "pg_restore"), **s3_server.env())
    first = run_runner(["upgrade", "--to", "l001"], env)
    assert first.code == 0, first.err
    taken_at_base = first.summary()["backup"]
    assert run_runner(["upgrade"], env).code == 0
    r = run_runner(["restore", "--backup", taken_at_base, "--yes"], env)
    assert r.code == 0, r.err
    assert database.version() == ""

    rows = runs(database)
    # the backup's copy of the ledger held the first run as `running`; the restore kept the later state
    assert [(x["command"], x["from_revision"], x["to_revision"], x["outcome"], x["backup_key"] is not None)
            for x in rows] == [("upgrade", "base", "l001", "migrated", True),
                               ("upgrade", "l001", "l003", "migrated", True),
                               ("restore", "l003", "base", "restored", True)]
    assert rows[2]["backup_key"] == taken_at_base and rows[0]["backup_key"] == taken_at_base
    assert sums(database) == {}, "the checksums are the backup's: nothing was applied then"
    assert_no_secret_in_ledger(database)


def test_ledger_without_privileges_never_fails_a_migration(database: Database) -> None:
    assert run_runner(["upgrade", "--to", "l001"], runner_env(database.url, ALEMBIC_CONFIG=LAB)).code == 0
    # the application's role may migrate, but not touch the ledger tables the admin created
    quoted = APP_PASSWORD.replace("'", "''")
    database.sql(f"CREATE ROLE ledger_app LOGIN PASSWORD '{quoted}'; "
                 f"GRANT CREATE, USAGE ON SCHEMA public TO ledger_app; "
                 f"ALTER TABLE items OWNER TO ledger_app; ALTER TABLE alembic_version OWNER TO ledger_app")
    try:
        url = database.cluster.url(database.name, user="ledger_app", password=APP_PASSWORD)
        r = run_runner(["upgrade"], runner_env(url, ALEMBIC_CONFIG=LAB))
        assert r.code == 0, r.err
        assert database.version() == "l003"
        warnings = [ln for ln in r.lines if "ledger.unavailable" in ln]
        assert len(warnings) == 1 and "permission denied" in warnings[0]
        assert len(runs(database)) == 1
    finally:
        database.sql("DROP OWNED BY ledger_app CASCADE; DROP ROLE ledger_app", check=False)


def test_ledger_commands_refuse_bad_input(database: Database) -> None:
    env = runner_env(database.url, ALEMBIC_CONFIG=LAB)
    for args, extra, needle in [(["history", "--limit", "0"], {}, "at least 1"),
                                (["history"], {"HISTORY_TABLE": "off"}, "HISTORY_TABLE=off"),
                                (["repair", "l002"], {}, "not applied to this database")]:
        r = run_runner(args, {**env, **extra})
        errors = [ln for ln in r.lines if "ERROR" in ln]
        assert r.code in (2, 7) and len(errors) == 1 and needle in errors[0], (args, r.err)
        assert "Traceback" not in r.err
    assert database.version() == ""


def test_k8s_jobs_pass_pod_and_job_name() -> None:
    """The downward API gives the ledger the pod's and the Job's names (kubelet emulation)."""
    from tests.k8s_helpers import build, find, resolve_env

    for tree, job in (("base", "migration-runner"), ("overlays/rollback", "migration-runner-rollback")):
        docs = build(tree)
        container = find(docs, "Job")["spec"]["template"]["spec"]["containers"][0]
        fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
                  for e in container["env"] if "fieldRef" in e.get("valueFrom", {})}
        assert fields == {"POD_NAME": "metadata.name",
                          "JOB_NAME": "metadata.labels['batch.kubernetes.io/job-name']"}
        env = resolve_env(container, docs)
        assert env["JOB_NAME"] == job and env["POD_NAME"].startswith(f"{job}-")
