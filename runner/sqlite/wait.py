"""Wait until a SQLite file can take migrations: its directory exists and is writable (SQLite
writes its journal there), the file is a SQLite database that can be written.

Not ready yet (retried within DB_WAIT_TIMEOUT, then exit 3): the directory is missing or not
writable (a volume not mounted yet), the file is read-only, another connection holds it locked.
A missing file is created by `upgrade` only (it migrates it from base); `wait` waits for it; any
other command exits 12 at once, as PostgreSQL's missing database does (docs/sqlite.md). A file
that is not a SQLite database is exit 2.
"""

from __future__ import annotations

import os
import sqlite3

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner import retry
from runner.context import Run
from runner.errors import AuthFailed, ConfigError, NotReady
from runner.sqlite import engine, files


class _NotYet(Exception):
    """One failed readiness check; the message says why."""


def probe(run: Run) -> Connection:
    """Check the file once; return an open connection to it."""
    url = run.settings.database_url
    file = files.path(url)
    if not file.parent.is_dir():
        raise _NotYet(f"directory {file.parent} does not exist (SQLite keeps its journal next to "
                      "the file): create it or mount the volume")
    if not os.access(file.parent, os.W_OK | os.X_OK):
        raise _NotYet(f"directory {file.parent} is not writable (SQLite writes its journal there)")
    if not file.exists():
        if run.command == "wait":
            raise _NotYet(f"{file} does not exist yet ('upgrade' creates it)")
        if run.command not in files.CREATES:
            raise AuthFailed(f"the SQLite database {file} does not exist: 'upgrade' creates it (the "
                             "other commands only open an existing file); fix DATABASE_URL's path "
                             "or run upgrade first")
    elif not os.access(file, os.R_OK | os.W_OK):
        raise _NotYet(f"{file} is read-only for this user")
    conn = engine.engine(run, "wait").connect()
    try:
        conn.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar_one()
        conn.commit()
    except sa.exc.DBAPIError as exc:
        conn.close()
        text = str(exc.orig)
        if isinstance(exc.orig, sqlite3.DatabaseError) and "not a database" in text:
            raise ConfigError(f"DATABASE_URL: {file} is not a SQLite database ({text}): fix the "
                              "path") from None
        raise _NotYet(text) from None
    run.server_version = engine.VERSION
    return conn


def wait_until_ready(run: Run) -> Connection:
    """Check until ready or DB_WAIT_TIMEOUT (exit 3); return an open connection."""
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
            raise NotReady(f"database {run.settings.safe_target} not ready after {limit:g}s "
                           f"({attempts} attempts): {exc}; or raise DB_WAIT_TIMEOUT") from None
    run.log("db.ready", f"database {run.settings.safe_target} is ready",
            server_version=run.server_version, attempts=attempts)
    return conn
