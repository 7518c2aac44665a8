"""Bad input: one clear line naming the setting and the fix, exit 2 (or 7), no traceback, no change."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, Database, run_runner, runner_env
from tests.pgcluster import PASSWORD


def _cases(url: str, tmp: str) -> list[tuple[str, list[str], dict[str, str], int, str]]:
    return [
        ("malformed url", ["upgrade"], {"DATABASE_URL": "postgresql://user:pw@host:notaport/db"}, 2,
         "DATABASE_URL"),
        ("garbage url", ["upgrade"], {"DATABASE_URL": "not a url at all"}, 2, "DATABASE_URL"),
        ("mysql url", ["upgrade"], {"DATABASE_URL": "mysql://u:p@127.0.0.1/db"}, 2,
         "only PostgreSQL"),
        ("sqlite url", ["upgrade"], {"DATABASE_URL": "sqlite:///x.db"}, 2, "only PostgreSQL"),
        ("no database name", ["upgrade"], {"DATABASE_URL": url.rsplit("/", 1)[0] + "/"}, 2,
         "append /DBNAME"),
        ("missing url", ["upgrade"], {"DATABASE_URL": ""}, 2, "DATABASE_URL is not set"),
        ("url and url file", ["upgrade"], {"DATABASE_URL_FILE": f"{tmp}/url"}, 2,
         "both set"),
        ("unreadable url file", ["upgrade"], {"DATABASE_URL": "", "DATABASE_URL_FILE": f"{tmp}/nope"},
         2, "DATABASE_URL_FILE"),
        ("missing alembic.ini", ["upgrade"], {"ALEMBIC_CONFIG": f"{tmp}/missing.ini"}, 2,
         "ALEMBIC_CONFIG"),
        ("alembic.ini without section", ["upgrade"], {"ALEMBIC_CONFIG": f"{tmp}/empty.ini"}, 2,
         "[alembic] section"),
        ("bad script_location", ["upgrade"], {"ALEMBIC_CONFIG": f"{tmp}/badloc.ini"}, 2,
         "script_location"),
        ("env.py that fails to import", ["upgrade"], {"ALEMBIC_CONFIG": f"{tmp}/brokenenv/alembic.ini"},
         2, "env.py failed (ModuleNotFoundError"),
        ("unknown command", ["migrate-all"], {}, 2, "invalid choice"),
        ("unknown flag", ["upgrade", "--force"], {}, 2, "unrecognized arguments"),
        ("downgrade without target", ["downgrade"], {}, 2, "--to"),
        ("bad wait timeout", ["upgrade"], {"DB_WAIT_TIMEOUT": "soon"}, 2, "DB_WAIT_TIMEOUT"),
        ("negative lock wait", ["upgrade"], {"LOCK_WAIT_TIMEOUT": "-5"}, 2, "LOCK_WAIT_TIMEOUT"),
        ("bad retry attempts", ["upgrade"], {"LOCK_RETRY_ATTEMPTS": "many"}, 2, "LOCK_RETRY_ATTEMPTS"),
        ("statement below lock timeout", ["upgrade"],
         {"MIGRATION_LOCK_TIMEOUT": "5s", "MIGRATION_STATEMENT_TIMEOUT": "2s"}, 2,
         "MIGRATION_STATEMENT_TIMEOUT"),
        ("bad log format", ["upgrade"], {"LOG_FORMAT": "xml"}, 2, "LOG_FORMAT"),
        ("bad flag value", ["--wait-timeout", "x", "upgrade"], {}, 2, "DB_WAIT_TIMEOUT"),
        ("bad flag value after command", ["status", "--lock-wait-timeout", "soon"], {}, 2,
         "LOCK_WAIT_TIMEOUT"),
        ("base without yes", ["downgrade", "--to", "base"], {}, 2, "--yes"),
        ("unknown target", ["upgrade", "--to", "nope"], {}, 7, "not in the migration scripts"),
    ]


@pytest.fixture
def bad_inputs(tmp_path, database: Database):
    (tmp_path / "url").write_text(database.url)
    (tmp_path / "empty.ini").write_text("[other]\nx = 1\n")
    (tmp_path / "badloc.ini").write_text("[alembic]\nscript_location = /nonexistent/migrations\n")
    broken = tmp_path / "brokenenv"
    (broken / "versions").mkdir(parents=True)
    (broken / "alembic.ini").write_text("[alembic]\nscript_location = %(here)s\n")
    (broken / "env.py").write_text("import app_models_not_installed  # noqa\n")
    (broken / "versions" / "b001.py").write_text("revision = 'b001'\ndown_revision = None\n")
    return _cases(database.url, str(tmp_path))


def test_bad_inputs(bad_inputs, database: Database) -> None:
    assert len(bad_inputs) >= 15
    for name, args, extra, code, needle in bad_inputs:
        r = run_runner(args, runner_env(database.url, **extra))
        assert r.code == code, f"{name}: exit {r.code}\n{r.err}"
        assert "Traceback" not in r.err + r.out, name
        lines = [line for line in r.err.splitlines() if "ERROR" in line]
        assert len(lines) == 1, f"{name}: expected one error line\n{r.err}"
        assert needle in lines[0], f"{name}: {lines[0]}"
        assert PASSWORD not in r.err
    assert database.tables() == set(), "bad input must not change the database"


def test_config_error_lists_every_problem(database: Database) -> None:
    r = run_runner(["upgrade"], runner_env("", DB_WAIT_TIMEOUT="x", LOG_FORMAT="xml",
                                           ALEMBIC_CONFIG=str(REPO / "nope.ini")))
    assert r.code == 2
    for setting in ("DATABASE_URL", "DB_WAIT_TIMEOUT", "LOG_FORMAT", "ALEMBIC_CONFIG"):
        assert setting in r.err


def test_driver_errors_are_redacted(database: Database) -> None:
    """A wrong password: the error names the problem, never the password."""
    url = database.cluster.url(database.name, password=PASSWORD + "x")
    r = run_runner(["upgrade"], runner_env(url, DB_WAIT_TIMEOUT="1s"))
    assert r.code == 3 and "password authentication failed" in r.err
    assert PASSWORD not in r.err
