"""The throwaway database on VERIFY_DATABASE_URL's server: created per run, always dropped.

Its name carries the creation time (UTC) and the run id, `runner_verify_20260101120000_1a2b3c4d`:
unique per run, and a sweep can tell a database left by a SIGKILLed run (older than a day) from
one that another verify is using right now. Nothing else on that server is ever touched.
"""

from __future__ import annotations

import calendar
import contextlib
import dataclasses
import os
import re
import time
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner import db
from runner.context import Run
from runner.errors import ConfigError
from runner.migrate import sqlstate
from runner.wait import reason, wait_until_ready

PREFIX = "runner_verify_"
_NAME = re.compile(r"^runner_verify_(\d{14})_[0-9a-f]{8}$")
STALE_AFTER = 86400.0  # a verify run never lasts a day; a database this old lost its runner
INSUFFICIENT_PRIVILEGE = "42501"


def server_run(run: Run) -> Run:
    """A copy of run whose database is VERIFY_DATABASE_URL (the server's maintenance database)."""
    url = run.settings.verify_database_url
    if url is None:
        raise ConfigError("VERIFY_DATABASE_URL is not set: point it at a server where the runner "
                          "may create and drop databases, e.g. postgresql://USER:PASSWORD@HOST:5432/postgres")
    return dataclasses.replace(run, settings=dataclasses.replace(run.settings, database_url=url))


def name_for(run: Run) -> str:
    return f"{PREFIX}{time.strftime('%Y%m%d%H%M%S', time.gmtime(run.started_at))}_{run.run_id}"


class Scratch:
    """The scratch database of one run; `run` is a Run copy whose database_url points at it."""

    def __init__(self, server: Run, name: str) -> None:
        self.server, self.name = server, name
        settings = server.settings
        self.run = dataclasses.replace(server, settings=dataclasses.replace(
            settings, database_url=settings.database_url.set(database=name)))

    def create(self) -> None:
        with _admin(self.server) as conn:
            try:
                conn.execute(sa.text(f'CREATE DATABASE "{self.name}"'))
            except sa.exc.DBAPIError as exc:
                if sqlstate(exc) == INSUFFICIENT_PRIVILEGE:
                    raise ConfigError("VERIFY_DATABASE_URL: the role may not create databases "
                                      f"({reason(exc)}): grant it CREATEDB, or use a server where "
                                      "it may") from None
                raise
        self.server.log("verify.scratch", f"created the scratch database {self.name}",
                        server=self.server.settings.safe_target)

    def drop(self) -> None:
        """Drop it, ending any session still in it (WITH FORCE); safe to call twice."""
        with _admin(self.server) as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))

    def recreate(self) -> None:
        """Start over from an empty database (after a revision left it in an unknown state)."""
        self.drop()
        self.server.log("verify.scratch", f"dropped the scratch database {self.name} to rebuild it")
        self.create()


@contextlib.contextmanager
def scratch_database(run: Run) -> Iterator[Scratch]:
    """Wait for the verify server, sweep stale scratch databases, create this run's, and drop it
    whatever happens: failure, SIGTERM/SIGINT or RUN_DEADLINE (they raise through here)."""
    server = server_run(run)
    wait_until_ready(server).close()
    scratch = Scratch(server, name_for(run))
    sweep(server)
    scratch.create()
    try:
        with _env_pointing_at(scratch.run):
            yield scratch
    finally:
        scratch.drop()
        server.log("verify.scratch", f"dropped the scratch database {scratch.name}")


def sweep(server: Run, now: float | None = None) -> list[str]:
    """Drop scratch databases older than a day (left by killed runs); return their names.
    Best effort: a database this role may not drop is left alone."""
    now = time.time() if now is None else now
    dropped: list[str] = []
    with _admin(server) as conn:
        names = conn.execute(sa.text(r"SELECT datname FROM pg_database "
                                     r"WHERE datname LIKE 'runner\_verify\_%'")).scalars().all()
        for name in names:
            m = _NAME.match(name)
            if not m:
                continue
            created = calendar.timegm(time.strptime(m.group(1), "%Y%m%d%H%M%S"))
            if now - created < STALE_AFTER:
                continue
            try:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            except sa.exc.DBAPIError as exc:
                server.log.warning("verify.sweep", f"could not drop the stale scratch database {name}: "
                                   f"{reason(exc)}")
                continue
            server.log("verify.sweep", f"dropped the stale scratch database {name} (left by an "
                       "interrupted verify)")
            dropped.append(name)
    return dropped


def _admin(server: Run) -> Connection:
    """An AUTOCOMMIT control connection to the server's maintenance database (CREATE/DROP
    DATABASE cannot run in a transaction; control connections still work after a cancel)."""
    return db.connect(server, "verify-admin", autocommit=True, connect_timeout=10)


@contextlib.contextmanager
def _env_pointing_at(scratch: Run) -> Iterator[None]:
    """While revisions run: an env.py that builds its own engine gets the scratch database, also
    when it reads DATABASE_URL itself instead of sqlalchemy.url: never the target."""
    saved = {k: os.environ.get(k) for k in ("DATABASE_URL", "DATABASE_URL_FILE", "PGAPPNAME",
                                             "PGOPTIONS")}
    os.environ.pop("DATABASE_URL_FILE", None)
    os.environ["DATABASE_URL"] = scratch.settings.database_url.render(hide_password=False)
    db.apply_libpq_environment(scratch)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
