"""Every preflight refusal exits 7 with a plain sentence and changes nothing."""

from __future__ import annotations

from tests.conftest import REPO, Database, run_runner, runner_env

TWO_HEADS = str(REPO / "tests/scenarios/twoheads/alembic.ini")


def _one_line_error(err: str) -> str:
    failed = [line for line in err.splitlines() if "ERROR" in line]
    assert len(failed) == 1, err
    assert "Traceback" not in err
    return failed[0]


def test_multiple_heads_refused(database: Database) -> None:
    r = run_runner(["upgrade"], runner_env(database.url, ALEMBIC_CONFIG=TWO_HEADS))
    assert r.code == 7
    assert "2 heads (h002, h003)" in _one_line_error(r.err) and "alembic merge heads" in r.err
    assert database.tables() == set()


def test_unknown_revision_in_database_refused(database: Database) -> None:
    env = runner_env(database.url)
    assert run_runner(["upgrade", "--to", "0002"], env).code == 0
    database.sql("UPDATE alembic_version SET version_num = '9999'")
    before = database.tables()
    for args in (["upgrade"], ["downgrade", "--to", "-1"]):
        r = run_runner(args, env)
        assert r.code == 7, r.err
        assert "9999" in r.err and "image is older than the database" in _one_line_error(r.err)
    assert database.tables() == before and database.version() == "9999"


def test_unknown_target_refused(database: Database) -> None:
    r = run_runner(["upgrade", "--to", "abcdef"], runner_env(database.url))
    assert r.code == 7 and "target revision abcdef is not in the migration scripts" in r.err
    assert database.tables() == set()


def test_downgrade_target_not_an_ancestor_refused(database: Database) -> None:
    env = runner_env(database.url)
    assert run_runner(["upgrade", "--to", "0002"], env).code == 0
    r = run_runner(["downgrade", "--to", "0004"], env)
    assert r.code == 7 and "not an ancestor" in _one_line_error(r.err)
    assert database.version() == "0002"


def test_upgrade_target_older_than_database_refused(database: Database) -> None:
    env = runner_env(database.url)
    assert run_runner(["upgrade"], env).code == 0
    r = run_runner(["upgrade", "--to", "0002"], env)
    assert r.code == 7 and "use 'downgrade --to 0002'" in r.err
    base = run_runner(["upgrade", "--to", "base"], env)
    assert base.code == 7 and "use 'downgrade --to base --yes'" in _one_line_error(base.err)
    assert database.version() == "0005"


def test_relative_downgrade_past_base_refused(database: Database) -> None:
    env = runner_env(database.url)
    assert run_runner(["upgrade", "--to", "0002"], env).code == 0
    r = run_runner(["downgrade", "--to", "-3"], env)
    assert r.code == 7 and "goes past base" in r.err
    assert database.version() == "0002"
