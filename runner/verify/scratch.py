"""The throwaway database on VERIFY_DATABASE_URL's server: created per run, always dropped.

Its name carries the creation time (UTC) and the run id, `runner_verify_20260101120000_1a2b3c4d`:
unique per run, and a sweep can tell a database left by a SIGKILLed run (older than a day) from
one that another verify is using right now. The throwaway role the revisions run as (role.py)
has the same name. Nothing else on that server is ever touched.
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

from runner import db, environ
from runner.context import Run
from runner.db import sqlstate
from runner.errors import ConfigError
from runner.sqlname import quote
from runner.verify import prepare, sqlite_scratch
from runner.verify import role as roles
from runner.verify.role import Role
from runner.wait.ready import reason, wait_until_ready

PREFIX = "runner_verify_"
_NAME = re.compile(r"^runner_verify_(\d{14})_[0-9a-f]{8}$")
STALE_AFTER = 86400.0  # a verify run never lasts a day; a database this old lost its runner
INSUFFICIENT_PRIVILEGE = "42501"


def server_run(run: Run) -> Run:
    """A copy of run whose database is VERIFY_DATABASE_URL (the server's maintenance database);
    on SQLite the run itself (its scratch is a temporary file: runner.verify.sqlite_scratch)."""
    if sqlite_scratch.applies(run):
        return run
    url = run.settings.verify_database_url
    if url is None:
        raise ConfigError("VERIFY_DATABASE_URL is not set: point it at a server where the runner "
                          "may create and drop databases, e.g. postgresql://USER:PASSWORD@HOST:5432/postgres")
    app = run.settings.database_url
    if "+" not in url.drivername and app is not None and "+" in app.drivername and not app.is_sqlite:
        # env.py gets the scratch URL with the application's driver (an async env.py needs its
        # postgresql+asyncpg); the runner's own connections use libpq whatever it says
        url = url.set(drivername=app.drivername)
    return dataclasses.replace(run, settings=dataclasses.replace(run.settings, database_url=url))


def name_for(run: Run) -> str:
    return f"{PREFIX}{time.strftime('%Y%m%d%H%M%S', time.gmtime(run.started_at))}_{run.run_id}"


class Scratch:
    """The scratch database of one run. `run` connects to it as the revisions' least-privilege
    role; `admin` as the VERIFY_DATABASE_URL role (extensions, ownership); `server` is the
    latter on the server's maintenance database (create, drop)."""

    def __init__(self, server: Run, name: str, role: Role) -> None:
        self.server, self.name, self.role = server, name, role
        url = server.settings.database_url.set(database=name)
        self.admin = dataclasses.replace(server, settings=dataclasses.replace(server.settings,
                                                                              database_url=url))
        self.run = dataclasses.replace(server, settings=dataclasses.replace(
            server.settings, database_url=url.set(username=role.name, password=role.password)))

    def create(self) -> None:
        """Create the database OWNER the revisions' role (from VERIFY_TEMPLATE when set), then
        bring it to where the chain starts (extensions, the template's objects handed to the
        role, VERIFY_SETUP)."""
        settings = self.server.settings
        template = f" TEMPLATE {quote(settings.verify_template)}" if settings.verify_template else ""
        with _admin(self.server) as conn:
            try:
                conn.execute(sa.text(f"CREATE DATABASE {quote(self.name)} OWNER {quote(self.role.name)}"
                                     f"{template}"))
            except sa.exc.DBAPIError as exc:
                raise _create_failed(exc, settings.verify_template) from None
        self.server.log("verify.scratch", f"created the scratch database {self.name}",
                        server=settings.safe_target, role=self.role.name,
                        template=settings.verify_template or "template1")
        with db.connect(self.admin, "verify-admin", autocommit=True, connect_timeout=10) as conn:
            prepare.extensions(conn, settings.verify_extensions)
            prepare.adopt(conn, self.role.name)
        if settings.verify_setup is not None:
            with db.connect(self.run, "verify-setup", connect_timeout=10) as conn:
                prepare.setup(conn, settings.verify_setup)

    def drop(self) -> None:
        """Drop it, ending any session still in it (WITH FORCE); safe to call twice."""
        with _admin(self.server) as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {quote(self.name)} WITH (FORCE)"))

    def recreate(self) -> None:
        """Start over from an empty database (after a revision left it in an unknown state)."""
        self.drop()
        self.server.log("verify.scratch", f"dropped the scratch database {self.name} to rebuild it")
        self.create()

    def cancel(self) -> int:
        """Cancel every statement running in the scratch database (the revisions' role's, also
        from engines env.py built itself); return how many."""
        with _admin(self.server) as conn:
            return conn.execute(sa.text(
                "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity WHERE datname = :d "
                "AND pid <> pg_backend_pid() AND state <> 'idle'"), {"d": self.name}).scalar_one()


def _create_failed(exc: sa.exc.DBAPIError, template: str | None) -> Exception:
    code = sqlstate(exc)
    if template and code == "3D000":
        return ConfigError(f"VERIFY_TEMPLATE={template}: no such database on the verify server: "
                           "create it, or unset VERIFY_TEMPLATE")
    if template and code == "55006":
        return ConfigError(f"VERIFY_TEMPLATE={template} is in use ({reason(exc)}): PostgreSQL copies "
                           "a template only while nobody is connected to it")
    if code == INSUFFICIENT_PRIVILEGE:
        what = (f"copy the template {template} (make it a template: ALTER DATABASE {template} "
                "IS_TEMPLATE true, or let the role own it)" if template and "template" in reason(exc)
                else "create databases (grant it CREATEDB)")
        return ConfigError(f"VERIFY_DATABASE_URL: the role may not {what}: {reason(exc)}")
    return exc


@contextlib.contextmanager
def scratch_database(run: Run) -> Iterator[Scratch]:
    """Wait for the verify server, sweep stale scratch databases and roles, create this run's
    role and database, and drop both whatever happens: failure, SIGTERM/SIGINT or RUN_DEADLINE
    (they raise through here). On SQLite: a temporary file (runner.verify.sqlite_scratch)."""
    if sqlite_scratch.applies(run):
        with sqlite_scratch.scratch_database(run) as scratch:
            yield scratch  # type: ignore[misc]  # the same interface, for a file
        return
    server = server_run(run)
    wait_until_ready(server).close()
    name = name_for(run)
    sweep(server)
    role: Role | None = None
    scratch: Scratch | None = None
    try:
        with _admin(server) as conn:
            role = roles.for_run(conn, name, server.settings.verify_role_url, server.settings.database_url)
        scratch = Scratch(server, name, role)
        scratch.create()
        with _env_pointing_at(scratch.run):
            yield scratch
    finally:
        if scratch is not None:
            scratch.drop()
            server.log("verify.scratch", f"dropped the scratch database {scratch.name}")
        if role is not None and role.throwaway:
            with _admin(server) as conn:
                roles.drop(conn, role, server)


def sweep(server: Run, now: float | None = None) -> list[str]:
    """Drop scratch databases and throwaway roles older than a day (left by killed runs); return
    their names. Best effort: what this role may not drop is left alone, with a warning."""
    now = time.time() if now is None else now
    dropped: list[str] = []
    with _admin(server) as conn:
        names = conn.execute(sa.text(
            r"SELECT datname FROM pg_database WHERE datname LIKE 'runner\_verify\_%' UNION "
            r"SELECT rolname FROM pg_roles WHERE rolname LIKE 'runner\_verify\_%' ORDER BY 1"
        )).scalars().all()
        for name in names:
            if not _stale(name, now):
                continue
            try:  # the database first: it is what the role owns
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {quote(name)} WITH (FORCE)"))
                gone = roles.drop(conn, Role(name, None, throwaway=True), server)
            except sa.exc.DBAPIError as exc:
                server.log.warning("verify.sweep", f"could not drop the stale scratch database or role "
                                   f"{name}: {reason(exc)}")
                continue
            if gone:
                server.log("verify.sweep", f"dropped the stale scratch database {name} and its role "
                           "(left by an interrupted verify)")
                dropped.append(name)
    return dropped


def _stale(name: str, now: float) -> bool:
    m = _NAME.match(name)
    return bool(m) and now - calendar.timegm(time.strptime(m.group(1), "%Y%m%d%H%M%S")) >= STALE_AFTER


def _admin(server: Run) -> Connection:
    """An AUTOCOMMIT control connection to the server's maintenance database (CREATE/DROP
    DATABASE cannot run in a transaction; control connections still work after a cancel)."""
    return db.connect(server, "verify-admin", autocommit=True, connect_timeout=10)


@contextlib.contextmanager
def _env_pointing_at(scratch: Run) -> Iterator[None]:
    """While revisions run: an env.py that builds its own engine gets the scratch database, also
    when it reads DATABASE_URL itself instead of sqlalchemy.url: never the target."""
    # PGAPPNAME and PGOPTIONS listed as they are, so that they are restored after
    with environ.overlaid({"DATABASE_URL_FILE": None,
                           "DATABASE_URL": scratch.settings.database_url.render(hide_password=False),
                           "PGAPPNAME": os.environ.get("PGAPPNAME"),
                           "PGOPTIONS": os.environ.get("PGOPTIONS")}):
        db.apply_libpq_environment(scratch)
        yield
