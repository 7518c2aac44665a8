"""Pure logic: settings, durations, redaction, the exit-code table and the docs that mirror it."""

from __future__ import annotations

import io
import json
import re

import pytest

from runner import config
from runner.cli import build_parser
from runner.errors import ConfigError
from runner.exitcodes import DESCRIPTIONS, ExitCode, non_retriable
from runner.log import EventLog
from runner.migrate import scrub_query
from runner.redact import redact, register_secret
from tests.conftest import REPO

INI = str(REPO / "alembic.ini")


@pytest.mark.parametrize("text,seconds", [("30", 30), ("30s", 30), ("500ms", 0.5), ("5m", 300),
                                          ("1h", 3600), (" 2.5s ", 2.5)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5 minutes", "-1", "1d", "s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        config.parse_duration(text)


def test_load_defaults_and_driver_normalisation() -> None:
    s = config.load({"DATABASE_URL": "postgres+asyncpg://u:p%40ss@db:6432/app", "ALEMBIC_CONFIG": INI})
    assert s.database_url.drivername == "postgresql+asyncpg"
    assert s.sync_url.drivername == "postgresql+psycopg2"
    assert s.database_url.password == "p@ss"
    assert s.safe_target == "db:6432/app"
    assert (s.wait_timeout, s.lock_wait_timeout, s.migration_lock_timeout) == (60, 300, 4)
    assert "p@ss" not in repr(s) and "p%40ss" not in repr(s)


def test_flags_override_environment() -> None:
    s = config.load({"DATABASE_URL": "postgresql://u@h/d", "ALEMBIC_CONFIG": INI, "DB_WAIT_TIMEOUT": "5"},
                    {"DB_WAIT_TIMEOUT": "7s"})
    assert s.wait_timeout == 7


@pytest.mark.parametrize("argv", [
    ["--wait-timeout", "5s", "-c", "a.ini", "status", "--check"],
    ["status", "--wait-timeout", "5s", "--check", "-c", "a.ini"],
    ["-c", "a.ini", "status", "--check", "--wait-timeout", "5s"],
])
def test_global_flags_before_or_after_the_command(argv: list[str]) -> None:
    args = vars(build_parser().parse_args(argv))
    assert args == {"command": "status", "check": True, "DB_WAIT_TIMEOUT": "5s", "ALEMBIC_CONFIG": "a.ini",
                    "fail_fast": False}


def test_unset_flags_leave_the_environment_alone() -> None:
    assert vars(build_parser().parse_args(["upgrade"])) == {"command": "upgrade", "to": "head",
                                                             "fail_fast": False}


def test_database_url_file(tmp_path) -> None:
    f = tmp_path / "url"
    f.write_text("postgresql://u:pw@h/d\n")
    s = config.load({"DATABASE_URL_FILE": str(f), "ALEMBIC_CONFIG": INI})
    assert s.database_url.database == "d"


def test_every_problem_reported_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        config.load({"ALEMBIC_CONFIG": "/nope.ini", "DB_WAIT_TIMEOUT": "x", "LOG_FORMAT": "xml"})
    msg = str(e.value)
    for name in ("DATABASE_URL", "ALEMBIC_CONFIG", "DB_WAIT_TIMEOUT", "LOG_FORMAT"):
        assert name in msg


def test_redact_urls_kv_and_registered_secrets() -> None:
    assert redact("postgresql://bob:hunter2@db/x failed") == "postgresql://bob:***@db/x failed"
    assert redact("host=db password=hunter2 user=bob") == "host=db password=*** user=bob"
    register_secret("s3cr3t-value")
    assert "s3cr3t-value" not in redact("error near 's3cr3t-value'")


def test_event_log_json_and_text_redacted() -> None:
    buf = io.StringIO()
    log = EventLog("json", buf)
    log("x.y", "connect to postgresql://u:topsecret@h/d", attempt=2)
    rec = json.loads(buf.getvalue())
    assert rec["event"] == "x.y" and rec["attempt"] == 2 and "topsecret" not in buf.getvalue()
    buf = io.StringIO()
    EventLog("text", buf).warning("a.b", "hello", key="two words")
    assert re.match(r"^\S+Z WARN  a\.b\s+hello \[key=\"two words\"\]$", buf.getvalue().strip())


def test_scrub_query_drops_literals() -> None:
    q = "UPDATE users SET token = 'abc''def', n = 42 WHERE id = $1 AND x = $tag$raw$tag$"
    assert scrub_query(q) == "UPDATE users SET token = ?, n = ? WHERE id = $1 AND x = ?"


def test_exit_codes_are_below_126_except_signals() -> None:
    for code in ExitCode:
        assert code < 126 or code in (ExitCode.SIGINT, ExitCode.SIGTERM)
    assert set(DESCRIPTIONS) == set(ExitCode)
    assert ExitCode.CONFIG in non_retriable() and ExitCode.LOCK_TIMEOUT not in non_retriable()


def test_generated_docs_are_current() -> None:
    from tests import docs

    for path in docs.documents():
        if path.exists():
            text = path.read_text()
            assert docs.render(text) == text, f"{path.name} is stale: run python -m tests.docs"
    readme = (REPO / "README.md").read_text()
    assert "<!-- generated:exit-codes -->" in readme and "<!-- generated:settings -->" in readme


def test_entrypoint_knows_every_command() -> None:
    from runner.cli import COMMANDS

    case = re.search(r"case \"\$\{1-\}\" in\s*\n\s*(.*?)\)", (REPO / "entrypoint.sh").read_text())
    assert case, "entrypoint.sh lost its command list"
    listed = {w.strip() for w in case.group(1).split("|")} - {"-*"}
    assert listed == set(COMMANDS), "entrypoint.sh and runner.cli.COMMANDS disagree"


@pytest.mark.parametrize("url", [
    "postgresql://u:p%40ss@db:6432/app", "postgres+asyncpg://u@h/d?ssl=require",
    "postgresql+psycopg2://u:pw@[::1]:5433/d", "postgresql://u@/d?host=/var/run/postgresql",
    "postgresql://u:p/ss@h/d", "postgresql://h/d?sslmode=require&host=a&host=b",
    "postgresql://u:pa%3Ass@h:5432/d%20b?application_name=x", "postgresql:///d",
])
def test_dburl_parses_like_sqlalchemy(url: str) -> None:
    from sqlalchemy.engine import make_url

    from runner import dburl

    ours, theirs = dburl.parse(url), make_url(url)
    expected = theirs.set(drivername=theirs.drivername.replace("postgres+", "postgresql+"))
    assert ours.to_sqlalchemy() == expected
    assert make_url(ours.render(hide_password=False)) == ours.to_sqlalchemy()


@pytest.mark.parametrize("url,needle", [
    ("postgresql://u:Secr3t@tailpart@127.0.0.1:5432/d", "%40"),
    ("postgresql://u@x:Secr3t@127.0.0.1/d", "%40"),
    ("postgresql://u:p@127.0.0.1:99999/d", "port"),
    ("postgresql://u:p@127.0.0.1/d?sslmode=bogus", "sslmode"),
])
def test_dburl_refuses_ambiguous_or_invalid(url: str, needle: str) -> None:
    from runner import dburl

    with pytest.raises(dburl.UrlError) as e:
        dburl.parse(url)
    assert needle in str(e.value)
    assert "Secr3t" not in str(e.value) and "tailpart" not in str(e.value)
