"""Wait until the database is really ready: reachable, authenticated, writable primary.

Authentication failures (wrong password, unknown role, missing database, no CONNECT privilege)
are not "not ready yet": each gets its own hint, and they are retried only for DB_AUTH_TIMEOUT
(an operator may be provisioning the role or the Secret right now), then the run ends with
exit 12, which a Job does not retry: a new pod would read the same Secret. Connection parameters
libpq refuses (an invalid option value) are a configuration error: exit 2 at once.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner import db, retry
from runner.context import Run
from runner.errors import AuthFailed, ConfigError, NotReady
from runner.log import one_line
from runner.redact import redact

# what the server says (lc_messages English, as in the server's own catalogue) -> what to do
AUTH_FAILURES = (
    ("password authentication failed", "check the user and password in DATABASE_URL (percent-"
     "encoded) or the Secret they come from; under password authentication an unknown role fails "
     "the same way"),
    ("does not exist", "create it (the runner never creates roles or databases) or fix the name "
     "in DATABASE_URL"),
    ("is not permitted to log in", "give the role LOGIN (ALTER ROLE ... LOGIN) or use another role"),
    ("permission denied for database", "GRANT CONNECT ON DATABASE to the role"),
    ("no pg_hba.conf entry", "add a pg_hba.conf entry for this client, role and database (or set "
     "the sslmode it requires)"),
    ("authentication failed", "check the role's authentication method in pg_hba.conf and its "
     "credentials"),
)
# libpq's own complaints about the connection parameters: retrying cannot help
CONNINFO_ERRORS = ("invalid connection option", "for connection option", "invalid dsn")


class _NotYet(Exception):
    """One failed readiness probe; the message says why."""


class _AuthRefused(_NotYet):
    """The server refused the role, its password or the database; hint says what to do."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def probe(run: Run) -> Connection:
    """Connect once and check the server can take migrations; return the open connection."""
    timeout, _ = run.limit(min(10.0, run.settings.wait_timeout))
    try:
        conn = db.connect(run, "wait", connect_timeout=max(1.0, timeout))
    except sa.exc.DBAPIError as exc:
        raise _refusal(exc) from None
    try:
        row = conn.execute(sa.text(
            "SELECT pg_is_in_recovery(), current_setting('transaction_read_only'), "
            "current_setting('server_version_num')::int")).one()
        conn.commit()
    except sa.exc.DBAPIError as exc:
        conn.close()
        raise _NotYet(reason(exc)) from None
    if row[0]:
        conn.close()
        raise _NotYet("the server is a standby (pg_is_in_recovery() is true)")
    if row[1] == "on":
        conn.close()
        raise _NotYet("the session is read-only (default_transaction_read_only is on)")
    run.server_version = row[2]
    return conn


def _refusal(exc: sa.exc.DBAPIError) -> Exception:
    """Classify a failed connection attempt: configuration, authentication, or not ready yet."""
    text = reason(exc)
    if any(needle in text for needle in CONNINFO_ERRORS) or text.startswith("invalid "):
        return ConfigError(f"DATABASE_URL: libpq refused the connection parameters ({text}): fix "
                           "the URL's query string")
    for needle, hint in AUTH_FAILURES:
        if needle in text:
            return _AuthRefused(text, hint)
    return _NotYet(text)


def wait_until_ready(run: Run) -> Connection:
    """Probe until ready or the deadline (exit 3; exit 12 for authentication); return an open
    connection."""
    if run.settings.database_url.is_sqlite:  # a file: runner.sqlite.wait says when it is ready
        from runner.sqlite.wait import wait_until_ready as file_ready

        return file_ready(run)
    limit, capped = run.limit(run.settings.wait_timeout)
    attempts, refused_since = 0, None

    def attempt() -> Connection:
        nonlocal attempts, refused_since
        attempts += 1
        run.cancel.check()
        try:
            return probe(run)
        except _AuthRefused as exc:
            refused_since = run.clock() if refused_since is None else refused_since
            if run.clock() - refused_since >= run.settings.auth_timeout:
                raise _auth_failed(run, exc, attempts) from None
            raise

    def on_retry(exc: BaseException, attempt: int, pause: float) -> None:
        hint = f": {exc.hint}" if isinstance(exc, _AuthRefused) else ""
        run.log.warning("db.not_ready", f"{exc}{hint}", attempt=attempt, retry_in=round(pause, 2))

    with run.timed("wait"):
        try:
            conn = retry.call(run, attempt, retry_on=(_NotYet,), limit=limit, initial=0.25,
                              maximum=5.0, jitter=0.5, on_retry=on_retry)
        except _AuthRefused as exc:  # the wait deadline came first: still an authentication failure
            run.stop_if_deadline(capped)
            raise _auth_failed(run, exc, attempts) from None
        except _NotYet as exc:
            run.stop_if_deadline(capped)
            raise NotReady(f"database {run.settings.safe_target} not ready after "
                           f"{limit:g}s ({attempts} attempts): {exc}; check that it is running "
                           "and reachable, or raise DB_WAIT_TIMEOUT") from None
    run.log("db.ready", f"database {run.settings.safe_target} is ready",
            server_version=run.server_version, attempts=attempts)
    return conn


def _auth_failed(run: Run, exc: _AuthRefused, attempts: int) -> AuthFailed:
    window = run.settings.auth_timeout
    tried = f"retried for DB_AUTH_TIMEOUT ({window:g}s)" if window else "not retried (DB_AUTH_TIMEOUT=0)"
    return AuthFailed(f"database {run.settings.safe_target} refused the connection ({attempts} "
                      f"attempt(s), {tried}): {exc}: {exc.hint}")


def reason(exc: sa.exc.DBAPIError) -> str:
    """Return the driver's message as one redacted line."""
    return redact(one_line(str(exc.orig))) or type(exc.orig).__name__
