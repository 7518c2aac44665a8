"""Wait until the database is really ready: reachable, authenticated, writable primary."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner import db, retry
from runner.context import Run
from runner.errors import NotReady
from runner.redact import redact


class _NotYet(Exception):
    """One failed readiness probe; the message says why."""


def probe(run: Run) -> Connection:
    """Connect once and check the server can take migrations; return the open connection."""
    timeout, _ = run.limit(min(10.0, run.settings.wait_timeout))
    try:
        conn = db.connect(run, "wait", connect_timeout=max(1.0, timeout))
    except sa.exc.DBAPIError as exc:
        raise _NotYet(reason(exc)) from None
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


def wait_until_ready(run: Run) -> Connection:
    """Probe until ready or the deadline (exit 3); return an open connection."""
    limit, capped = run.limit(run.settings.wait_timeout)
    attempts = 0

    def attempt() -> Connection:
        nonlocal attempts
        attempts += 1
        run.cancel.check()
        return probe(run)

    def on_retry(exc: BaseException, attempt: int, pause: float) -> None:
        run.log.warning("db.not_ready", str(exc), attempt=attempt, retry_in=round(pause, 2))

    with run.timed("wait"):
        try:
            conn = retry.call(run, attempt, retry_on=(_NotYet,), limit=limit, initial=0.25,
                              maximum=5.0, jitter=0.5, on_retry=on_retry)
        except _NotYet as exc:
            run.stop_if_deadline(capped)
            raise NotReady(f"database {run.settings.safe_target} not ready after "
                           f"{limit:g}s ({attempts} attempts): {exc}; check that it is running "
                           "and reachable, or raise DB_WAIT_TIMEOUT") from None
    run.log("db.ready", f"database {run.settings.safe_target} is ready",
            server_version=run.server_version, attempts=attempts)
    return conn


def reason(exc: sa.exc.DBAPIError) -> str:
    """Return the driver's message as one redacted line."""
    msg = str(exc.orig).strip().splitlines()
    return redact(" ".join(line.strip() for line in msg if line.strip())) or type(exc.orig).__name__
