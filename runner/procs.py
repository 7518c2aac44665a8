"""Child processes: PostgreSQL client tools (version check, password through the environment),
pipelines in their own process groups, cleanup, and the last words of a failed tool.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from typing import IO, Any

from runner import cancellation, keepalives
from runner.context import Run
from runner.dburl import DbUrl
from runner.errors import BackupFailed, ConfigError

# what a child inherits from the runner's environment (see child_env)
_INHERITED = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH")


def client_version(path: str) -> tuple[tuple[int, int], str]:
    """Return ((major, minor), version text) of a PostgreSQL client tool."""
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                         env=child_env(), preexec_fn=cancellation.unblock_in_child).stdout.strip()
    m = re.search(r"\b(\d+)(?:\.(\d+))?", out)
    if not m:
        raise BackupFailed(f"cannot read the version of {path} ({out!r})")
    return (int(m.group(1)), int(m.group(2) or 0)), out


def client_major(path: str) -> tuple[int, str]:
    """Return (major, version text) of a PostgreSQL client tool."""
    (major, _), text = client_version(path)
    return major, text


def check_client(run: Run, binary: str, setting: str) -> str:
    """Refuse a client older than the server's major version (it cannot dump / restore it)."""
    path = shutil.which(binary)
    server = run.server_version // 10000
    if not path:
        raise BackupFailed(f"{setting}={binary} not found: install the PostgreSQL client tools "
                           f"(major {server} or newer) or point {setting} at them")
    major, text = client_major(path)
    if major < server:
        raise BackupFailed(f"{setting} is {text}, older than the server (PostgreSQL {server}): "
                           f"use an image with a PostgreSQL {server} (or newer) client, or point "
                           f"{setting} at one")
    return text


def child_env(**extra: str) -> dict[str, str]:
    """Return the environment for a child tool: the runner's, without anything secret-bearing.

    The runner's own environment holds DATABASE_URL (with its password), AWS keys and libpq
    variables meant for env.py; a child gets only what locates and localises programs, plus
    extra (a libpq tool's PGPASSWORD: environ is readable only by the same user, argv by all).
    """
    env = {k: v for k, v in os.environ.items() if k in _INHERITED or k.startswith(("LC_", "ZSTD_"))}
    env.update(extra)
    return env


def libpq_env(run: Run, purpose: str, url: DbUrl | None = None) -> tuple[dict[str, str], str]:
    """Return (environment, conninfo without secrets) for a libpq tool on the run's database.

    Passwords (in the URL's user part or its query string) go through PGPASSWORD, never argv:
    argv is visible to every user of the machine in the process list.
    """
    params = (url or run.settings.database_url).libpq_params()
    if params.pop("sslpassword", None):
        raise ConfigError("DATABASE_URL has sslpassword: libpq has no environment variable for it, "
                          "so pg_dump and psql could only get it on their command line, which every "
                          "user of the machine can read; use an unencrypted key file readable only "
                          "by the runner")
    password = params.pop("password", None)
    # the server's keepalives: a runner whose machine vanished mid-dump must not leave pg_dump's
    # sessions (and their table locks, which block the next copy's migration) for two hours.
    # Not tcp_user_timeout: a dump stalled by a slow upload is a zero window, and some kernels
    # end such a connection after that timeout even though the runner answers every probe
    env = child_env(PGAPPNAME=run.app_name(purpose), PGOPTIONS=keepalives.server_options(),
                    **({"PGPASSWORD": password} if password else {}))
    if params.get("options"):  # the URL's options win over PGOPTIONS in libpq: add them there
        params["options"] = f"{params['options']} {keepalives.server_options()}"
    params.pop("application_name", None)
    conninfo = " ".join(f"{k}={_quote(v)}" for k, v in params.items())
    return env, conninfo


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def spawn(args: list[str], env: dict[str, str], stdin: Any, stderr: IO[bytes], fix: str,
          stdout: Any = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """Start one stage of a pipeline in its own process group, with the runner's signals unblocked."""
    try:
        return subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=stderr, env=env,
                                preexec_fn=cancellation.unblock_in_child, start_new_session=True)
    except OSError as exc:
        raise BackupFailed(f"cannot start {args[0]} ({exc.strerror}): {fix}") from None


def reap(procs: list[subprocess.Popen[bytes]], files: list[IO[bytes]]) -> None:
    """Stop what still runs, wait for it (bounded), close its output pipes and stderr files.

    Input pipes are left to their writers (restore's feeder thread closes its own).
    """
    terminate(procs)
    for p in procs:
        with contextlib.suppress(Exception):
            p.wait(timeout=10)
        if p.stdout:
            p.stdout.close()
    for f in files:
        f.close()


def terminate(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM the process groups of the still-running processes (idempotent)."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def tail(f: IO[bytes], limit: int = 400) -> str:
    """The last lines a tool wrote to its stderr file, on one line."""
    f.seek(0)
    text = f.read().decode("utf-8", "replace").strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return " / ".join(lines[-3:])[-limit:]
