"""Drift: compare a live database with the schema its own revision should have.

The live database is only read: one REPEATABLE READ, READ ONLY transaction (its revision and
its fingerprint from the same snapshot), no env.py, nothing written. The catalog reads take no
lock on a table, except where PostgreSQL's deparsers print a definition (pg_get_indexdef,
pg_get_constraintdef, pg_get_expr, pg_get_viewdef): they take ACCESS SHARE (the weakest lock,
which conflicts only with ACCESS EXCLUSIVE) on the table concerned until the read ends; the
session waits at most LIVE_LOCK_TIMEOUT for one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator

import sqlalchemy as sa

from runner import config, db, dburl
from runner.context import Run
from runner.db import sqlstate
from runner.dburl import DbUrl
from runner.errors import ConfigError, NotReady
from runner.revisions import fmt
from runner.sqlname import qualified
from runner.verify import fingerprint, sqlite_scratch
from runner.verify.fingerprint import Fingerprint, Table
from runner.verify.report import ERROR, Finding
from runner.wait.ready import reason

LIVE_LOCK_TIMEOUT = 5.0
LOCK_NOT_AVAILABLE = "55P03"
_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


@dataclasses.dataclass(frozen=True)
class Live:
    heads: tuple[str, ...]
    fingerprint: Fingerprint
    target: str  # host:port/database, for messages


def live_url(run: Run, var: str) -> DbUrl:
    """The URL held by the variable `verify --against VAR` names (or VAR_FILE); exit 2 without it."""
    if not _VAR.match(var):
        raise ConfigError(f"verify --against {var[:40]!r}: give the NAME of the variable that holds "
                          "the live database's URL, e.g. --against DATABASE_URL")
    if var == "DATABASE_URL" and run.settings.database_url.database:
        return run.settings.database_url
    errors: list[str] = []
    text = config.read_secret(os.environ, var, errors)
    if errors:
        raise ConfigError(errors[0])
    if not text:
        raise ConfigError(f"verify --against {var}: {var} is not set: set it to the live "
                          f"database's URL ({dburl.PLACEHOLDER})")
    try:
        return dburl.parse(text)
    except dburl.UrlError as exc:
        raise ConfigError(str(exc).replace("DATABASE_URL", var, 1)) from None


def read(run: Run, url: DbUrl, var: str, version: Table, exclude: list[Table]) -> Live:
    """Read the live database's revision and fingerprint, read-only, from one snapshot."""
    if url.is_sqlite or sqlite_scratch.applies(run):  # a SQLite file (or a mix, refused there)
        heads, fp = sqlite_scratch.read_live(run, url, var, version, exclude)
        run.log("verify.live", f"read the live database {url.safe_target} (read-only)", revision=fmt(heads))
        return Live(heads, fp, url.safe_target)
    with read_only(run, url, var) as conn:
        heads = _heads(conn, version)
        fp = fingerprint.query(conn, exclude)
    run.log("verify.live", f"read the live database {url.safe_target} (read-only)", revision=fmt(heads))
    return Live(heads, fp, url.safe_target)


def read_heads(run: Run, url: DbUrl, var: str, version: Table) -> tuple[str, ...]:
    """Read only the live database's revision(s), read-only."""
    if url.is_sqlite or sqlite_scratch.applies(run):
        return sqlite_scratch.read_heads(run, url, var, version)
    with read_only(run, url, var) as conn:
        return _heads(conn, version)


@contextlib.contextmanager
def read_only(run: Run, url: DbUrl, var: str) -> Iterator[sa.Connection]:
    """A REPEATABLE READ, READ ONLY transaction on the live database, rolled back at the end."""
    live = dataclasses.replace(run, settings=dataclasses.replace(run.settings, database_url=url))
    try:
        conn = db.connect(live, "verify-live", connect_timeout=10)
    except sa.exc.DBAPIError as exc:
        raise NotReady(f"{var}: cannot connect to {url.safe_target} ({reason(exc)}): check the URL "
                       "and that the database is reachable") from None
    with conn:
        conn.execution_options(isolation_level="REPEATABLE READ")  # one snapshot for every read
        trans = conn.begin()
        try:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            # PostgreSQL's deparsers (pg_get_indexdef, pg_get_constraintdef, pg_get_expr,
            # pg_get_viewdef) take ACCESS SHARE on the table they print: never wait long for one
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{int(LIVE_LOCK_TIMEOUT * 1000)}ms'")
            yield conn
        except sa.exc.DBAPIError as exc:
            if sqlstate(exc) != LOCK_NOT_AVAILABLE:
                raise
            raise NotReady(f"{var}: reading {url.safe_target}'s index, constraint or view definitions "
                           f"waited {LIVE_LOCK_TIMEOUT:g}s for a table another session holds in ACCESS "
                           "EXCLUSIVE mode (a migration running there?): run verify --against again "
                           "later") from None
        finally:
            trans.rollback()  # nothing to keep: it only read


def compare(live: Live, expected: Fingerprint, file: str | None) -> list[Finding]:
    """One finding per difference: '+' only in the live database (added by hand), '-' missing
    from it (dropped by hand), '~' defined differently."""
    return [Finding("drift", ERROR, f"{line} [{_side(line)}]", fmt(live.heads), file)
            for line in fingerprint.diff(expected, live.fingerprint)]


def _side(line: str) -> str:
    return {"+": "only in the live database", "-": "missing from the live database",
            "~": "migrations -> live database"}[line[0]]


def _heads(conn: sa.Connection, version: Table) -> tuple[str, ...]:
    schema, table = version
    name = qualified(schema, table)
    if conn.execute(sa.text("SELECT to_regclass(:n) IS NOT NULL"), {"n": name}).scalar_one() is False:
        return ()
    return tuple(sorted(conn.execute(sa.text(f"SELECT version_num FROM {name}")).scalars()))

