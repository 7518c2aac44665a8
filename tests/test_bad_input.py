"""Bad input: one clear line naming the setting and the fix, exit 2 (or 7), no traceback, no change.

Cases that fail while the settings load run in-process through cli.main(argv, environ): nothing
has started by then (no signal watcher, no connection), which is exactly what they check. The
rest, and one settings case to prove no traceback reaches stderr, run as real processes.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import pytest

from runner import cli
from tests.conftest import REPO, Database, assert_no_secrets, run_runner, runner_env
from tests.pgcluster import PASSWORD
from tests.s3_fixtures import S3Server

# (name, argv, environment, text the one error line must contain, texts that must not be printed)
Case = tuple[str, list[str], dict[str, str], str, tuple[str, ...]]


def _settings_cases(url: str, tmp: str) -> list[Case]:
    base, db = url.rsplit("/", 1)
    hostport = base.rsplit("@", 1)[1]
    return [
        ("malformed url", ["upgrade"], {"DATABASE_URL": "postgresql://user:pw@host:notaport/db"},
         "DATABASE_URL", ()),
        ("mysql url", ["upgrade"], {"DATABASE_URL": "mysql://u:p@127.0.0.1/db"}, "only PostgreSQL", ()),
        ("in-memory sqlite url", ["upgrade"], {"DATABASE_URL": "sqlite://"}, "in-memory", ()),
        ("no database name", ["upgrade"], {"DATABASE_URL": base + "/"}, "append /DBNAME", ()),
        ("missing url", ["upgrade"], {"DATABASE_URL": ""}, "DATABASE_URL is not set: set it to "
         "postgresql://USER:PASSWORD@HOST:PORT/DB", ()),
        ("url and url file", ["upgrade"], {"DATABASE_URL_FILE": f"{tmp}/url"}, "both set", ()),
        ("unreadable url file", ["upgrade"], {"DATABASE_URL": "", "DATABASE_URL_FILE": f"{tmp}/nope"},
         "DATABASE_URL_FILE", ()),
        ("missing alembic.ini", ["upgrade"], {"ALEMBIC_CONFIG": f"{tmp}/missing.ini"}, "ALEMBIC_CONFIG", ()),
        ("unknown command", ["migrate-all"], {}, "invalid choice", ()),
        ("unknown flag", ["upgrade", "--force"], {}, "unrecognized arguments", ()),
        ("downgrade without target", ["downgrade"], {}, "--to", ()),
        ("bad wait timeout", ["upgrade"], {"DB_WAIT_TIMEOUT": "soon"}, "DB_WAIT_TIMEOUT", ()),
        ("negative lock wait", ["upgrade"], {"LOCK_WAIT_TIMEOUT": "-5"}, "LOCK_WAIT_TIMEOUT", ()),
        ("bad retry attempts", ["upgrade"], {"LOCK_RETRY_ATTEMPTS": "many"}, "LOCK_RETRY_ATTEMPTS", ()),
        ("statement below lock timeout", ["upgrade"],
         {"MIGRATION_LOCK_TIMEOUT": "5s", "MIGRATION_STATEMENT_TIMEOUT": "2s"}, "MIGRATION_STATEMENT_TIMEOUT",
         ()),
        ("bad log format", ["upgrade"], {"LOG_FORMAT": "xml"}, "LOG_FORMAT", ()),
        ("bad flag value", ["--wait-timeout", "x", "upgrade"], {}, "DB_WAIT_TIMEOUT", ()),
        ("bad flag value after command", ["status", "--lock-wait-timeout", "soon"], {}, "LOCK_WAIT_TIMEOUT",
         ()),
        # hostile settings (issue 13): refused up front, before any connection or backup
        ("password with an unencoded @", ["upgrade"],
         {"DATABASE_URL": f"postgresql://admin:Secr3t@tailpart@{hostport}/{db}"}, "write it as %40",
         ("Secr3t", "tailpart")),
        ("port out of range", ["upgrade"], {"DATABASE_URL": f"{base.rsplit(':', 1)[0]}:99999/{db}"},
         "a number from 1 to 65535", ()),
        ("bogus sslmode", ["upgrade"], {"DATABASE_URL": f"{url}?sslmode=bogus"}, "sslmode='bogus'", ()),
        ("unknown query parameter", ["upgrade"], {"DATABASE_URL": f"{url}?foo=bar"},
         "'foo' that libpq does not know", ()),
        ("asyncpg's ssl parameter", ["status"],
         {"DATABASE_URL": url.replace("postgresql://", "postgresql+asyncpg://") + "?ssl=require"},
         "use libpq's connection parameters (e.g. sslmode=require", ()),
        ("5,000-character ALEMBIC_CONFIG", ["upgrade"], {"ALEMBIC_CONFIG": "/tmp/" + "a" * 5000},
         "is too long to be a file name", ("a" * 100,)),
        ("absurd run deadline", ["upgrade"], {"RUN_DEADLINE": "999999999999h"},
         "RUN_DEADLINE='999999999999h' is too long: at most 7d", ()),
        ("lock_timeout beyond PostgreSQL", ["upgrade"], {"MIGRATION_LOCK_TIMEOUT": "600h"},
         "MIGRATION_LOCK_TIMEOUT='600h' is too long: at most 1d", ()),
        ("huge statement_timeout", ["upgrade"], {"MIGRATION_STATEMENT_TIMEOUT": "100000h"},
         "MIGRATION_STATEMENT_TIMEOUT='100000h' is too long: at most 7d", ()),
        ("lock_timeout rounded to off", ["upgrade"], {"MIGRATION_LOCK_TIMEOUT": "0.5ms"},
         "whole number of milliseconds", ()),
        ("zero retry attempts", ["upgrade"], {"LOCK_RETRY_ATTEMPTS": "0"}, "from 1 to 1000", ()),
        ("application_name with a newline", ["upgrade"], {"APPLICATION_NAME": "app\nINFO forged"},
         "APPLICATION_NAME='app\\nINFO forged' must be at most 40 printable characters", ()),
    ]


@pytest.fixture
def files(tmp_path, database: Database):
    (tmp_path / "url").write_text(database.url)
    (tmp_path / "empty.ini").write_text("[other]\nx = 1\n")
    (tmp_path / "badloc.ini").write_text("[alembic]\nscript_location = /nonexistent/migrations\n")
    broken = tmp_path / "brokenenv"
    (broken / "versions").mkdir(parents=True)
    (broken / "alembic.ini").write_text("[alembic]\nscript_location = %(here)s\n")
    (broken / "env.py").write_text("import app_models_not_installed  # noqa\n")
    (broken / "versions" / "b001.py").write_text("revision = 'b001'\ndown_revision = None\n")
    return tmp_path


@pytest.fixture
def no_signal_watcher() -> Iterator[None]:
    """cli.main blocks SIGTERM/SIGINT once the settings are good: in-process it must never get there."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before, "a case got past the settings"


def _one_error_line(name: str, err: str, needle: str) -> None:
    assert "Traceback" not in err, name
    lines = [line for line in err.splitlines() if "ERROR" in line]
    assert len(lines) == 1, f"{name}: expected one error line\n{err}"
    assert needle in lines[0], f"{name}: {lines[0]}"


def test_settings_errors(files, database: Database, s3_server: S3Server, bucket: str, capsys,
                         no_signal_watcher) -> None:
    """Every case exits 2 with one line, at once, and writes the termination message like every
    other exit; nothing starts: no connection, no backup."""
    cases = _settings_cases(database.url, str(files))
    assert len(cases) >= 25
    message = files / "termination-log"
    for name, argv, extra, needle, hidden in cases:
        env = runner_env(database.url, BACKUP_MODE="required", BACKUP_S3_URI=f"s3://{bucket}/hostile",
                         TERMINATION_MESSAGE_PATH=str(message), **s3_server.env(), **extra)
        message.unlink(missing_ok=True)
        t0 = time.monotonic()
        code = cli.main(argv, env)
        out, err = capsys.readouterr()
        assert code == 2, f"{name}: exit {code}\n{err}"
        assert time.monotonic() - t0 < 2, f"{name}: refused only after a wait"
        _one_error_line(name, err, needle)
        written = message.read_bytes()
        data = json.loads(written)
        assert len(written) <= 4096 and (data["exit_code"], data["exit_name"]) == (2, "config"), name
        assert needle in data["error"] or needle in json.dumps(data["error"]), name
        assert data["command"] == next((a for a in argv if a in ("upgrade", "status", "downgrade")), None)
        assert_no_secrets(out, err, written.decode())
        for text in hidden:
            assert text not in out + err + written.decode(), f"{name}: printed {text[:20]!r}"
    assert database.tables() == set(), "bad input must not change the database"
    assert s3_server.keys(bucket) == [], "bad input must not take a backup"


@pytest.mark.parametrize("where", ["a directory", "a path too long", "a missing directory"])
def test_config_error_with_an_unusable_termination_message_path(tmp_path, capsys, no_signal_watcher,
                                                               where: str) -> None:
    """TERMINATION_MESSAGE_PATH is read before the settings are known: an unusable value (it may
    be the very setting that failed) costs at most a warning, never the error line or exit 2."""
    path = {"a directory": str(tmp_path), "a path too long": "/tmp/" + "m" * 5000,
            "a missing directory": str(tmp_path / "nope" / "termination-log")}[where]
    env = runner_env("", DB_WAIT_TIMEOUT="soon", TERMINATION_MESSAGE_PATH=path)
    assert cli.main(["upgrade"], env) == 2
    err = capsys.readouterr().err
    _one_error_line(where, err, "DB_WAIT_TIMEOUT")
    assert "m" * 100 not in err


def test_config_error_lists_every_problem(capsys, no_signal_watcher) -> None:
    env = runner_env("", DB_WAIT_TIMEOUT="x", LOG_FORMAT="xml", ALEMBIC_CONFIG=str(REPO / "nope.ini"))
    assert cli.main(["upgrade"], env) == 2
    err = capsys.readouterr().err
    for setting in ("DATABASE_URL", "DB_WAIT_TIMEOUT", "LOG_FORMAT", "ALEMBIC_CONFIG"):
        assert setting in err


def test_bad_input_in_a_real_process(files, database: Database, tmp_path) -> None:
    """Cases found after start-up (the migration environment, a target, what libpq refuses at
    connect time), and one settings case, as real processes: one line, no traceback, no change."""
    forged = "2026-01-01T00:00:00.000Z INFO  summary          upgrade: migrated (exit 0)"
    target = "nope\n" + forged + "\r\x1b[2K" + "x" * 5000
    cases: list[tuple[str, list[str], dict[str, str], int, str]] = [
        ("garbage url", ["upgrade"], {"DATABASE_URL": "not a url at all"}, 2, "DATABASE_URL"),
        ("alembic.ini without section", ["upgrade"], {"ALEMBIC_CONFIG": f"{files}/empty.ini"}, 2,
         "[alembic] section"),
        ("bad script_location", ["upgrade"], {"ALEMBIC_CONFIG": f"{files}/badloc.ini"}, 2,
         "script_location"),
        ("env.py that fails to import", ["upgrade"], {"ALEMBIC_CONFIG": f"{files}/brokenenv/alembic.ini"},
         2, "env.py failed (ModuleNotFoundError"),
        ("base without yes", ["downgrade", "--to", "base"], {}, 2, "--yes"),
        ("a value libpq refuses at connect time", ["status"],
         {"DATABASE_URL": f"{database.url}?target_session_attrs=bogus", "DB_WAIT_TIMEOUT": "60s"}, 2,
         "libpq refused the connection parameters (invalid target_session_attrs value"),
        ("forged log line in a long unknown target", ["upgrade", "--to", target],
         {"TERMINATION_MESSAGE_PATH": str(tmp_path / "termination-log")}, 7,
         "target revision nope\\n2026-01-01T00:00:00.000Z INFO  summary"),
    ]
    for name, args, extra, code, needle in cases:
        t0 = time.monotonic()
        r = run_runner(args, runner_env(database.url, **extra))
        assert r.code == code, f"{name}: exit {r.code}\n{r.err}"
        assert time.monotonic() - t0 < 10, f"{name}: refused only after a wait"
        _one_error_line(name, r.err + r.out, needle)
        assert PASSWORD not in r.err
    assert not any(line.startswith(forged[:24]) for line in r.lines), "a log line was forged"
    assert "\x1b" not in r.err and "\r" not in r.err
    message = (tmp_path / "termination-log").read_bytes()
    assert len(message) <= 4096
    data = json.loads(message)  # valid JSON: long values are shortened, never cut mid-JSON
    assert data["exit_code"] == 7 and data["error"].startswith("target revision nope\n" + forged)
    assert data["error"].endswith("…")
    assert database.tables() == set(), "bad input must not change the database"
