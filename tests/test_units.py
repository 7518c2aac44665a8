"""Pure logic: settings, durations, redaction, the exit-code table and the docs that mirror it."""

from __future__ import annotations

import io
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import config
from runner.cli import build_parser
from runner.errors import ConfigError
from runner.exitcodes import DESCRIPTIONS, ExitCode, non_retriable
from runner.log import EventLog
from runner.redact import redact, register_secret, scrub_query
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
    assert "<!-- generated:exit-codes -->" in readme
    # a front page: details live in docs/ (issue 21)
    assert len(readme.encode()) <= 12_000, "README.md is over 12 KB: move details to docs/"
    assert "<!-- generated:settings -->" in (REPO / "docs/configuration.md").read_text()


def test_docs_links_resolve() -> None:
    from tests import docs

    assert docs.broken_links() == []
    assert docs._LINK.findall("see [x](nowhere.md#y)") == ["nowhere.md#y"]


def test_entrypoint_routes_every_command_to_the_runner(tmp_path: Path) -> None:
    """entrypoint.sh lists no commands: every registry command (and a mistyped one) reaches the
    runner; a program on PATH runs as given (test_image checks the image shadows none)."""
    from runner.registry import COMMANDS

    (tmp_path / "python").write_text('#!/bin/sh\necho "python $*"\n')
    (tmp_path / "python").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    for word in [*COMMANDS, "upgrdae", "--help"]:
        proc = subprocess.run(["bash", str(REPO / "entrypoint.sh"), word], env=env,
                              capture_output=True, text=True, timeout=30)
        assert proc.stdout.strip() == f"python -m runner {word}", (word, proc.stdout, proc.stderr)


@pytest.mark.parametrize("url", [
    "postgresql://u:p%40ss@db:6432/app", "postgres+asyncpg://u@h/d?sslmode=require",
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
    ("postgresql://u:p@127.0.0.1/d?foo=bar", "'foo' that libpq does not know"),
    ("postgresql+asyncpg://u:p@127.0.0.1/d?ssl=true", "sslmode=require"),
])
def test_dburl_refuses_ambiguous_or_invalid(url: str, needle: str) -> None:
    from runner import dburl

    with pytest.raises(dburl.UrlError) as e:
        dburl.parse(url)
    assert needle in str(e.value)
    assert "Secr3t" not in str(e.value) and "tailpart" not in str(e.value)


# -- redact(): linear, and the same matches as the regular expression it replaced ----------------

OLD_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)(?=@)")


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="ab1+.-:/@ \n=", max_size=60))
def test_url_password_scanner_matches_the_old_pattern(text: str) -> None:
    from runner.redact import mask_url_passwords

    assert mask_url_passwords(text) == OLD_URL_PASSWORD.sub(lambda m: m.group("head") + "***", text)


@settings(max_examples=200, deadline=None)
@given(prefix=st.text(max_size=30), user=st.text(alphabet="abcXYZ019_-.%", max_size=8),
       password=st.text(alphabet="abcXYZ019_-.%:/!#?'\"", min_size=1, max_size=12),
       suffix=st.text(max_size=30))
def test_redact_hides_url_and_conninfo_passwords(prefix: str, user: str, password: str, suffix: str) -> None:
    url = f"{prefix} postgresql://{user}:{password}@db:5432/app {suffix}"
    assert f":{password}@db" not in redact(url)
    kv = f"{prefix} host=db password={password} {suffix}"
    assert f"password={password}" not in redact(kv)


@pytest.mark.parametrize("value", [
    "a" * 100_000, "://" * 33_000, "a://b:" * 16_000, "x://u:" + "p" * 100_000, "password='" * 10_000,
    "a@" * 50_000, "postgresql://u:pw" * 6_000, ("s3://b/" + "k:" * 10 + " ") * 3_000,
])
def test_redact_is_linear_on_hostile_100kb_values(value: str) -> None:
    """redact() runs on every log line: a 100 KB value once took 12 s per line (quadratic). CPU
    time, not wall time: other processes on a loaded machine do not count against it."""
    t0 = time.process_time()
    redact(value)
    EventLog("text", io.StringIO())("x", value, field=value)
    assert time.process_time() - t0 < 1.0


def test_documented_placeholder_is_not_masked() -> None:
    from runner.dburl import PLACEHOLDER

    assert redact(f"set it to {PLACEHOLDER}") == f"set it to {PLACEHOLDER}"
    assert redact("postgresql://USER:PASSWORD1@h/d") == "postgresql://USER:***@h/d"


# -- one event, one line ---------------------------------------------------------------------------

HOSTILE = "x\n2026-01-01T00:00:00.000Z INFO  summary forged\r\x1b[2K\u2028\x85\x00end"


def test_text_log_escapes_control_characters() -> None:
    buf = io.StringIO()
    EventLog("text", buf).error("summary", f"failed: {HOSTILE}", target=HOSTILE, items=[HOSTILE],
                                spaced=f"a b {HOSTILE}")
    line = buf.getvalue()
    assert line.endswith("\n") and len(line.splitlines()) == 1, line
    assert "\\n2026-01-01T00:00:00.000Z" in line and "\\x1b[2K" in line and "\\u2028" in line
    assert not any(ch in line[:-1] for ch in "\r\x1b\u2028\x85\x00")


def test_json_log_stays_one_valid_line() -> None:
    buf = io.StringIO()
    EventLog("json", buf)("x", HOSTILE, value=HOSTILE, url="postgresql://u:hunter2-x@h/d password='abc")
    assert len(buf.getvalue().splitlines()) == 1
    rec = json.loads(buf.getvalue())
    assert rec["msg"] == HOSTILE and "hunter2-x" not in buf.getvalue()


def test_one_line_keeps_sentences_apart() -> None:
    from runner.log import one_line

    assert one_line("failed: Connection refused\n\tIs the server running on that host?\n") == \
        "failed: Connection refused / Is the server running on that host?"
    assert one_line("server closed the connection unexpectedly\n\tThis probably means the server "
                    "terminated abnormally\n\tbefore or while processing the request.\n") == \
        ("server closed the connection unexpectedly / This probably means the server terminated "
         "abnormally before or while processing the request.")


# -- the termination message: valid JSON within Kubernetes' 4096 bytes ----------------------------

def test_termination_message_is_valid_json_within_the_limit() -> None:
    from runner.report import ESSENTIAL, termination_message

    register_secret("tm-secret-value-42")
    data = {"command": "upgrade", "run_id": "abcd1234", "exit_code": 6, "exit_name": "migration_failed",
            "outcome": "failed", "applied": [f"rev{i:04d}" for i in range(500)],
            "durations_s": {f"phase{i}": 1.5 for i in range(200)},
            "error": ("é\"\\\n" * 3000) + " tm-secret-value-42 " + "ü" * 3000}
    out = termination_message(data)
    assert len(out) <= 4096
    msg = json.loads(out)
    assert {"command", "exit_code", "exit_name", "outcome", "error"} <= set(msg) <= set(data)
    assert msg["exit_code"] == 6 and msg["error"].startswith("é\"\\\n") and msg["error"].endswith("…")
    assert "tm-secret" not in out.decode()
    tiny = termination_message({k: data[k] for k in ESSENTIAL if k in data}, limit=300)
    assert len(tiny) <= 300 and json.loads(tiny)["exit_code"] == 6
    small = {"command": "status", "exit_code": 0, "applied": ["a"]}
    assert json.loads(termination_message(small)) == small


# -- which INVALID index is ours: the one a revision is about to build ------------------------------

@pytest.mark.parametrize("sql,found", [
    ("CREATE INDEX CONCURRENTLY ix_a ON items (note)", ("ix_a", "items")),
    ("create unique index concurrently if not exists IX_A on only app.Users (email)", ("ix_a", "app.Users")),
    ('CREATE INDEX CONCURRENTLY "Ix ""A""" ON "My Schema"."T" (x)', ('Ix "A"', '"My Schema"."T"')),
    ("\n  CREATE INDEX CONCURRENTLY ix_b ON billing . invoices USING btree (id)",
     ("ix_b", "billing . invoices")),
    ("CREATE INDEX ix_a ON items (note)", None),
    ("CREATE INDEX CONCURRENTLY ON items (note)", None),  # no name: PostgreSQL picks one
    ("DROP INDEX CONCURRENTLY ix_a", None),
])
def test_parse_create_concurrently(sql: str, found: tuple[str, str] | None) -> None:
    from runner.migrate.indexes import parse_create

    assert parse_create(sql) == found
