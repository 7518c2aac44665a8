"""verify and `plan --scratch` on SQLite: the scratch database is a temporary file.

With a sqlite:/// DATABASE_URL and no VERIFY_DATABASE_URL, the chain is walked on a new file in
the system's temporary directory (removed at the end, whatever happens); DATABASE_URL's file is
never written, and read only by `--against` and `plan --scratch`. Round trips, models and drift
work as on PostgreSQL, with the fingerprint runner.verify.sqlite_fingerprint reads. Squawk's lint
and the lock observation are PostgreSQL's: off (the report says so). VERIFY_SETUP runs on each
fresh file; the server-side settings (VERIFY_TEMPLATE, VERIFY_EXTENSIONS, VERIFY_ROLE_URL) are
refused (runner.sqlite.refusals).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner import db, dburl, environ
from runner.context import Run
from runner.errors import ConfigError
from runner.revisions import DbState, stamped
from runner.sqlite import engine, files
from runner.verify import prepare, sqlite_fingerprint
from runner.verify.sqlite_fingerprint import Fingerprint, Table

POSTGRESQL_ONLY = "lint (Squawk) and the lock observation are PostgreSQL's: off on SQLite"


def applies(run: Run) -> bool:
    """Return whether verify runs on a temporary SQLite file (DATABASE_URL is SQLite,
    VERIFY_DATABASE_URL unset)."""
    return run.settings.verify_database_url is None and run.settings.database_url.is_sqlite


def adapt(run: Run) -> None:
    """Turn off what only PostgreSQL can do, and say so once."""
    run.settings = dataclasses.replace(run.settings, verify_lint="off", verify_locks="off")
    run.log("verify.sqlite", f"verify on SQLite: a temporary file; {POSTGRESQL_ONLY}")


class Scratch:
    """The scratch file of one run, with the parts of runner.verify.scratch.Scratch verify uses:
    `run` migrates it, `server` is the run itself (settings, log, cancellation)."""

    def __init__(self, server: Run, file: Path) -> None:
        self.server, self.file, self.name = server, file, file.name
        url = dburl.DbUrl("sqlite", database=str(file))
        self.run = dataclasses.replace(server, settings=dataclasses.replace(server.settings,
                                                                            database_url=url))

    def create(self) -> None:
        sqlite3.connect(self.file).close()  # an empty database
        setup = self.server.settings.verify_setup
        if setup is None:
            return
        if setup.suffix == ".py":
            with db.connect(self.run, "verify-setup") as conn:
                prepare.setup(conn, setup)
            return
        try:
            with sqlite3.connect(self.file) as conn:
                conn.executescript(setup.read_text())
        except (OSError, UnicodeDecodeError, sqlite3.Error) as exc:
            raise ConfigError(f"VERIFY_SETUP={setup} failed on the scratch file ({exc}): fix the "
                              "script") from None

    def drop(self) -> None:
        for leftover in (self.file, *(self.file.with_name(self.file.name + s)
                                      for s in ("-journal", "-wal", "-shm"))):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()

    def recreate(self) -> None:
        """Start over from an empty file (after a revision left it in an unknown state)."""
        self.drop()
        self.server.log("verify.scratch", "removed the scratch file to rebuild it")
        self.create()

    def cancel(self) -> int:
        return engine.interrupt(self.run)


@contextlib.contextmanager
def scratch_database(run: Run) -> Iterator[Scratch]:
    """Yield a new temporary file for the run, removed whatever happens; env.py files that read
    DATABASE_URL themselves get the scratch file's, never the target's."""
    with tempfile.TemporaryDirectory(prefix=f"runner-verify-{run.run_id}-") as work:
        scratch = Scratch(run, Path(work) / "scratch.db")
        scratch.create()
        run.log("verify.scratch", f"created the scratch file {scratch.file}")
        with environ.overlaid({"DATABASE_URL_FILE": None,
                               "DATABASE_URL": scratch.run.settings.database_url.render()}):
            yield scratch


def read_live(run: Run, url: dburl.DbUrl, var: str, version: Table,
              exclude: list[Table]) -> tuple[tuple[str, ...], Fingerprint]:
    """Read `verify --against`'s SQLite file: its revision and fingerprint, read-only, in one read
    transaction. A PostgreSQL database against a SQLite scratch, or the reverse, is refused."""
    with _read_only(run, url, var) as conn:
        return _heads(conn, version), sqlite_fingerprint.read(conn, exclude)


def read_heads(run: Run, url: dburl.DbUrl, var: str, version: Table) -> tuple[str, ...]:
    with _read_only(run, url, var) as conn:
        return _heads(conn, version)


@contextlib.contextmanager
def _read_only(run: Run, url: dburl.DbUrl, var: str) -> Iterator[Connection]:
    if not (url.is_sqlite and applies(run)):
        raise ConfigError(f"verify --against {var}: the scratch database is "
                          f"{'a SQLite file' if applies(run) else 'PostgreSQL'} and {var} is "
                          f"{'a SQLite file' if url.is_sqlite else 'PostgreSQL'}: compare a database "
                          "with a scratch database of its own kind")
    file = files.path(url)
    if not file.is_file():
        raise ConfigError(f"verify --against {var}: {file} does not exist: fix the path")
    eng = sa.create_engine("sqlite+pysqlite://", poolclass=sa.pool.NullPool, creator=lambda: sqlite3.connect(
        files.uri(file, read_only=True), uri=True, timeout=engine.BUSY_TIMEOUT, isolation_level=None))
    engine.transactional(eng)
    with eng.connect() as conn, conn.begin():  # one read transaction: one state of the file
        yield conn


def _heads(conn: Connection, version: Table) -> tuple[str, ...]:
    schema, table = version
    return tuple(sorted(stamped(conn, DbState((), table, schema))))
