"""The no-op fast path: facts recorded from env.py, answered with one query only when they apply.

"Taken" is observed from outside: the runner runs with PYTHONPROFILEIMPORTTIME=1, and a run that
imported neither SQLAlchemy nor Alembic answered from the facts. Every run that must not take it
is checked for the full path's outcome (and the database state), not only for the detour.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.fastpath import facts as F
from runner.fastpath import record
from tests.conftest import REPO, Database, run_runner, runner_env
from tests.installed_app import InstalledApp
from tests.pgcluster import APP_PASSWORD, Cluster
from tests.result import Result

VERSIONS_SCENARIO = REPO / "tests/scenarios/fastpath_versions"
REVISION_0006 = '''"""An extra revision, mounted over the image's scripts."""

from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.execute("CREATE TABLE fastpath_extra (id int)")


def downgrade() -> None:
    op.execute("DROP TABLE fastpath_extra")
'''


# -- helpers --------------------------------------------------------------------------------------
def copy_sample(dest: Path) -> Path:
    """The sample alembic.ini and migrations/ in dest; return the alembic.ini."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "alembic.ini", dest / "alembic.ini")
    shutil.copytree(REPO / "migrations", dest / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
    return dest / "alembic.ini"


def env_for(ini: Path, url: str | None, **extra: str) -> dict[str, str]:
    return runner_env(url, ALEMBIC_CONFIG=str(ini), LOG_FORMAT="json", **extra)


def record_facts(ini: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`python -m runner.fastpath record` as an image build runs it: same cwd and environment as
    the runs that use the facts."""
    return subprocess.run([sys.executable, "-m", "runner.fastpath", "record", *flags],
                          env=env_for(ini, None), cwd=ini.parent, capture_output=True, text=True,
                          timeout=60)


def run(ini: Path, args: list[str], url: str, **extra: str) -> Result:
    """A real runner process next to the scripts, with an import trace on stderr."""
    return run_runner(args, env_for(ini, url, PYTHONPROFILEIMPORTTIME="1", **extra), cwd=ini.parent)


def imported(r: Result) -> set[str]:
    """Top-level packages the run imported (from the PYTHONPROFILEIMPORTTIME trace)."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in r.lines
            if line.startswith("import time:") and "|" in line}


def answered_from_facts(r: Result) -> bool:
    names = imported(r)
    assert "psycopg2" in names, "no import trace: PYTHONPROFILEIMPORTTIME did not reach the runner"
    return not names & {"sqlalchemy", "alembic"}


def events(r: Result) -> list[dict[str, Any]]:
    """The JSON events without what differs between any two runs (time, run id, durations)."""
    found = []
    for line in r.lines:
        if line.startswith("{"):
            event = json.loads(line)
            event.pop("ts")
            event.pop("run_id", None)
            if "durations_s" in event:
                event["durations_s"] = sorted(event["durations_s"])
            found.append(event)
    return found


def skipped(r: Result) -> list[str]:
    return [e["msg"] for e in events(r) if e["event"] == "fastpath.skipped"]


def termination(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    data.pop("run_id")
    data["durations_s"] = sorted(data["durations_s"])
    return data


def new_database(pg: Cluster) -> Database:
    name = f"t_{uuid.uuid4().hex[:10]}"
    pg.psql(f"CREATE DATABASE {name}")
    return Database(pg, name)


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample scripts with their facts recorded (as the image build does); do not modify."""
    ini = copy_sample(tmp_path_factory.mktemp("sample"))
    proc = record_facts(ini, "--strict")
    assert proc.returncode == 0, proc.stderr
    return ini


@pytest.fixture(scope="module")
def at_head(pg: Cluster, sample: Path) -> Iterator[Database]:
    """A database migrated to the sample's head once for the module (tests must leave it there)."""
    db = new_database(pg)
    r = run(sample, ["upgrade"], db.url, FAST_PATH="off")
    assert r.code == 0 and db.version() == "0005", r.err
    yield db
    pg.psql(f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE)", check=False)


@pytest.fixture
def own_sample(tmp_path: Path) -> Path:
    """The sample scripts with their facts, for a test that changes them."""
    ini = copy_sample(tmp_path / "scripts")
    proc = record_facts(ini, "--strict")
    assert proc.returncode == 0, proc.stderr
    return ini


# -- taken: nothing changed --------------------------------------------------------------------------
def test_noop_is_answered_from_facts_exactly_like_the_full_path(sample: Path, at_head: Database,
                                                                 tmp_path: Path) -> None:
    for args in (["upgrade"], ["wait", "--until-head"]):
        fast_file, full_file = tmp_path / "fast.json", tmp_path / "full.json"
        fast = run(sample, args, at_head.url, TERMINATION_MESSAGE_PATH=str(fast_file))
        full = run(sample, args, at_head.url, TERMINATION_MESSAGE_PATH=str(full_file), FAST_PATH="off")
        assert (fast.code, full.code) == (0, 0), fast.err + full.err
        assert answered_from_facts(fast), f"{args}: the fast path was not taken"
        assert not answered_from_facts(full), f"{args}: FAST_PATH=off still took the fast path"
        assert events(fast) == events(full), f"{args}: the fast path reports differently"
        assert termination(fast_file) == termination(full_file)
        assert events(fast)[0]["event"] == "start"
    assert fast.summary()["outcome"] == "at head"
    assert at_head.version() == "0005"


# -- not taken: each with the full path's outcome ----------------------------------------------------
def test_mounted_scripts_that_differ_are_not_answered_for(own_sample: Path, database: Database) -> None:
    first = run(own_sample, ["upgrade"], database.url)  # an empty database: not at head
    assert first.code == 0 and first.summary()["outcome"] == "migrated", first.err
    assert not answered_from_facts(first) and not skipped(first)
    env_py = own_sample.parent / "migrations/env.py"
    env_py.write_text(env_py.read_text() + "\n# edited after the facts were recorded\n")
    edited = run(own_sample, ["upgrade"], database.url)
    assert edited.code == 0 and edited.summary()["outcome"] == "nothing to do", edited.err
    assert not answered_from_facts(edited)
    assert any(f"{env_py} changed" in msg for msg in skipped(edited)), edited.err
    # a newer revision mounted over the recorded ones: stale facts would say "nothing to do"
    (own_sample.parent / "migrations/versions/0006_extra.py").write_text(REVISION_0006)
    newer = run(own_sample, ["upgrade"], database.url)
    assert newer.code == 0, newer.err
    assert not answered_from_facts(newer) and skipped(newer)
    assert newer.summary()["applied"] == ["0006"]
    assert database.version() == "0006" and "public.fastpath_extra" in database.tables()


def test_version_table_comes_from_env_py_and_its_environment(tmp_path: Path, database: Database) -> None:
    shutil.copytree(VERSIONS_SCENARIO, tmp_path / "scenario")
    ini = tmp_path / "scenario/alembic.ini"
    assert record_facts(ini, "--strict").returncode == 0
    facts = F.load(F.facts_path(ini))
    assert (facts.version_table, facts.version_table_schema) == ("app_versions", "meta")
    assert facts.env == {"APP_VERSION_SCHEMA": None}  # read by env.py, unset when recorded
    database.sql("CREATE SCHEMA meta; CREATE SCHEMA other")
    assert run(ini, ["upgrade"], database.url).code == 0
    noop = run(ini, ["upgrade"], database.url)
    assert noop.code == 0 and noop.summary()["outcome"] == "nothing to do", noop.err
    assert answered_from_facts(noop), "meta.app_versions is at head: the facts say where to look"
    # the same scripts, the version table configured elsewhere by the environment
    elsewhere = run(ini, ["wait", "--until-head"], database.url, APP_VERSION_SCHEMA="other",
                    HEAD_WAIT_TIMEOUT="1s", HEAD_POLL_INTERVAL="0.5s")
    assert elsewhere.code == 10, elsewhere.err
    assert not answered_from_facts(elsewhere)
    assert any("APP_VERSION_SCHEMA" in msg for msg in skipped(elsewhere))
    assert database.sql("SELECT string_agg(version_num, ',') FROM meta.app_versions") == "v002"
    assert database.sql("SELECT to_regclass('other.app_versions') IS NULL") == "t"


def test_database_behind_is_not_answered_for(sample: Path, database: Database) -> None:
    assert run(sample, ["upgrade", "--to", "0004"], database.url).code == 0
    waiting = run(sample, ["wait", "--until-head"], database.url, HEAD_WAIT_TIMEOUT="1s",
                  HEAD_POLL_INTERVAL="0.5s")
    assert waiting.code == 10 and not answered_from_facts(waiting), waiting.err
    assert database.version() == "0004"
    behind = run(sample, ["upgrade"], database.url)
    assert behind.code == 0, behind.err
    assert not answered_from_facts(behind) and not skipped(behind)  # the facts apply; the database is behind
    assert behind.summary()["applied"] == ["0005"] and database.version() == "0005"


def _revision(rev: str, down: str, phase: str) -> str:
    return (f'"""A {phase} revision."""\n\nfrom alembic import op\n\nrevision = "{rev}"\n'
            f'down_revision = "{down}"\nrunner_phase = "{phase}"\n\n\ndef upgrade() -> None:\n'
            f'    op.execute("CREATE TABLE t_{rev} (id int)")\n\n\ndef downgrade() -> None:\n'
            f'    op.execute("DROP TABLE t_{rev}")\n')


def test_wait_until_head_answers_in_the_rollouts_state_exactly_like_the_full_path(
        tmp_path: Path, database: Database) -> None:
    """During a rollout the database has every pre-deploy revision and lacks the post-deploy ones:
    every new pod's `wait --until-head` is answered from the facts there, with the full path's
    events; one pre-deploy revision short, it is not."""
    ini = copy_sample(tmp_path / "scripts")
    versions = ini.parent / "migrations/versions"
    for rev, down, phase in (("0006", "0005", "pre-deploy"), ("0007", "0006", "post-deploy"),
                             ("0008", "0007", "post-deploy")):
        (versions / f"{rev}_phase.py").write_text(_revision(rev, down, phase))
    assert record_facts(ini, "--strict").returncode == 0
    assert F.load(F.facts_path(ini)).pre_deploy_done == {"0006": ("0007", "0008"), "0007": ("0008",)}
    assert run(ini, ["upgrade", "--phase", "pre-deploy"], database.url).code == 0
    for at, post in (("0006", "0007,0008"), ("0007", "0008")):
        if at == "0007":
            assert run(ini, ["upgrade", "--to", "0007"], database.url, FAST_PATH="off").code == 0
        assert database.version() == at
        fast_file, full_file = tmp_path / "fast.json", tmp_path / "full.json"
        fast = run(ini, ["wait", "--until-head"], database.url, TERMINATION_MESSAGE_PATH=str(fast_file))
        full = run(ini, ["wait", "--until-head"], database.url, TERMINATION_MESSAGE_PATH=str(full_file),
                   FAST_PATH="off")
        assert (fast.code, full.code) == (0, 0), fast.err + full.err
        assert answered_from_facts(fast) and not answered_from_facts(full), fast.err
        assert events(fast) == events(full)
        assert termination(fast_file) == termination(full_file)
        assert fast.summary()["outcome"] == "pre-deploy applied"
        assert [e["post_deploy"] for e in events(fast) if e["event"] == "head.pre_deploy"] == [post]
    assert run(ini, ["downgrade", "--to", "0005"], database.url).code == 0
    short = run(ini, ["wait", "--until-head"], database.url, HEAD_WAIT_TIMEOUT="1s",
                HEAD_POLL_INTERVAL="0.5s")
    assert short.code == 10 and not answered_from_facts(short), short.err


def test_missing_or_corrupt_facts_are_not_used(own_sample: Path, at_head: Database) -> None:
    path = F.facts_path(own_sample)
    good = path.read_text()
    tampered = json.loads(good)
    tampered["heads"] = ["0004"]  # an edit that does not update the digest
    for content, reason in ((good[: len(good) // 2], "not JSON"), (json.dumps(tampered), "corrupt"),
                            (None, None)):
        if content is None:
            path.unlink()
        else:
            path.write_text(content)
        r = run(own_sample, ["upgrade"], at_head.url)
        assert r.code == 0 and r.summary()["outcome"] == "nothing to do", r.err
        assert not answered_from_facts(r)
        assert [reason in msg for msg in skipped(r)] == ([True] if reason else []), r.err
    assert at_head.version() == "0005"


def test_read_only_database_is_not_answered_for(sample: Path, at_head: Database) -> None:
    at_head.cluster.psql(f"ALTER DATABASE {at_head.name} SET default_transaction_read_only = on")
    try:
        r = run(sample, ["upgrade"], at_head.url, DB_WAIT_TIMEOUT="1s")
    finally:  # from another database: a session in this one is read-only now
        at_head.cluster.psql(f"ALTER DATABASE {at_head.name} RESET default_transaction_read_only")
    assert r.code == 3, r.err  # the full path waits for a writable primary, then gives up
    assert not answered_from_facts(r)
    assert "read-only" in r.err


def test_applied_revision_edited_is_refused_on_a_no_op_too(own_sample: Path, database: Database) -> None:
    """The facts carry the digest of every revision's ledger checksum; the ledger's differs once
    an applied revision is edited (and the image rebuilt): the full path refuses, read-only."""
    assert run(own_sample, ["upgrade"], database.url).code == 0
    revision = own_sample.parent / "migrations/versions/0003_orders_index_concurrently.py"
    recorded = database.sql("SELECT checksum FROM runner_history_revisions WHERE revision = '0003'")
    revision.write_text(revision.read_text() + "\nEDITED = True\n")
    assert record_facts(own_sample, "--strict").returncode == 0  # the facts match the edited scripts
    runs_before = database.sql("SELECT count(*) FROM runner_history")
    refused = run(own_sample, ["upgrade"], database.url)
    assert refused.code == 7, refused.err
    assert not answered_from_facts(refused)
    message = refused.summary()["msg"]
    from runner.ledger import checksum
    assert "revision 0003 was edited after it was applied" in message and recorded in message
    assert checksum.of_file(revision) in message and "python -m runner repair 0003" in message
    assert not [e for e in events(refused) if e["event"].startswith("lock.")], "a no-op takes no lock"
    assert database.sql("SELECT count(*) FROM runner_history") == runs_before, "nothing written"
    allowed = run(own_sample, ["upgrade"], database.url, ALLOW_EDITED_REVISIONS="0003")
    assert allowed.code == 0 and "ledger.edited" in allowed.err, allowed.err
    off = run(own_sample, ["upgrade"], database.url, HISTORY_TABLE="off")  # no ledger, nothing to compare
    assert off.code == 0 and answered_from_facts(off), off.err
    assert run(own_sample, ["repair", "0003"], database.url).code == 0
    repaired = run(own_sample, ["upgrade"], database.url)
    assert repaired.code == 0 and answered_from_facts(repaired), repaired.err


def test_without_a_ledger_or_without_select_on_it_the_fast_path_still_answers(
        sample: Path, database: Database) -> None:
    """Nothing to compare, as on the full path: a database migrated with HISTORY_TABLE=off, then
    one whose role may not read the ledger."""
    assert run(sample, ["upgrade"], database.url, HISTORY_TABLE="off").code == 0
    noop = run(sample, ["upgrade"], database.url)  # HISTORY_TABLE on: the ledger does not exist
    assert noop.code == 0 and answered_from_facts(noop), noop.err
    assert "public.runner_history" not in database.tables()
    assert run(sample, ["upgrade", "--to", "0005"], database.url, FAST_PATH="off").code == 0
    database.sql("CREATE TABLE runner_history_revisions (revision text PRIMARY KEY, checksum text)")
    database.sql(f"CREATE ROLE fp_reader LOGIN PASSWORD '{APP_PASSWORD}'; GRANT USAGE ON SCHEMA public "
                 "TO fp_reader; GRANT SELECT ON alembic_version TO fp_reader")
    try:
        url = database.cluster.url(database.name, user="fp_reader", password=APP_PASSWORD)
        unreadable = run(sample, ["upgrade"], url)
        assert unreadable.code == 0 and answered_from_facts(unreadable), unreadable.err
    finally:
        database.sql("DROP OWNED BY fp_reader; DROP ROLE fp_reader", check=False)


def test_oversized_facts_file_is_ignored_unread(own_sample: Path, at_head: Database) -> None:
    """A facts file over the cap is not read (a 200 MB one took 605 MB): a warning, the full path."""
    import tracemalloc

    path = F.facts_path(own_sample)
    with path.open("r+b") as fh:
        fh.truncate(200 * 2**20)  # sparse: big on paper, cheap to make
    tracemalloc.start()
    try:
        with pytest.raises(F.FactsTooLarge, match=re.escape("200.0 MiB, over the 8 MiB")):
            F.load(path)
        assert tracemalloc.get_traced_memory()[1] < 2**20, "the file was read"
    finally:
        tracemalloc.stop()
    r = run(own_sample, ["upgrade"], at_head.url)
    assert r.code == 0 and r.summary()["outcome"] == "nothing to do", r.err
    assert not answered_from_facts(r)
    warned = [e for e in events(r) if e["event"] == "fastpath.skipped"]
    assert [e["level"] for e in warned] == ["warn"] and "over the 8 MiB" in warned[0]["msg"]


SEARCH_PATH_ENV = {
    "runner's connection": "from alembic import context\n"
    "context.configure(connection=context.config.attributes['connection'], transaction_per_migration=True)\n"
    "with context.begin_transaction():\n    context.run_migrations()\n",
    "env.py's own engine": "from alembic import context\nfrom sqlalchemy import engine_from_config, pool\n"
    "cfg = context.config\n"
    "engine = engine_from_config(cfg.get_section(cfg.config_ini_section, {}), prefix='sqlalchemy.', "
    "poolclass=pool.NullPool)\n"
    "with engine.connect() as connection:\n"
    "    context.configure(connection=connection, transaction_per_migration=True)\n"
    "    with context.begin_transaction():\n        context.run_migrations()\n",
}


@pytest.mark.parametrize("env_py", list(SEARCH_PATH_ENV))
def test_pgoptions_search_path_is_one_place_for_the_version_table(tmp_path: Path, database: Database,
                                                                   env_py: str) -> None:
    """PGOPTIONS=-c search_path=app: the version table is read, locked, migrated and recorded there,
    by the runner's connections and by an engine env.py builds itself, fast path or not."""
    ini = scripts(tmp_path, SEARCH_PATH_ENV[env_py])
    (tmp_path / "versions/x002.py").write_text(
        'from alembic import op\nrevision = "x002"\ndown_revision = "x001"\n\n\n'
        'def upgrade():\n    op.execute("CREATE TABLE things (id int)")\n')
    database.sql("CREATE SCHEMA app")
    options = {"PGOPTIONS": "-c search_path=app"}
    first = run(ini, ["upgrade"], database.url, **options)
    assert first.code == 0 and first.summary()["applied"] == ["x001", "x002"], first.err
    assert database.tables() == {"app.alembic_version", "app.things", "app.runner_history",
                                 "app.runner_history_revisions"}
    assert database.sql("SELECT version_num FROM app.alembic_version") == "x002"
    assert record_facts(ini, "--strict").returncode == 0
    for fast in ("on", "off"):
        again = run(ini, ["upgrade"], database.url, FAST_PATH=fast, **options)
        assert again.code == 0 and again.summary()["outcome"] == "nothing to do", again.err
        assert answered_from_facts(again) == (fast == "on")
    assert database.tables() == {"app.alembic_version", "app.things", "app.runner_history",
                                 "app.runner_history_revisions"}


# -- recording: from env.py itself, or not at all ----------------------------------------------------
def scripts(tmp_path: Path, env_py: str) -> Path:
    """A one-revision script directory with this env.py; return its alembic.ini."""
    (tmp_path / "versions").mkdir(parents=True)
    (tmp_path / "alembic.ini").write_text("[alembic]\nscript_location = %(here)s\n"
                                          "prepend_sys_path = %(here)s\npath_separator = os\n")
    (tmp_path / "env.py").write_text(env_py)
    (tmp_path / "versions/x001.py").write_text('revision = "x001"\ndown_revision = None\n\n\n'
                                               "def upgrade():\n    pass\n")
    return tmp_path / "alembic.ini"


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Record in this process; forget the modules env.py imported afterwards."""
    before = set(sys.modules)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("fp_"):
            del sys.modules[name]


CONFIGURE = "context.configure(connection=conn, {kw})\nwith context.begin_transaction():\n" \
            "    context.run_migrations()\n"
HEADER = "import os\nfrom alembic import context\nimport sqlalchemy as sa\n" \
         "conn = context.config.attributes['connection']\n"


@pytest.mark.parametrize("body,reason", [
    (HEADER + "conn.execute(sa.text('SET search_path TO app'))\n" + CONFIGURE.format(kw=""),
     "uses its connection"),
    (HEADER + "schema = sa.engine.make_url(context.config.get_main_option('sqlalchemy.url')).database\n"
     + CONFIGURE.format(kw="version_table_schema=schema"), "different version table"),
    (HEADER + "settings = dict(os.environ)\n" + CONFIGURE.format(kw=""), "whole environment"),
    (HEADER + CONFIGURE.format(kw="") + CONFIGURE.format(kw="version_table='second'"),
     "configure() 2"),
    (HEADER + "context.configure(url=context.config.get_main_option('sqlalchemy.url'))\n"
     "context.run_migrations()\n", "without a connection"),
    (HEADER + "from sqlalchemy.ext.asyncio import create_async_engine\n"
     "engine = create_async_engine(context.config.get_main_option('sqlalchemy.url'))\n"
     + CONFIGURE.format(kw=""), "env.py failed without a database"),
    (HEADER + "context.get_context()\n" + CONFIGURE.format(kw=""), "needs a database"),
    (HEADER + "try:\n    conn.execute(sa.text('SET search_path TO app'))\nexcept Exception:\n    pass\n"
     + CONFIGURE.format(kw=""), "uses its connection"),
    # inputs the facts cannot fingerprint: another process, native code, the host, the user, /proc
    (HEADER + "import subprocess\nschema = subprocess.run(['printenv', 'FP_SCHEMA'], "
     "capture_output=True, text=True).stdout.strip() or None\n"
     + CONFIGURE.format(kw="version_table_schema=schema"), "starts another process"),
    (HEADER + "schema = 'a' if os.system('test -n \"$FP_SCHEMA\"') else 'b'\n"
     + CONFIGURE.format(kw="version_table_schema=schema"), "starts another process"),
    (HEADER + "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.getenv.restype = ctypes.c_char_p\n"
     "schema = (libc.getenv(b'FP_SCHEMA') or b'a').decode()\n"
     + CONFIGURE.format(kw="version_table_schema=schema"), "native code through ctypes"),
    (HEADER + "schema = open('/proc/self/environ', 'rb').read().split(b'\\0')[0].decode()[:8]\n"
     + CONFIGURE.format(kw="version_table_schema=schema"), "reads /proc/self/environ"),
    (HEADER + "import socket\nschema = socket.gethostname().split('-')[0]\n"
     + CONFIGURE.format(kw="version_table_schema=schema"), "the host's name"),
    (HEADER + "schema = 'admin' if os.getuid() == 0 else 'app'\n"
     + CONFIGURE.format(kw="version_table_schema=schema"), "os.getuid"),
    (HEADER + "schema = 'rw' if os.access('/tmp', os.W_OK) else 'ro'\n"
     + CONFIGURE.format(kw="version_table_schema=schema"), "os.access"),
    (HEADER + "schema = 'many' if len(os.environ) > 50 else 'few'\n"
     + CONFIGURE.format(kw="version_table_schema=schema"), "whole environment"),
], ids=["sql-before-configure", "schema-from-url", "whole-environment", "two-configures",
        "offline-style-url", "async-engine", "needs-a-migration-context", "refusal-caught",
        "subprocess", "os-system", "ctypes-getenv", "proc-environ", "hostname", "uid",
        "permissions", "environment-size"])
def test_recording_refuses_what_it_cannot_answer_for(tmp_path: Path, in_process: None, body: str,
                                                     reason: str) -> None:
    with pytest.raises(record.CannotRecord, match=re.escape(reason)):
        record.record(str(scripts(tmp_path, body)))


@pytest.mark.parametrize("read", [
    "os.environb.get(b'FP_SCHEMA', b'').decode()",
    "(os.getenvb(b'FP_SCHEMA') or b'').decode()",
    "os.environ._data.get(b'FP_SCHEMA', b'').decode()",
    "__import__('posix').environ.get(b'FP_SCHEMA', b'').decode()",
    "'tenant' if 'FP_SCHEMA' in os.environ else ''",
], ids=["environb", "getenvb", "environ-data", "posix-environ", "membership"])
def test_every_way_of_reading_a_variable_makes_it_a_fact(tmp_path: Path, in_process: None,
                                                         monkeypatch: pytest.MonkeyPatch, read: str) -> None:
    """A schema switched through os.environb / getenvb / the environment's data is seen."""
    ini = scripts(tmp_path, HEADER + f"schema = {read} or 'a'\n"
                  + CONFIGURE.format(kw="version_table_schema=schema"))
    facts = record.record(str(ini))
    assert facts.env == {"FP_SCHEMA": None} and facts.version_table_schema == "a"
    monkeypatch.setenv("FP_SCHEMA", "tenant")
    assert "FP_SCHEMA differs" in (F.mismatch(facts, ini) or "")


def test_paths_env_py_only_looks_at_are_facts(tmp_path: Path, in_process: None) -> None:
    """os.path.exists() opens nothing: the path's kind is fingerprinted instead."""
    flag = tmp_path / "tenant.flag"
    ini = scripts(tmp_path, HEADER + f"schema = 'tenant' if os.path.exists({str(flag)!r}) else 'shared'\n"
                  + CONFIGURE.format(kw="version_table_schema=schema"))
    facts = record.record(str(ini))
    assert facts.version_table_schema == "shared" and facts.probes[str(flag)] == "missing"
    assert F.mismatch(facts, ini) is None
    flag.write_text("")
    assert f"{flag} changed (it was missing)" in (F.mismatch(facts, ini) or "")


def test_a_module_added_to_the_python_path_later_is_seen(tmp_path: Path, in_process: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An optional import that failed while recording, from a directory the import system had
    listed (and cached) before: a module put there later changes env.py's answer."""
    lib = tmp_path / "lib"
    lib.mkdir()
    name = f"fp_{uuid.uuid4().hex[:8]}"
    (lib / f"{name}_first.py").write_text("")
    monkeypatch.syspath_prepend(str(lib))
    __import__(f"{name}_first")  # the import system lists lib now, before recording
    ini = scripts(tmp_path / "scripts", HEADER + f"try:\n    from {name} import SCHEMA as schema\n"
                  "except ImportError:\n    schema = None\n"
                  + CONFIGURE.format(kw="version_table_schema=schema"))
    facts = record.record(str(ini))
    assert facts.version_table_schema is None and str(lib) in facts.search
    (lib / ".cache").mkdir()  # not a module: changes nothing
    assert F.mismatch(facts, ini) is None
    (lib / f"{name}.py").write_text("SCHEMA = 'tenant'\n")
    assert f"the modules in {lib}" in (F.mismatch(facts, ini) or "")


def test_recording_takes_the_branch_a_run_takes(tmp_path: Path, in_process: None) -> None:
    """The stand-in is a SQLAlchemy Connection, as the runner's is."""
    ini = scripts(tmp_path, HEADER + "schema = 'run' if isinstance(conn, sa.engine.Connection) else 'other'\n"
                  + CONFIGURE.format(kw="version_table_schema=schema"))
    assert record.record(str(ini)).version_table_schema == "run"


def test_recording_follows_an_env_py_that_builds_its_own_engine(tmp_path: Path, in_process: None) -> None:
    """Alembic's default template: an engine from sqlalchemy.url, never connected while recording."""
    ini = scripts(tmp_path, "from alembic import context\nfrom sqlalchemy import engine_from_config, pool\n"
                  "cfg = context.config\n"
                  "engine = engine_from_config(cfg.get_section(cfg.config_ini_section, {}), "
                  "prefix='sqlalchemy.', poolclass=pool.NullPool)\n"
                  "with engine.connect() as connection:\n"
                  "    context.configure(connection=connection, version_table_schema='audit')\n"
                  "    with context.begin_transaction():\n        context.run_migrations()\n")
    facts = record.record(str(ini))
    assert (facts.heads, facts.version_table, facts.version_table_schema) == (
        ("x001",), "alembic_version", "audit")


def test_facts_stop_applying_when_anything_they_came_from_changes(
        tmp_path: Path, in_process: None, monkeypatch: pytest.MonkeyPatch) -> None:
    helper = f"fp_{uuid.uuid4().hex[:8]}"
    ini = scripts(tmp_path, f"import json, os, pathlib\nfrom alembic import context\nimport {helper}\n"
                  "here = pathlib.Path(__file__).parent\n"
                  "table = json.loads((here / 'settings.json').read_text())['table']\n"
                  "token = os.environ.get('FP_TOKEN')\n"
                  "context.configure(connection=context.config.attributes['connection'], "
                  f"version_table=table, version_table_schema=os.environ.get('FP_SCHEMA', {helper}.SCHEMA))\n"
                  "context.run_migrations()\n")
    (tmp_path / f"{helper}.py").write_text("SCHEMA = 'tenant_a'\n")
    (tmp_path / "settings.json").write_text('{"table": "versions_a"}')
    monkeypatch.setenv("FP_TOKEN", "s3cr3t-token-value")
    facts = record.record(str(ini))
    assert (facts.version_table, facts.version_table_schema) == ("versions_a", "tenant_a")
    assert set(facts.env) == {"FP_SCHEMA", "FP_TOKEN"}  # names and salted hashes, never values
    assert facts.env["FP_SCHEMA"] is None and "s3cr3t-token-value" not in facts.to_json()
    assert {str(tmp_path / n) for n in ("alembic.ini", "env.py", f"{helper}.py", "settings.json",
                                        "versions/x001.py")} <= set(facts.files)
    assert F.mismatch(facts, ini) is None

    def changed(path: Path, text: str) -> str | None:
        old = path.read_text()
        path.write_text(text)
        try:
            return F.mismatch(facts, ini)
        finally:
            path.write_text(old)

    assert "settings.json changed" in (changed(tmp_path / "settings.json", '{"table": "v_b"}') or "")
    assert f"{helper}.py changed" in (changed(tmp_path / f"{helper}.py", "SCHEMA = 'b'\n") or "")
    assert "alembic.ini changed" in (changed(ini, ini.read_text() + "\n") or "")
    (tmp_path / "versions/x002.py").write_text("")
    assert "versions changed" in (F.mismatch(facts, ini) or "")
    (tmp_path / "versions/x002.py").unlink()
    assert "recorded for" in (F.mismatch(facts, tmp_path / "other.ini") or "")
    with monkeypatch.context() as m:
        m.setenv("FP_SCHEMA", "tenant_b")
        assert "FP_SCHEMA differs" in (F.mismatch(facts, ini) or "")
    with monkeypatch.context() as m:
        m.setattr(sys, "path", [*sys.path, str(tmp_path)])
        assert "Python path" in (F.mismatch(facts, ini) or "")
    assert F.mismatch(facts, ini) is None
    path = record.write(facts)
    assert F.load(path) == facts
    path.write_text(path.read_text().replace("versions_a", "versions_b"))
    with pytest.raises(F.FactsError, match="corrupt"):
        F.load(path)


def test_record_command_says_why_and_leaves_no_stale_facts(tmp_path: Path) -> None:
    ini = scripts(tmp_path, HEADER + "conn.execute(sa.text('SELECT 1'))\n" + CONFIGURE.format(kw=""))
    stale = F.facts_path(ini)
    stale.write_text("{}")
    proc = record_facts(ini)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("fast path not recorded: env.py uses its connection"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and not stale.exists()
    assert record_facts(ini, "--strict").returncode == 1


@pytest.mark.parametrize("argv,settings,kind", [
    (["upgrade"], {}, "upgrade"),
    (["upgrade", "--to", "heads"], {}, "upgrade"),
    (["wait", "--until-head"], {}, "wait"),
    (["upgrade", "--to", "0004"], {}, None),
    (["wait"], {}, None),
    (["status", "--check"], {}, None),
    (["upgrade"], {"fast_path": "off"}, None),
    (["upgrade"], {"target_schemas": ("tenant_a",)}, None),
    (["upgrade"], {"targets_file": Path("targets.txt")}, None),
])
def test_only_a_single_database_upgrade_to_head_or_wait_until_head_is_answered(
        argv: list[str], settings: dict[str, Any], kind: str | None) -> None:
    from runner.cli import build_parser
    from runner.config import Settings
    from runner.context import Run
    from runner.fastpath.answer import _eligible
    from runner.log import EventLog

    args = build_parser().parse_args(argv)
    run = Run(settings=Settings(**settings), log=EventLog(), command=args.command)
    assert _eligible(run, args) == kind


# -- migrations inside an installed package, and the fast path against the full path -----------------
P003 = '''"""Tags (shipped by a reinstall of the same version)."""

from alembic import op

revision = "p003"
down_revision = "p002"


def upgrade() -> None:
    op.execute("CREATE TABLE IF NOT EXISTS fp_tags (id int PRIMARY KEY)")


def downgrade() -> None:
    op.execute("DROP TABLE fp_tags")
'''


@pytest.fixture
def installed(tmp_path: Path) -> InstalledApp:
    """fpapp 1.0 pip-installed into a throwaway virtualenv, its facts recorded."""
    app = InstalledApp(tmp_path)
    app.install()
    proc = app.record()
    assert proc.returncode == 0, proc.stderr
    return app


def _clone(pg: Cluster, template: Database) -> Database:
    db = Database(pg, f"t_{uuid.uuid4().hex[:10]}")
    pg.psql(f"CREATE DATABASE {db.name} TEMPLATE {template.name}")
    return db


def _state(db: Database) -> dict[str, Any]:
    """Everything an upgrade may change: tables, every version table's rows, the ledger."""
    tables = sorted(db.tables())
    versions = {t: db.sql(f"SELECT string_agg(version_num, ',') FROM {t}")
                for t in db.sql("SELECT string_agg(table_schema || '.' || table_name, ' ') FROM "
                                "information_schema.columns WHERE column_name = 'version_num'").split()}
    ledgers = [t for t in tables if t.endswith(".runner_history_revisions")]
    return {"tables": tables, "versions": versions, "ledger": {
        t: db.sql(f"SELECT string_agg(revision || ':' || kind || ':' || checksum, ' ' ORDER BY 1) FROM {t}")
        for t in ledgers}, "runs": {t[: -len("_revisions")]: db.sql(
            f"SELECT string_agg(command || ':' || outcome || ':' || exit_code, ' ' ORDER BY started_at) "
            f"FROM {t[: -len('_revisions')]}") for t in ledgers}}


def _answer(r: Result, db: Database) -> dict[str, Any]:
    summary = r.summary()
    return {"exit": r.code, "outcome": summary.get("outcome"), "applied": summary.get("applied"),
            "to": summary.get("to"), "state": _state(db)}


def _edit_p001(app: InstalledApp) -> Any:
    path = app.versions / "p001_items.py"
    original = path.read_text()
    path.write_text(original.replace("id int PRIMARY KEY", "id bigint PRIMARY KEY"))
    assert app.record().returncode == 0  # the image rebuilt with the edit: facts match it

    def undo() -> None:
        path.write_text(original)
        assert app.record().returncode == 0
    return undo


def _set_ini(app: InstalledApp, old: str, new: str) -> Any:
    original = app.ini.read_text()
    app.ini.write_text(original.replace(old, new))
    return lambda: app.ini.write_text(original)


def _add_revision(app: InstalledApp) -> Any:
    path = app.versions / "p003_tags.py"
    path.write_text(P003)
    return path.unlink


def _reinstall(app: InstalledApp) -> Any:
    app.install({"fpapp/migrations/versions/p003_tags.py": P003})
    return app.install


# name, what to change (returns its undo), SQL run on both databases, environment, expected answer
MUTATIONS: list[tuple[str, Any, str, dict[str, str], tuple[int, str]]] = [
    ("nothing changed", None, "", {}, (0, "nothing to do")),
    ("a new revision file next to the installed ones", _add_revision, "", {}, (0, "migrated")),
    ("an applied revision edited (facts recorded again)", _edit_p001, "", {}, (7, None)),
    ("a variable env.py reads (as bytes) set", None, "", {"FPAPP_SCHEMA": "other"}, (0, "migrated")),
    ("alembic.ini names another version table",
     lambda app: _set_ini(app, "version_table = alembic_version", "version_table = fp_versions"),
     "", {}, (0, "migrated")),
    ("the installed package reinstalled, same version, one more revision", _reinstall, "", {},
     (0, "migrated")),
    ("the version table moved to another schema by hand", None,
     "CREATE SCHEMA archive; ALTER TABLE public.alembic_version SET SCHEMA archive", {}, (0, "migrated")),
    ("PGOPTIONS points search_path elsewhere", None, "", {"PGOPTIONS": "-c search_path=other"},
     (0, "migrated")),
]


def test_fast_path_and_full_path_give_the_same_answer(installed: InstalledApp, pg: Cluster) -> None:
    """The differential test: for each change, an `upgrade` that may answer from the facts and one
    with FAST_PATH=off, each on its own copy of the same database, end the same way and leave the
    same database (tables, version tables, ledger). The migrations live in site-packages
    (`script_location = fpapp:migrations`): a reinstall of the same version with one more
    revision used to be answered 'nothing to do'."""
    facts = F.load(F.facts_path(installed.ini))  # fingerprinted one by one, in site-packages
    assert {str(installed.versions / n) for n in ("p001_items.py", "p002_notes.py")} <= set(facts.files)
    assert str(installed.versions) in facts.dirs
    template = new_database(pg)
    template.sql("CREATE SCHEMA other")
    assert installed.run(["upgrade"], template.url, FAST_PATH="off").code == 0
    made, disagree = [template], []
    try:
        for name, change, sql, env, (code, outcome) in MUTATIONS:
            fast_db, full_db = _clone(pg, template), _clone(pg, template)
            made += [fast_db, full_db]
            undo = change(installed) if change else None
            try:
                for db in (fast_db, full_db) if sql else ():
                    db.sql(sql)
                fast = installed.run(["upgrade"], fast_db.url, **env)
                full = installed.run(["upgrade"], full_db.url, FAST_PATH="off", **env)
            finally:
                if undo:
                    undo()
            assert full.code == code and (outcome is None or full.summary()["outcome"] == outcome), \
                f"{name}: {full.err[-800:]}"
            if _answer(fast, fast_db) != _answer(full, full_db):
                disagree.append(f"{name}: fast {_answer(fast, fast_db)}, full {_answer(full, full_db)}")
            if name == "nothing changed":  # else this test would compare the full path with itself
                assert answered_from_facts(fast), fast.err
        assert not disagree, "\n".join(disagree)
    finally:
        for db in made:
            pg.psql(f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE)", check=False)
