"""verify understands the online operations (issue 24, item 3): it round-trips a chain of them on
the scratch database as its least-privilege role, observes each of their steps (no false hazard:
only the locks docs/online.md says), lints none of their own SQL, reports a contract in a
pre-deploy revision and the phase order runner.phases refuses, and names the online operation,
with its arguments, that replaces each blocking statement. Real PostgreSQL, real Squawk."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from runner.verify import instead, lint
from tests.conftest import REPO, Database, run_runner, runner_env
from tests.pgcluster import Cluster
from tests.test_verify import findings, report, scratch_databases, scratch_roles, verify_env

ONLINE = REPO / "tests/scenarios/online"
PHASES = REPO / "tests/scenarios/phases"
POST = 'in a post-deploy revision (runner_phase = "post-deploy")'


def steps(doc: dict, revision: str, operation: str) -> list[list[tuple[str, str, bool, bool]]]:
    """What each step of one online operation held, in order: [(table, lock, scan, rewrite)] per
    step (ACCESS SHARE reads left out)."""
    by_step: dict[int, list[tuple[str, str, bool, bool]]] = {}
    for row in doc["observed"]:
        if (row["revision"], row["step"], row["operation"]) == (revision, "upgrade", operation) \
                and row["lock"] != "ACCESS SHARE":
            by_step.setdefault(row["transaction"], []).append(
                (row["relation"], row["lock"], row["scan"], row["rewrite"]))
    return [sorted(by_step[t]) for t in sorted(by_step)]


@pytest.mark.every_major
def test_an_online_chain_verifies_clean_and_its_steps_hold_what_the_docs_say(pg: Cluster) -> None:
    """tests/scenarios/online (every online operation, their inverses in the downgrades, a
    backfill, a post-deploy contract): exit 0, no finding. Its backfill state table is the runner's
    (no round-trip difference); the operations' own SQL (BEGIN/COMMIT of their short transactions,
    the drops of the contract) is not linted; each step is observed in its own transaction, as
    the revisions' role, and holds what docs/online.md says: the scans run under SHARE UPDATE
    EXCLUSIVE only, nothing is rewritten, SET NOT NULL after the validated check reads nothing."""
    r = run_runner(["verify", "--format", "json"], verify_env(pg, ALEMBIC_CONFIG=str(ONLINE / "alembic.ini")))
    assert r.code == 0, r.err
    doc = report(r)
    assert doc["findings"] == []
    s = doc["summary"]
    assert (s["revisions"], s["errors"], s["warnings"], s["notes"]) == (5, 0, 0, 0)
    assert s["online_operations"] == 11 and s["online_statements"] > 100
    assert s["statements_linted"] < 10  # n001's CREATE TABLE and INSERT: none of the operations'
    assert doc["online_operations"]["n005"] == ["rename_column_contract(accounts, email, email_address)",
                                                "alter_column_type_contract(orders, amount, amount_cents)"]
    ae, sue = "ACCESS EXCLUSIVE", "SHARE UPDATE EXCLUSIVE"
    orders, accounts = "public.orders", "public.accounts"
    # CHECK (c IS NOT NULL) NOT VALID -> VALIDATE (the scan, reads and writes go on) -> SET NOT NULL
    # with the check dropped: ACCESS EXCLUSIVE again, and no scan this time
    assert steps(doc, "n003", "set_not_null_online(orders, account_id)") == [
        [(orders, ae, False, False)], [(orders, sue, True, False)], [(orders, ae, False, False)]]
    add, validate = steps(doc, "n003", "create_foreign_key_online(fk_orders_account, orders, accounts)")
    assert add == [(accounts, "SHARE ROW EXCLUSIVE", False, False),
                   (orders, "SHARE ROW EXCLUSIVE", False, False)]
    assert [s[:2] for s in validate] == [(accounts, "ROW SHARE"), (orders, sue)]
    assert validate[1][2]  # orders read in full, under SHARE UPDATE EXCLUSIVE
    assert steps(doc, "n005", "rename_column_contract(accounts, email, email_address)") == [
        [(accounts, ae, False, False)], [(accounts, sue, True, False)], [(accounts, ae, False, False)]]
    upgrades = [row for row in doc["observed"] if row["step"] == "upgrade"]
    assert upgrades and all(row["operation"] for row in upgrades if row["revision"] != "n001")
    assert not any(row["rewrite"] or row["scan_under_lock"] for row in doc["observed"])
    assert not any("runner_backfills" in row["relation"] for row in doc["observed"])
    assert scratch_databases(pg) == [] and scratch_roles(pg) == []


def test_contracts_before_the_rollout_and_the_phase_order(pg: Cluster, tmp_path: Path) -> None:
    """The same chain with n005's runner_phase removed and its type contract done by hand
    (op.drop_column, which leaves the sync trigger), then a post-deploy n006 and a pre-deploy
    n007 on top: each contract of the pre-deploy n005 is an error, the trigger left behind is one
    too, and n007 is the order the pre-deploy Job refuses (a chain warning)."""
    chain = tmp_path / "online"
    shutil.copytree(ONLINE, chain, ignore=shutil.ignore_patterns("__pycache__"))
    n005 = chain / "versions/n005_contract.py"
    text = n005.read_text().replace('runner_phase = "post-deploy"\n', "")
    n005.write_text(text.replace('op.alter_column_type_contract("orders", "amount", "amount_cents", '
                                 'server_default=sa.text("0"))', 'op.drop_column("orders", "amount")'))
    for rev, down, phase in (("n006", "n005", 'runner_phase = "post-deploy"'), ("n007", "n006", "")):
        (chain / f"versions/{rev}.py").write_text(
            f'from alembic import op\n\nrevision = "{rev}"\ndown_revision = "{down}"\n{phase}\n\n\n'
            f'def upgrade() -> None:\n    op.execute("CREATE TABLE {rev}_done (x int)")\n\n\n'
            f'def downgrade() -> None:\n    op.execute("DROP TABLE {rev}_done")\n')
    r = run_runner(["verify", "--format", "json"], verify_env(pg, ALEMBIC_CONFIG=str(chain / "alembic.ini"),
                                                               VERIFY_ROUNDTRIP="off"))
    assert r.code == 13, r.err
    doc = report(r)
    assert sorted(f for f in findings(doc) if f[1] != "locks") == [
        ("error", "lint", "n005", "ban-drop-column"),
        ("error", "phase", "n005", "contract-before-rollout"),
        ("error", "phase", "n005", "contract-trigger-left"),
        ("warning", "chain", "n007", "phase-order")]
    found = {f["rule"]: f for f in doc["findings"]}
    assert found["contract-before-rollout"]["message"].startswith(
        "rename_column_contract(accounts, email, email_address) in a pre-deploy revision: it drops a column "
        "that the previous release, still running during the rollout, reads and writes")
    left = found["contract-trigger-left"]
    assert "leaves its sync trigger orders_amount_amount_cents_sync" in left["message"]
    assert "every INSERT and UPDATE of public.orders fails" in left["message"]
    assert left["instead"].startswith(
        f"op.alter_column_type_contract('orders', 'amount', 'amount_cents') {POST}")
    assert found["ban-drop-column"]["instead"] == 'a post-deploy revision (runner_phase = "post-deploy")'
    assert found["phase-order"]["message"].startswith(
        "pre-deploy revision n007 descends from post-deploy revision(s) n006: the pre-deploy Job "
        "refuses n007 (exit 7) while n006 has not run, so the two cannot ship in one release")
    assert found["phase-order"]["file"].endswith("versions/n007.py")
    assert scratch_databases(pg) == [] and scratch_roles(pg) == []


def test_statements_a_rerun_would_repeat_before_an_online_operation(pg: Cluster, tmp_path: Path) -> None:
    """An online operation commits what its revision did before it: a revision that creates a
    table, then builds an index on it online, fails on its rerun after a crash mid-build ('already
    exists'). A warning names it; an IF NOT EXISTS statement, and statements after the operation,
    are rerunnable and not named; the rest of the chain has none."""
    chain = tmp_path / "online"
    shutil.copytree(ONLINE, chain, ignore=shutil.ignore_patterns("__pycache__"))
    (chain / "versions/n006.py").write_text(
        'from alembic import op\n\nrevision = "n006"\ndown_revision = "n005"\n'
        'runner_phase = "post-deploy"  # after n005, a post-deploy revision\n\n\n'
        'def upgrade() -> None:\n'
        '    op.execute("CREATE TABLE IF NOT EXISTS n006_ok (x int)")\n'
        '    op.execute("CREATE TABLE n006_once (x int)")\n'
        '    op.create_index_online("ix_n006_once", "n006_once", ["x"])\n'
        '    op.execute("CREATE TABLE n006_after (x int)")\n\n\n'
        'def downgrade() -> None:\n'
        '    op.drop_index_online("ix_n006_once", "n006_once")\n'
        '    op.execute("DROP TABLE n006_after")\n'
        '    op.execute("DROP TABLE n006_once")\n'
        '    op.execute("DROP TABLE n006_ok")\n')
    r = run_runner(["verify", "--format", "json"], verify_env(pg, ALEMBIC_CONFIG=str(chain / "alembic.ini")))
    assert r.code == 0, r.err  # a warning: the revision works, its rerun after a crash would not
    doc = report(r)
    assert [f for f in findings(doc) if f[1] != "locks"] == [("warning", "rerun", "n006", "before-online")]
    (found,) = [f for f in doc["findings"] if f["check"] == "rerun"]
    assert found["message"].startswith("1 statement(s) before create_index_online(ix_n006_once, "
                                       "n006_once) (CREATE TABLE n006_once (x int)) are committed")
    assert found["file"].endswith("versions/n006.py")


def test_the_phase_order_against_the_live_database(pg: Cluster, database: Database) -> None:
    """tests/scenarios/phases, release 2 (p004, pre-deploy, on top of release 1's post-deploy p003):
    with --against a database where p003 ran, nothing is pending out of order; where only the
    pre-deploy phase ran (p002), the next pre-deploy Job refuses p004: a warning naming it. What
    upgrade refuses at run time is the same rule (runner.phases)."""
    ini = str(PHASES / "next.ini")
    quiet = dict(ALEMBIC_CONFIG=ini, VERIFY_LINT="off", VERIFY_LOCKS="off", VERIFY_ROUNDTRIP="off",
                 LIVE_URL=database.url)
    env = runner_env(database.url, ALEMBIC_CONFIG=ini)
    assert run_runner(["upgrade", "--phase", "pre-deploy", "--to", "p002"], env).code == 0
    verify = ["verify", "--against", "LIVE_URL", "--format", "json"]
    behind = report(run_runner(verify, verify_env(pg, **quiet)))
    assert [f for f in findings(behind) if f[1] == "chain"] == [("warning", "chain", "p004", "phase-order")]
    assert "the live database has not run p003: the next pre-deploy Job refuses p004 (exit 7)" in \
        behind["findings"][0]["message"]
    refused = run_runner(["upgrade", "--phase", "pre-deploy"], env)
    assert refused.code == 7 and "p004" in refused.err  # what verify warned about
    assert run_runner(["upgrade", "--phase", "post-deploy", "--to", "p003"], env).code == 0
    caught_up = report(run_runner(verify, verify_env(pg, **quiet)))
    assert [f for f in findings(caught_up) if f[1] == "chain"] == []
    assert scratch_databases(pg) == [] and scratch_roles(pg) == []


# -- use instead: the online operation, with its arguments (in-process) --------------------------------
POST_DEPLOY = 'a post-deploy revision (runner_phase = "post-deploy")'


@pytest.mark.parametrize("rule,statement,expected", [
    ("require-concurrent-index-creation", "CREATE INDEX ix_a ON accounts (email)",
     "op.create_index_online('ix_a', 'accounts', ['email'])"),
    ("require-concurrent-index-creation",
     "CREATE UNIQUE INDEX ix_b ON billing.accounts USING gin (email, lower(name)) WHERE email IS NOT NULL",
     "op.create_index_online('ix_b', 'accounts', ['email', sa.text('lower(name)')], schema='billing', "
     "unique=True, postgresql_using='gin', postgresql_where=sa.text('email IS NOT NULL'))"),
    ("require-concurrent-index-deletion", "DROP INDEX IF EXISTS ix_a", "op.drop_index_online('ix_a')"),
    ("adding-foreign-key-constraint", "ALTER TABLE orders ADD CONSTRAINT fk_o FOREIGN KEY (account_id) "
     "REFERENCES accounts (id) ON DELETE CASCADE",
     "op.create_foreign_key_online('fk_o', 'orders', 'accounts', ['account_id'], ['id'], "
     "ondelete='CASCADE')"),
    ("constraint-missing-not-valid",
     "ALTER TABLE orders ADD FOREIGN KEY (account_id) REFERENCES accounts (id)",
     "op.create_foreign_key_online('orders_account_id_fkey', 'orders', 'accounts', ['account_id'], "
     "['id'])"),
    ("constraint-missing-not-valid", "ALTER TABLE orders ADD CONSTRAINT ck_amount CHECK (amount >= 0)",
     "op.create_check_constraint_online('ck_amount', 'orders', 'amount >= 0')"),
    ("constraint-missing-not-valid", "ALTER TABLE orders ADD CONSTRAINT uq_ref UNIQUE (ref)",
     "op.create_unique_constraint_online('uq_ref', 'orders', ['ref'])"),
    ("constraint-missing-not-valid", "ALTER TABLE orders ADD PRIMARY KEY (id)", None),  # no online form
    ("constraint-missing-not-valid", "ALTER TABLE orders VALIDATE CONSTRAINT ck_amount",
     "op.create_foreign_key_online or op.create_check_constraint_online (each validates in a transaction "
     "of its own)"),
    ("disallowed-unique-constraint", "ALTER TABLE orders ADD CONSTRAINT uq_ref UNIQUE (ref, \"Kind\")",
     "op.create_unique_constraint_online('uq_ref', 'orders', ['ref', 'Kind'])"),
    ("adding-not-nullable-field", "ALTER TABLE accounts ALTER COLUMN email SET NOT NULL",
     "op.set_not_null_online('accounts', 'email')"),
    ("adding-field-with-default", "ALTER TABLE accounts ADD COLUMN ref uuid DEFAULT gen_random_uuid()",
     "op.add_column_online('accounts', sa.Column('ref', sa.Uuid(), "
     "server_default=sa.text('gen_random_uuid()')))"),
    ("adding-field-with-default", "ALTER TABLE accounts ADD COLUMN g int GENERATED ALWAYS AS (id * 2) STORED",
     None),  # a generated column: PostgreSQL writes it, no online form
    ("adding-required-field", "ALTER TABLE accounts ADD COLUMN code varchar(8) NOT NULL",
     "op.add_column_online('accounts', sa.Column('code', sa.String(8), nullable=False, server_default=...))"),
    ("renaming-column", "ALTER TABLE accounts RENAME COLUMN email TO email_address",
     "op.rename_column_expand('accounts', 'email', 'email_address'), then "
     f"op.rename_column_contract('accounts', 'email', 'email_address') in {POST_DEPLOY}"),
    ("changing-column-type", "ALTER TABLE orders ALTER COLUMN amount TYPE bigint USING amount * 100",
     "op.alter_column_type_expand('orders', 'amount', 'amount_new', sa.BigInteger(), using='amount * 100'), "
     f"then op.alter_column_type_contract('orders', 'amount', 'amount_new') in {POST_DEPLOY}"),
    ("ban-drop-column", "ALTER TABLE accounts DROP COLUMN legacy", POST_DEPLOY),
    ("adding-serial-primary-key-field", "ALTER TABLE accounts ADD PRIMARY KEY (id)", None),
])
def test_each_blocking_rule_names_the_online_operation(rule: str, statement: str,
                                                       expected: str | None) -> None:
    assert instead.for_rule(rule, statement) == expected


def test_every_rule_the_blocking_statements_raise_has_its_hint() -> None:
    """Run Squawk on the blocking form of each operation's job: every rule it raises names the
    operation (or says there is none), and each name is registered with Alembic."""
    from alembic.operations import Operations

    import runner.online  # noqa: F401 - registers op.*_online

    statements = ["CREATE INDEX ix_a ON accounts (email)", "DROP INDEX ix_a",
                  "ALTER TABLE accounts ADD CONSTRAINT fk_a FOREIGN KEY (plan_id) REFERENCES plans (id)",
                  "ALTER TABLE accounts ADD CONSTRAINT ck_a CHECK (amount >= 0)",
                  "ALTER TABLE accounts ADD CONSTRAINT uq_a UNIQUE (email)",
                  "ALTER TABLE accounts ALTER COLUMN email SET NOT NULL",
                  "ALTER TABLE accounts ADD COLUMN ref uuid DEFAULT gen_random_uuid()",
                  "ALTER TABLE accounts ADD COLUMN ref2 text NOT NULL",
                  "ALTER TABLE accounts RENAME COLUMN email TO email_address",
                  "ALTER TABLE accounts ALTER COLUMN id TYPE bigint",
                  "ALTER TABLE accounts DROP COLUMN legacy"]
    rev = lint.RevisionSql("a1", "a1.py", statements, {"accounts", "public.accounts", "ix_a"}, {})
    found = lint.lint(lint.squawk_binary(), [rev], "18.0", "error")
    assert {f.rule for f in found} >= {
        "require-concurrent-index-creation", "require-concurrent-index-deletion",
        "adding-foreign-key-constraint",
        "constraint-missing-not-valid", "disallowed-unique-constraint", "adding-not-nullable-field",
        "adding-field-with-default", "adding-required-field", "renaming-column", "changing-column-type",
        "ban-drop-column"}
    registered = {name for name in dir(Operations) if not name.startswith("_")}
    for f in found:
        assert f.instead, f
        for name in (n.split("(")[0].removeprefix("op.") for n in f.instead.split() if n.startswith("op.")):
            assert name in registered, (f.rule, name)
    # a post-deploy revision: dropping what only the previous release used is a note there
    contract = lint.RevisionSql("a2", "a2.py", statements[-1:], {"accounts"}, {}, post_deploy=True)
    done = lint.lint(lint.squawk_binary(), [contract], "18.0", "error")
    assert [(f.severity, f.rule) for f in done] == [("note", "ban-drop-column")]


def test_use_instead_read_from_schema_changes() -> None:
    """Observed locks carry no statement: the operation and its arguments come from how the
    revision changed the schema (the fingerprints before and after it)."""
    before = {"column": {"public.t.a": "integer", "public.t.b": "text", "public.t.c": "text"},
              "index": {"public.old": "CREATE INDEX old ON public.t USING btree (c)"}, "constraint": {}}
    after = {"column": {"public.t.a": "bigint", "public.t.b": "text not null", "public.t.d": "text",
                        "public.t.e": "uuid default gen_random_uuid()"},
             "index": {"public.ix": "CREATE INDEX ix ON public.t USING btree (b)",
                       "public.ux": "CREATE UNIQUE INDEX ux ON public.t USING btree (a)",
                       "public.uq": "CREATE UNIQUE INDEX uq ON public.t USING btree (d)"},
             "constraint": {"public.t.fk": "FOREIGN KEY (a) REFERENCES public.u(id) ON DELETE CASCADE",
                            "public.t.ck": "CHECK ((a > 0)) NOT VALID", "public.t.uq": "UNIQUE (d)"}}
    changes = instead.changes(before, after)
    calls = {c.kind: c.call for c in changes}
    assert calls == {
        "type": "op.alter_column_type_expand('t', 'a', 'a_new', sa.BigInteger()), then "
                f"op.alter_column_type_contract('t', 'a', 'a_new') in {POST_DEPLOY}",
        "not-null": "op.set_not_null_online('t', 'b')",
        "rename-column": "op.rename_column_expand('t', 'c', 'd'), then "
                         f"op.rename_column_contract('t', 'c', 'd') in {POST_DEPLOY}",
        "add-column": "op.add_column_online('t', sa.Column('e', sa.Uuid(), server_default=sa.text("
                      "'gen_random_uuid()')))",
        "index": "op.create_index_online('ix', 't', ['b'])",
        "unique-index": "op.create_index_online('ux', 't', ['a'], unique=True)",  # uq is the constraint's
        "drop-index": "op.drop_index_online('old', 't')",
        "foreign-key": "op.create_foreign_key_online('fk', 't', 'u', ['a'], ['id'], ondelete='CASCADE')",
        "check": "op.create_check_constraint_online('ck', 't', 'a > 0')",
        "unique": "op.create_unique_constraint_online('uq', 't', ['d'])"}
    hint = instead.for_observed
    assert hint("table-rewrite", "public.t", downgrade=False, full_update=False, found=changes) == \
        f"{calls['type']} or {calls['add-column']}"
    assert hint("scan-under-lock", "public.t", downgrade=False, full_update=False,
                found=[c for c in changes if c.kind == "index"]) == calls["index"]
    # a downgrade undoes the upgrade: the index it created is dropped
    assert hint("strong-lock", "public.t", downgrade=True, full_update=False,
                found=[c for c in changes if c.kind == "index"]) == "op.drop_index_online('ix', 't')"
    # an UPDATE of every row under ALTER's lock: op.backfill with the revision's own SET and WHERE
    assert hint("scan-under-lock", "public.customers", downgrade=False, full_update=True, found=[],
                statements=["ALTER TABLE customers ADD COLUMN d text",
                            "UPDATE customers SET d = lower(split_part(email, '@', 2)) WHERE d IS NULL"]) == \
        "op.backfill('customers', \"d = lower(split_part(email, '@', 2))\", where='d IS NULL')"
    # the old column of an expand dropped by hand, its trigger left: the contract operation
    expanded = {"column": {"public.t.x": "integer not null", "public.t.x_big": "bigint"},
                "trigger": {"public.t.t_x_x_big_sync": "CREATE TRIGGER t_x_x_big_sync ..."}}
    left = instead.changes(expanded, {"column": {"public.t.x_big": "bigint"}, "trigger": expanded["trigger"]})
    assert [(c.kind, c.call) for c in left] == [
        ("contract-trigger-left", "op.alter_column_type_contract('t', 'x', 'x_big')")]
