"""verify: round trips, lint, models and drift on a throwaway database; plan on revisions that
inspect the database. Real PostgreSQL, real Squawk; every run must leave no scratch database."""

from __future__ import annotations

import calendar
import json
import re
import signal
import sys
import time
from pathlib import Path

import psycopg2
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from runner.errors import ConfigError
from runner.verify import fingerprint, lint
from tests.conftest import MAJORS, REPO, Database, finish, run_runner, runner_env, start_runner, wait_for
from tests.pgcluster import APP_PASSWORD, Cluster
from tests.result import Result

HAZARDS = str(REPO / "tests/scenarios/verify_hazards/alembic.ini")
ROUNDTRIP = str(REPO / "tests/scenarios/verify_roundtrip/alembic.ini")
SLOWPOKE = str(REPO / "tests/scenarios/slowpoke/alembic.ini")
TWO_HEADS = str(REPO / "tests/scenarios/twoheads/alembic.ini")
HOSTILE = str(REPO / "tests/scenarios/verify_hostile/alembic.ini")
TEMPLATE_CHAIN = REPO / "tests/scenarios/verify_template/alembic.ini"
HIDDEN = str(REPO / "tests/scenarios/verify_hidden/alembic.ini")


def verify_env(pg: Cluster, **extra: str) -> dict[str, str]:
    return runner_env(None, **{"VERIFY_DATABASE_URL": pg.url("postgres"), **extra})


def scratch_databases(pg: Cluster) -> list[str]:
    out = pg.psql(r"SELECT datname FROM pg_database WHERE datname LIKE 'runner\_verify\_%' ORDER BY 1")
    return out.split() if out else []


def scratch_roles(pg: Cluster) -> list[str]:
    out = pg.psql(r"SELECT rolname FROM pg_roles WHERE rolname LIKE 'runner\_verify\_%' ORDER BY 1")
    return out.split() if out else []


def report(r: Result) -> dict:
    """The --format json document on stdout."""
    assert "Traceback" not in r.err, r.err
    return json.loads(r.out)


def findings(doc: dict) -> list[tuple[str, str, str, str]]:
    """(severity, check, revision, rule) of each finding, sortable."""
    return [(f["severity"], f["check"], f["revision"] or "", f["rule"] or "") for f in doc["findings"]]


@pytest.mark.every_major
def test_sample_chain_verifies_clean_on_every_major(pg: Cluster) -> None:
    """The sample chain, default settings: its 0005 adds customers.email_domain and fills it with
    op.add_column_online (an instant ACCESS EXCLUSIVE, then batches outside the revision's
    transaction), round-trips, and its models match although the backfill created the runner's
    runner_backfills next to the version table. 0002's foreign key to orders takes SHARE ROW
    EXCLUSIVE on it: a note."""
    r = run_runner(["verify", "--format", "json"], verify_env(pg))
    assert r.code == 0, r.err
    doc = report(r)
    assert findings(doc) == [("note", "locks", "0002", "strong-lock")]
    assert doc["online_operations"] == {"0005": ["add_column_online(customers)"]}
    added = [row for row in doc["observed"] if row["revision"] == "0005" and row["step"] == "upgrade"
             and row["lock"] != "ACCESS SHARE"]  # (and the backfill's read of its largest key)
    assert [(r["relation"], r["lock"], r["scan"], r["rewrite"], r["operation"]) for r in added] == [
        ("public.customers", "ACCESS EXCLUSIVE", False, False, "add_column_online(customers)")]
    s = doc["summary"]
    assert (s["revisions"], s["models"], s["errors"], s["drift"], s["online_operations"]) == (
        5, "match", 0, None, 1)
    assert s["statements_linted"] >= 7  # the SQL of the other revisions reached Squawk
    assert scratch_databases(pg) == [] and scratch_roles(pg) == []


def test_hazards_caught_by_the_lint_and_by_observation(pg: Cluster) -> None:
    r = run_runner(["verify"], verify_env(pg, ALEMBIC_CONFIG=HAZARDS))
    assert r.code == 13, r.err
    out = r.out
    groups = re.split(r"\n(?=\S)", out)  # one block per revision, then the summary
    titles = [g.splitlines()[0] for g in groups]
    assert titles[:4] == [f"{name[:4]} (tests/scenarios/verify_hazards/versions/{name}.py): {counts}"
                          for name, counts in (("v002_blocking_index", "2 errors"),
                                               ("v003_volatile_default", "2 errors"),
                                               ("v004_not_null", "2 errors"),
                                               ("v005_type_change", "2 errors, 1 warning"))]
    contract = ', then op.alter_column_type_contract(\'accounts\', \'id\', \'id_new\') in a post-deploy ' \
        'revision (runner_phase = "post-deploy")'
    expected = {"v002": ("require-concurrent-index-creation", "CREATE INDEX ix_accounts_plan ON accounts",
                         "Use `concurrently` to avoid blocking writes", "scan-under-lock", "SHARE",
                         "op.create_index_online('ix_accounts_plan', 'accounts', ['plan'])", None),
                "v003": ("adding-field-with-default", "DEFAULT gen_random_uuid()", "backfill",
                         "table-rewrite", "ACCESS EXCLUSIVE", "op.add_column_online('accounts', sa.Column("
                         "'ref', sa.Uuid(), server_default=sa.text('gen_random_uuid()')))", None),
                "v004": ("adding-not-nullable-field", "ALTER COLUMN email SET NOT NULL", "CHECK",
                         "scan-under-lock", "ACCESS EXCLUSIVE", "op.set_not_null_online('accounts', 'email')",
                         None),
                "v005": ("changing-column-type", "ALTER COLUMN id TYPE NUMERIC(20)", "ACCESS EXCLUSIVE",
                         "table-rewrite", "ACCESS EXCLUSIVE",
                         "op.alter_column_type_expand('accounts', 'id', 'id_new', sa.Numeric(20))"
                         + contract,
                         # the observed hint reads the type as PostgreSQL stores it: numeric(20,0)
                         "op.alter_column_type_expand('accounts', 'id', 'id_new', sa.Numeric(20, 0))"
                         + contract)}
    for group, expect in zip(groups, expected.values(), strict=False):
        rule, statement, helptext, kind, lock, instead, observed_instead = expect
        lint_line = next(line for line in group.splitlines() if "ERROR lint" in line)
        assert f"[{rule}]" in lint_line and statement in lint_line and helptext in lint_line
        assert lint_line.endswith(f"-- use instead: {instead}"), lint_line
        locks_line = next(line for line in group.splitlines() if "ERROR locks" in line)
        assert f"[{kind}]: upgrade: " in locks_line and f"under {lock}" in locks_line, locks_line
        assert locks_line.endswith(f"-- use instead: {observed_instead or instead}"), locks_line
        assert re.search(rf"^    upgrade +public\.accounts +{lock} +(yes|scan) +- +-$", group, re.M), group
    # the type change's downgrade rewrites the table back: a warning (it runs only to roll back)
    assert "WARNING locks [table-rewrite]: downgrade: public.accounts rewritten" in groups[3]
    # allowed with a reason: reported, not failed; the new table of v001 raises nothing
    assert ("NOTE lint [ban-drop-column]: allowed by runner_allow: contract step: no release reads "
            "accounts.legacy since 2.3 -- statement: ALTER TABLE accounts DROP COLUMN legacy -- Dropping "
            "a column may break existing clients.") in out
    assert "v001" not in out
    lines = out.splitlines()
    assert "  errors by check: lint 4, locks 4" in lines
    assert "  revisions with errors: v002 (2), v003 (2), v004 (2), v005 (2)" in lines
    assert lines[-1].startswith("verify: 7 revision(s) round-tripped;") and "8 error(s)" in lines[-1]
    failed = [line for line in r.lines if "ERROR" in line]
    assert len(failed) == 1 and "verify failed (exit 13): 8 problem(s)" in failed[0]
    assert scratch_databases(pg) == []


def test_round_trips_models_and_branches(pg: Cluster) -> None:
    r = run_runner(["verify", "--format", "json"], verify_env(pg, ALEMBIC_CONFIG=ROUNDTRIP,
                                                               VERIFY_LINT="warn"))
    assert r.code == 13, r.err
    doc = report(r)
    assert sorted(f for f in findings(doc) if f[1] != "locks") == sorted([
        ("error", "roundtrip", "r002", ""),  # the lossy downgrade
        ("error", "migration", "r002", ""),  # ... so its upgrade cannot run again
        ("note", "roundtrip", "r003", ""),  # declared irreversible
        ("warning", "lint", "r003", "ban-drop-table"),  # VERIFY_LINT=warn
        ("error", "migration", "r004", ""),  # a downgrade that raises, undeclared
        *[("error", "models", "", "")] * 4,
    ]), doc  # r005/r006 (branches) and r007 (their merge) round-trip cleanly
    messages = {f["check"] + " " + (f["revision"] or ""): f for f in doc["findings"]}
    lossy = messages["roundtrip r002"]["message"]
    assert lossy.startswith("the downgrade does not undo the upgrade: + index public.ix_widgets_name "
                            "(CREATE INDEX ix_widgets_name")
    again = messages["migration r002"]  # a consequence: folded into the round-trip finding
    assert "DuplicateTable" in again["message"] and again["step"] == "upgrade again"
    assert again["folded_into"] == "roundtrip"
    assert "runner_irreversible" in messages["migration r004"]["message"]
    assert "drops the legacy table" in messages["roundtrip r003"]["message"]
    assert sorted(f["message"] for f in doc["findings"] if f["check"] == "models") == [
        "add_column widgets.colour: in the models, not in the schema the migrations build",
        "modify_type widgets.name: the migrations give TEXT, the models say VARCHAR(50)",
        "remove_column widgets.size: in the schema the migrations build, not in the models",
        "remove_table_comment widgets: in the schema the migrations build, not in the models"]
    s = doc["summary"]
    assert (s["revisions"], s["irreversible"], s["models"], s["warnings"]) == (4, 1, "differ", 1)
    assert scratch_databases(pg) == []
    # the text report folds it under its cause
    from runner.verify.report import Finding, text

    out = text([Finding(**f) for f in doc["findings"]], s, doc["observed"], [])
    assert ("      which also makes: ERROR migration: upgrade again (after its downgrade) failed: "
            "DuplicateTable") in out
    assert "  1 failure(s) folded into the finding they follow from" in out.splitlines()
    # VERIFY_ROUNDTRIP=warn: round-trip problems are reported, and only the models fail
    doc = report(run_runner(["verify", "--format", "json"], verify_env(
        pg, ALEMBIC_CONFIG=ROUNDTRIP, VERIFY_LINT="off", VERIFY_ROUNDTRIP="warn")))
    assert sorted(f for f in findings(doc) if f[1] in ("roundtrip", "migration")) == sorted([
        ("warning", "roundtrip", "r002", ""), ("warning", "migration", "r002", ""),
        ("note", "roundtrip", "r003", ""), ("warning", "migration", "r004", "")])
    # VERIFY_ROUNDTRIP=off: upgrades only, no downgrade is run
    doc = report(run_runner(["verify", "--format", "json"], verify_env(
        pg, ALEMBIC_CONFIG=ROUNDTRIP, VERIFY_LINT="off", VERIFY_ROUNDTRIP="off")))
    assert [f for f in findings(doc) if f[1] in ("roundtrip", "migration")] == []
    s = doc["summary"]
    assert (s["upgraded"], s["revisions"], s["roundtrip"]) == (7, 0, "off")
    assert not [row for row in doc["observed"] if row["step"] != "upgrade"]


def test_drift_of_a_live_database_read_only(pg: Cluster, database: Database) -> None:
    assert run_runner(["upgrade", "--to", "0004"], runner_env(database.url)).code == 0
    database.sql("ALTER TABLE orders ADD COLUMN note text; CREATE INDEX hand_ix ON customers (name); "
                 "ALTER TABLE billing.invoices DROP CONSTRAINT invoices_order_id_fkey; "
                 "ALTER TABLE customers ALTER COLUMN name DROP NOT NULL")
    tables = database.tables()
    # the live URL in a variable of its own: --against names it, no URL in argv
    r = run_runner(["verify", "--against", "LIVE_DATABASE_URL", "--format", "json"],
                   verify_env(pg, LIVE_DATABASE_URL=database.url))
    assert r.code == 13, r.err
    doc = report(r)
    drift = sorted(f["message"] for f in doc["findings"] if f["check"] == "drift")
    assert drift == [
        "+ column public.orders.note (text) [only in the live database]",
        "+ index public.hand_ix (CREATE INDEX hand_ix ON public.customers USING btree (name)) "
        "[only in the live database]",
        "- constraint billing.invoices.invoices_order_id_fkey (FOREIGN KEY (order_id) REFERENCES "
        "public.orders(id)) [missing from the live database]",
        "~ column public.customers.name: text not null -> text [migrations -> live database]",
    ]  # compared at 0004, the live revision: 0005's email_domain is not missing
    assert {f["revision"] for f in doc["findings"] if f["check"] == "drift"} == {"0004"}
    assert doc["summary"]["drift"] == 4
    # the observed locks, weighed: 0002 already ran there; 0005's online step on customers (empty
    # there) holds ACCESS EXCLUSIVE for an instant: in the table, not a finding
    locks = {f["revision"]: f for f in doc["findings"] if f["check"] == "locks"}
    assert {rev: f["severity"] for rev, f in locks.items()} == {"0002": "note"}
    assert locks["0002"]["message"].endswith("the live database already ran this revision")
    added = next(row for row in doc["observed"] if row["revision"] == "0005" and row["step"] == "upgrade"
                 and row["lock"] == "ACCESS EXCLUSIVE")
    assert (added["operation"], added["lock"], added["in_live"], added["live_rows"]) == (
        "add_column_online(customers)", "ACCESS EXCLUSIVE", True, 0)
    assert added["estimated_hold_s"] < 0.001
    assert database.version() == "0004" and database.tables() == tables  # nothing written
    assert scratch_databases(pg) == []


def test_sigterm_and_deadline_drop_the_scratch_database(pg: Cluster) -> None:
    now = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    stale, busy = "runner_verify_20000101000000_deadbeef", f"runner_verify_{now}_0badcafe"
    pg.psql(f"CREATE ROLE {stale}")  # its role too (SIGKILLed before it could drop either)
    pg.psql(f"CREATE DATABASE {stale} OWNER {stale}")
    pg.psql(f"CREATE DATABASE {busy}")  # another verify's, right now: never touched
    try:
        env = verify_env(pg, ALEMBIC_CONFIG=SLOWPOKE, SLOWPOKE_SLEEP="60", VERIFY_LINT="off")
        proc = start_runner(["verify"], env)
        wait_for(lambda: len(scratch_databases(pg)) == 2 and pg.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE "
            "'SELECT pg_sleep%' AND application_name LIKE 'migration-runner/migrate/%'") == "1")
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        r = finish(proc, timeout=30)
        assert r.code == 143 and time.monotonic() - t0 < 10, r.err
        assert "stale scratch database runner_verify_20000101000000_deadbeef and its role" in r.err
        assert scratch_databases(pg) == [busy] and scratch_roles(pg) == []
        r = run_runner(["verify", "--run-deadline", "2s"], env)
        assert r.code == 9, r.err
        assert scratch_databases(pg) == [busy] and scratch_roles(pg) == []
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {stale}", check=False)
        pg.psql(f"DROP ROLE IF EXISTS {stale}", check=False)
        pg.psql(f"DROP DATABASE IF EXISTS {busy}", check=False)


def test_plan_on_a_revision_that_inspects_the_database(pg: Cluster, database: Database) -> None:
    env = runner_env(database.url, ALEMBIC_CONFIG=HAZARDS, VERIFY_DATABASE_URL=pg.url("postgres"))
    r = run_runner(["plan"], env)
    assert r.code == 7, r.err
    failed = [line for line in r.lines if "ERROR" in line]
    assert len(failed) == 1 and "Traceback" not in r.err
    assert ("revision v006 (tests/scenarios/verify_hazards/versions/v006_inspects.py) cannot be rendered "
            "offline (NoInspectionAvailable") in failed[0] and "use 'plan --scratch'" in failed[0]
    r = run_runner(["plan", "--scratch", "--to", "v006"], env)
    assert r.code == 0, r.err
    assert "-- Running upgrade v005 -> v006 (tests/scenarios/verify_hazards/versions/v006_inspects.py)\n" \
           "ALTER TABLE accounts ADD COLUMN note TEXT;\n" in r.out
    assert "CREATE INDEX ix_accounts_plan ON accounts (plan);" in r.out
    assert "v007" not in r.out and "pg_catalog" not in r.out  # up to --to; no reflection queries
    assert database.tables() == set() and scratch_databases(pg) == []


@pytest.mark.parametrize("args,extra,code,needle", [
    (["verify"], {"VERIFY_DATABASE_URL": ""}, 2, "VERIFY_DATABASE_URL is not set"),
    (["verify", "--against", "PROD_URL"], {}, 2, "verify --against PROD_URL: PROD_URL is not set"),
    (["verify", "--from", "nope"], {}, 2, "verify --from nope: not a revision"),
    (["verify"], {"ALEMBIC_CONFIG": TWO_HEADS}, 13, "2 heads (h002, h003)"),
])
def test_bad_input_one_line_no_connection(args: list[str], extra: dict[str, str], code: int,
                                          needle: str) -> None:
    # a closed port: none of these may connect anywhere
    env = runner_env(None, **{"VERIFY_DATABASE_URL": "postgresql://u:pw@127.0.0.1:1/postgres", **extra})
    r = run_runner(args, env)
    assert r.code == code, r.err
    failed = [line for line in r.lines if "ERROR" in line]
    assert len(failed) == 1 and needle in failed[0] and "Traceback" not in r.err


def test_missing_squawk_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError) as err:
        lint.squawk_binary()
    assert err.value.code == 2 and "squawk-cli" in str(err.value) and "VERIFY_LINT=off" in str(err.value)


# -- the pieces, without a runner process --------------------------------------------------------
@pytest.mark.parametrize("statement,name", [
    ("ALTER TABLE accounts ADD COLUMN x int", "accounts"),
    ('ALTER TABLE IF EXISTS ONLY "Billing".Invoices ALTER COLUMN a SET NOT NULL', "Billing.invoices"),
    ("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS ix ON public.orders (a)", "public.orders"),
    ("CREATE INDEX ON orders USING btree (a)", "orders"),
    ("-- why\nDROP INDEX CONCURRENTLY IF EXISTS ix_a", "ix_a"),
    ("UPDATE orders SET a = 1", None),
])
def test_lint_target_of_a_statement(statement: str, name: str | None) -> None:
    assert lint.target(statement) == name


def test_lint_rule_set_new_objects_and_allowances() -> None:
    existing = {"public.accounts", "accounts", "public.ix_old", "ix_old"}
    revs = [
        lint.RevisionSql("a1", "a1.py", [
            "CREATE TABLE fresh (id bigint PRIMARY KEY, b text)",
            "CREATE INDEX ix_fresh ON fresh (b)",  # a new table: no hazard
            "ALTER TABLE fresh ADD COLUMN c uuid DEFAULT gen_random_uuid()",
            "CREATE INDEX ix_acc ON accounts (b)",  # an existing one: blocks writes
            "CREATE INDEX CONCURRENTLY ix_acc2 ON accounts (b)",  # fine, also outside a transaction
            "ALTER TABLE accounts ADD COLUMN d timestamptz DEFAULT now()",  # stable default: fine
            "DROP INDEX ix_old",  # allowed below
        ], existing, {"require-concurrent-index-deletion": "tiny table, reviewed"}),
    ]
    found = lint.lint(lint.squawk_binary(), revs, "18.0", "error")
    got = sorted((f.severity, f.rule, f.statement) for f in found)
    assert got == [("error", "require-concurrent-index-creation", "CREATE INDEX ix_acc ON accounts (b)"),
                   ("note", "require-concurrent-index-deletion", "DROP INDEX ix_old")]
    warned = lint.lint(lint.squawk_binary(), revs, "18.0", "warn")
    assert sorted(f.severity for f in warned) == ["note", "warning"]


def test_fingerprint_is_the_same_on_every_major_and_diffs_read_well(clusters) -> None:
    extra = ["CREATE TYPE mood AS ENUM ('ok', 'meh')", "CREATE DOMAIN cents AS bigint CHECK (VALUE >= 0)",
             "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END'",
             "CREATE TRIGGER orders_touch BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION touch()",
             "GRANT SELECT ON orders TO PUBLIC", "ALTER TABLE orders ENABLE ROW LEVEL SECURITY",
             "CREATE POLICY mine ON orders USING (customer_id > 0)"]
    prints = []
    for major in MAJORS:
        pg = clusters.get(major)
        name = f"fp_{major}_{int(time.time() * 1000) % 10**8}"
        pg.psql(f"CREATE DATABASE {name}")
        try:
            engine = sa.create_engine(pg.url(name, driver="postgresql+psycopg2"), poolclass=sa.pool.NullPool)
            with engine.connect() as conn:
                cfg = Config(str(REPO / "alembic.ini"))
                cfg.attributes.update(connection=conn, configure_logger=False)
                command.upgrade(cfg, "head")
                for statement in extra:
                    conn.exec_driver_sql(statement)
                conn.commit()
                prints.append(fingerprint.read(conn, [(None, "alembic_version")]))
            engine.dispose()
        finally:
            pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=False)
    assert all(p == prints[0] for p in prints)
    assert prints[0]["type"] == {"public.cents": "domain bigint", "public.mood": "enum ('ok', 'meh')"}
    assert "alembic_version" not in " ".join(prints[0]["relation"])
    changed = {s: dict(v) for s, v in prints[0].items()}
    changed["column"]["public.orders.total_cents"] = "integer not null"
    del changed["trigger"]["public.orders.orders_touch"]
    assert fingerprint.diff(prints[0], changed) == [
        "~ column public.orders.total_cents: bigint not null -> integer not null",
        "- trigger public.orders.orders_touch (CREATE TRIGGER orders_touch BEFORE UPDATE ON public.orders "
        "FOR EACH ROW EXECUTE FUNCTION public.touch())",
    ]


def test_scratch_names_carry_their_creation_time() -> None:
    from runner.verify import scratch

    m = scratch._NAME.match("runner_verify_20260101120000_1a2b3c4d")
    assert m and calendar.timegm(time.strptime(m.group(1), "%Y%m%d%H%M%S")) == 1767268800
    assert not scratch._NAME.match("runner_verify_app")  # someone else's: never swept


def test_compose_verify_service_is_wired() -> None:
    import yaml

    services = yaml.safe_load((REPO / "docker-compose.yaml").read_text())["services"]
    verify = services["verify"]
    assert verify["build"]["target"] == "verify" and verify["command"][0] == "verify"
    assert verify["depends_on"]["db"]["condition"] == "service_healthy"
    assert verify["environment"]["VERIFY_DATABASE_URL"].endswith("@db:5432/postgres")
    assert verify["read_only"] is True and verify["restart"] == "no"


def test_revisions_run_as_a_least_privilege_role(pg: Cluster) -> None:
    """A downgrade that drops another database and a revision that runs a program on the server
    both fail as findings; nothing outside the scratch database changes, and the throwaway role
    is gone afterwards."""
    victim, marker = f"victim_{int(time.time() * 1000) % 10**8}", pg.root / "pwned"
    pg.psql(f"CREATE DATABASE {victim}")
    try:
        r = run_runner(["verify", "--format", "json"], verify_env(
            pg, ALEMBIC_CONFIG=HOSTILE, VERIFY_LINT="off", HOSTILE_VICTIM=victim, HOSTILE_MARKER=str(marker)))
        assert r.code == 13, r.err
        failed = {f["revision"]: f["message"] for f in report(r)["findings"] if f["check"] == "migration"}
        assert failed.keys() == {"x001", "x002"}, failed
        assert failed["x001"].startswith("downgrade failed: InsufficientPrivilege: must be owner of database")
        assert failed["x002"].startswith("upgrade failed: InsufficientPrivilege: permission denied to COPY "
                                         "to or from an external program")
        assert "a role that owns only the scratch database" in failed["x002"]
        assert pg.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{victim}'") == "1"
        assert not marker.exists()
        assert scratch_databases(pg) == [] and scratch_roles(pg) == []
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {victim}", check=False)


def test_template_setup_and_extensions_start_the_chain_where_it_starts(pg: Cluster, tmp_path: Path) -> None:
    """A chain whose first revision alters a table the application creates itself: from a
    template (objects handed to the revisions' role) or from a setup script; an untrusted
    extension created by the admin connection first."""
    template = f"tmpl_{int(time.time() * 1000) % 10**8}"
    pg.psql(f"CREATE DATABASE {template}")
    pg.psql("CREATE TABLE legacy (id bigint PRIMARY KEY, name text)", template)
    try:
        setup = str(TEMPLATE_CHAIN.parent / "setup.py")
        for extra in ({"VERIFY_TEMPLATE": template}, {"VERIFY_SETUP": setup}):
            r = run_runner(["verify", "--format", "json"], verify_env(
                pg, ALEMBIC_CONFIG=str(TEMPLATE_CHAIN), VERIFY_LINT="off", VERIFY_EXTENSIONS="bloom",
                **extra))
            assert r.code == 0, (extra, r.out, r.err)
            assert report(r)["summary"]["revisions"] == 1
        # without the extension: the role may not create it, and the finding says what to do
        r = run_runner(["verify", "--format", "json"], verify_env(
            pg, ALEMBIC_CONFIG=str(TEMPLATE_CHAIN), VERIFY_LINT="off", VERIFY_TEMPLATE=template))
        assert r.code == 13, r.err
        [finding] = report(r)["findings"]
        assert "permission denied to create extension" in finding["message"]
        assert "VERIFY_EXTENSIONS" in finding["message"]
        # a stamped template: verify cannot start from base
        pg.psql("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY); "
                "INSERT INTO alembic_version VALUES ('t001')", template)
        r = run_runner(["verify"], verify_env(pg, ALEMBIC_CONFIG=str(TEMPLATE_CHAIN), VERIFY_LINT="off",
                                              VERIFY_TEMPLATE=template, VERIFY_EXTENSIONS="bloom"))
        assert r.code == 2 and "already at t001" in r.err and "Traceback" not in r.err, r.err
        assert scratch_databases(pg) == [] and scratch_roles(pg) == []
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {template}", check=False)


def test_setup_sql_runs_plain_sql_as_the_role(pg: Cluster, database: Database, tmp_path: Path) -> None:
    from runner.verify import prepare

    script = tmp_path / "setup.sql"
    script.write_text("\\restrict abc\nCREATE TABLE a (id int);\n-- 100% plain SQL\n"
                      "INSERT INTO a VALUES (1), (2);\n\\unrestrict abc\n")
    engine = sa.create_engine(pg.url(database.name, driver="postgresql+psycopg2"), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        prepare.setup(conn, script)
    assert database.sql("SELECT count(*) FROM a") == "2"
    script.write_text("CREATE TABLE b (id int);\n\\i other.sql\n")
    with engine.connect() as conn, pytest.raises(ConfigError) as err:
        prepare.setup(conn, script)
    assert "line 2 is a psql meta-command (\\i)" in str(err.value)
    script.write_text("CREATE TABLE c (id int); SELECT 1/0;")
    with engine.connect() as conn, pytest.raises(ConfigError) as err:
        prepare.setup(conn, script)
    assert "DivisionByZero" in str(err.value) and database.sql("SELECT to_regclass('c')") == ""
    engine.dispose()


def test_a_named_role_must_be_least_privilege(pg: Cluster) -> None:
    pg.psql(f"CREATE ROLE ci_migrator LOGIN PASSWORD '{APP_PASSWORD}'; "
            f"CREATE ROLE ci_creator LOGIN CREATEDB PASSWORD '{APP_PASSWORD}'")
    try:
        r = run_runner(["verify"], verify_env(pg, VERIFY_LINT="off", VERIFY_ROLE_URL=pg.url(
            "postgres", user="ci_migrator", password=APP_PASSWORD)))
        assert "role=ci_migrator" in r.err and "Traceback" not in r.err, r.err
        assert "verify: 5 revision(s) round-tripped" in r.out, r.out
        assert scratch_roles(pg) == []
        assert pg.psql("SELECT count(*) FROM pg_roles WHERE rolname = 'ci_migrator'") == "1"
        r = run_runner(["verify"], verify_env(pg, VERIFY_LINT="off", VERIFY_ROLE_URL=pg.url(
            "postgres", user="ci_creator", password=APP_PASSWORD)))
        assert r.code == 2 and "VERIFY_ROLE_URL: the role ci_creator has CREATEDB" in r.err, r.err
        assert scratch_databases(pg) == []
    finally:
        pg.psql("DROP ROLE IF EXISTS ci_migrator; DROP ROLE IF EXISTS ci_creator", check=False)


@pytest.mark.every_major
def test_an_admin_with_createdb_and_createrole_is_enough(pg: Cluster) -> None:
    """No superuser anywhere: the CI example's admin role (PostgreSQL 16 changed what CREATEROLE
    may do with the roles it creates)."""
    pg.psql(f"CREATE ROLE verify_admin LOGIN CREATEDB CREATEROLE PASSWORD '{APP_PASSWORD}'")
    try:
        env = verify_env(pg, VERIFY_LINT="off", VERIFY_DATABASE_URL=pg.url(
            "postgres", user="verify_admin", password=APP_PASSWORD))
        r = run_runner(["verify"], env)
        assert "verify: 5 revision(s) round-tripped" in r.out and "Traceback" not in r.err, r.err
        assert scratch_databases(pg) == [] and scratch_roles(pg) == []
    finally:
        pg.psql("DROP ROLE IF EXISTS verify_admin", check=False)


def test_locks_and_rewrites_hidden_from_the_lint_are_observed(pg: Cluster) -> None:
    """ALTER COLUMN ... TYPE inside a DO block and inside a PL/pgSQL function: Squawk sees `DO $$`
    and `SELECT widen_id()`, PostgreSQL rewrites the tables under ACCESS EXCLUSIVE. Upgrades
    only (VERIFY_ROUNDTRIP=off)."""
    r = run_runner(["verify", "--format", "json"], verify_env(pg, ALEMBIC_CONFIG=HIDDEN,
                                                               VERIFY_ROUNDTRIP="off"))
    assert r.code == 13, r.err
    doc = report(r)
    assert sorted(findings(doc)) == [("error", "locks", "h002", "table-rewrite")] * 2 + [
        ("error", "locks", "h003", "table-rewrite"), ("error", "locks", "h004", "table-rewrite")]
    # ... and nothing from the lint
    assert doc["summary"]["statements_linted"] >= 4 and doc["summary"]["upgraded"] == 4
    for f in doc["findings"]:
        assert f["observed"]["lock"] == "ACCESS EXCLUSIVE" and f["observed"]["rewrite"] is True
        # the arguments come from how the schema changed (no statement names them)
        table, column, type_ = {("h002", "public.accounts"): ("accounts", "amount", "sa.BigInteger()"),
                                ("h002", "public.tiny"): ("tiny", "v", "sa.BigInteger()"),
                                ("h003", "public.tiny"): ("tiny", "id", "sa.Numeric()"),
                                ("h004", "public.accounts"): ("accounts", "points", "sa.BigInteger()")}[
            (f["revision"], f["observed"]["relation"])]
        new = f"{column}_new"
        assert f["instead"] == (f"op.alter_column_type_expand('{table}', '{column}', '{new}', {type_}), "
                                f"then op.alter_column_type_contract('{table}', '{column}', '{new}') in a "
                                'post-deploy revision (runner_phase = "post-deploy")'), f["instead"]
    seen = sorted((f["revision"], f["observed"]["relation"], f["observed"]["sampled"])
                  for f in doc["findings"])
    assert seen == [
        ("h002", "public.accounts", False), ("h002", "public.tiny", False), ("h003", "public.tiny", False),
        ("h004", "public.accounts", True)]  # outside a transaction: sampled from a second connection
    assert scratch_databases(pg) == [] and scratch_roles(pg) == []


def test_against_weighs_by_live_sizes_read_only_without_locks(pg: Cluster, database: Database) -> None:
    """--against: a rewrite of a table with rows (really ANALYZEd) is an error once its estimated
    hold exceeds VERIFY_MAX_LOCK_HOLD (lowered to 1 ms: no 10 GB table in a test); the same on an
    empty table is a note, unless the same transaction holds its lock while it rewrites the big
    one. Read by a read-only role while another session holds ACCESS EXCLUSIVE
    on the empty table: its size comes from catalog and statistics reads, no lock, nothing
    written. (The drift check's deparsers would take ACCESS SHARE on a table with an index or a
    default: tiny has neither.)"""
    assert run_runner(["upgrade", "--to", "h001"], runner_env(database.url, ALEMBIC_CONFIG=HIDDEN)).code == 0
    database.sql("INSERT INTO accounts SELECT g, md5(g::text), g, g FROM generate_series(1, 20000) g; "
                 "ANALYZE accounts; ANALYZE tiny")
    database.sql(f"CREATE ROLE reader LOGIN PASSWORD '{APP_PASSWORD}'; "
                 "GRANT SELECT ON alembic_version TO reader; "
                 "ALTER ROLE reader SET default_transaction_read_only = on")
    holder = psycopg2.connect(database.url)
    try:
        holder.cursor().execute("LOCK TABLE tiny IN ACCESS EXCLUSIVE MODE")  # held until rollback
        r = run_runner(["verify", "--against", "LIVE_URL", "--format", "json"], verify_env(
            pg, ALEMBIC_CONFIG=HIDDEN, VERIFY_ROUNDTRIP="off", VERIFY_LINT="off", VERIFY_MAX_LOCK_HOLD="1ms",
            LIVE_URL=pg.url(database.name, user="reader", password=APP_PASSWORD)), timeout=60)
    finally:
        holder.rollback()
        holder.close()
        pg.psql("DROP ROLE IF EXISTS reader", check=False)
    assert r.code == 13, r.err
    doc = report(r)
    found = {(f["revision"], f["observed"]["relation"]): f for f in doc["findings"] if f["check"] == "locks"}
    assert {k: f["severity"] for k, f in found.items()} == {("h002", "public.accounts"): "error",
                                                            ("h002", "public.tiny"): "error",
                                                            ("h003", "public.tiny"): "note",
                                                            ("h004", "public.accounts"): "error"}, found
    big = found[("h002", "public.accounts")]
    assert big["observed"]["live_rows"] == 20000 and big["observed"]["live_bytes"] > 1_000_000
    assert big["observed"]["estimated_hold_s"] > 0.001
    assert "> VERIFY_MAX_LOCK_HOLD 1 ms" in big["message"] and "20.0k rows" in big["message"]
    # empty, but its ACCESS EXCLUSIVE is held while accounts is rewritten in the same transaction
    assert "live: 0 B, 0 rows; estimated hold" in found[("h002", "public.tiny")]["message"]
    held = found[("h002", "public.tiny")]["observed"]["estimated_hold_s"]
    assert held == big["observed"]["estimated_hold_s"]
    assert found[("h003", "public.tiny")]["message"].endswith(
        "live: 0 B, 0 rows; estimated hold <1 ms <= VERIFY_MAX_LOCK_HOLD 1 ms")
    assert set(doc["summary"]["rates_mb_s"]) == {"rewrite", "build", "scan"}
    assert database.version() == "h001" and database.sql("SELECT count(*) FROM accounts") == "20000"
    assert scratch_databases(pg) == [] and scratch_roles(pg) == []
