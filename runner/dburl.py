"""DATABASE_URL: parsed exactly as SQLAlchemy parses it, without importing SQLAlchemy.

The no-op fast path answers "already at head" before SQLAlchemy is imported, so the URL has a
small type of its own. The pattern is SQLAlchemy's (`sqlalchemy.engine.url._parse_url`); a test
checks both parsers agree. Everything ambiguous is refused here, before any connection: an
unencoded '@' would otherwise put part of a password into the host name that every log line prints.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from runner.redact import register_secret

_PATTERN = re.compile(
    r"""
        (?P<name>[\w\+]+)://
        (?:
            (?P<username>[^:/]*)
            (?::(?P<password>[^@]*))?
        @)?
        (?:
            (?:
                \[(?P<ipv6host>[^/\?]+)\] |
                (?P<ipv4host>[^/:\?]+)
            )?
            (?::(?P<port>[^/\?]*))?
        )?
        (?:/(?P<database>[^\?]*))?
        (?:\?(?P<query>.*))?
    """,
    re.X,
)
# drivers we accept; the runner's own connections always use psycopg2 (libpq)
DRIVERS = {"postgresql", "postgres", "psycopg2", "psycopg", "asyncpg", "pg8000", "psycopg2cffi"}
# SQLite for local development (docs/sqlite.md): the runner's own connections use pysqlite
SQLITE_DRIVERS = {"pysqlite", "aiosqlite"}
SECRET_PARAMS = ("password", "sslpassword")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
PLACEHOLDER = "postgresql://USER:PASSWORD@HOST:PORT/DB"


class UrlError(ValueError):
    """The URL is unusable; the message names the fix and contains no part of the URL."""


@dataclasses.dataclass(frozen=True)
class DbUrl:
    drivername: str
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    host: str | None = None
    port: int | None = None
    database: str | None = None
    query: Mapping[str, str | tuple[str, ...]] = dataclasses.field(default_factory=dict, repr=False)

    def set(self, **changes: Any) -> DbUrl:
        return dataclasses.replace(self, **changes)

    @property
    def is_sqlite(self) -> bool:
        """A SQLite file (local development), not a PostgreSQL server."""
        return self.drivername.startswith("sqlite")

    @property
    def name(self) -> str | None:
        """The database's name: PostgreSQL's database, a SQLite file's name without its directory
        (backups are kept per name)."""
        if self.is_sqlite and self.database:
            return self.database.rstrip("/").rpartition("/")[2]
        return self.database

    @property
    def safe_target(self) -> str:
        """host:port/database for logs: no user, no password (SQLite: the file's path)."""
        if self.is_sqlite:
            return str(self.database)
        host = self.host or _first(self.query.get("host")) or "local socket"
        return f"{host}:{self.port or 5432}/{self.database}"

    def libpq_params(self) -> dict[str, str]:
        """Connection keywords for libpq (psycopg2.connect, conninfo), as SQLAlchemy's psycopg2
        dialect builds them: the URL's parts, then every query parameter (last value wins)."""
        params = {"host": self.host, "port": str(self.port) if self.port else None,
                  "user": self.username, "password": self.password, "dbname": self.database}
        out = {k: v for k, v in params.items() if v is not None}
        for key, value in self.query.items():
            out[key] = ",".join(value) if isinstance(value, tuple) else value
        return out

    def render(self, hide_password: bool = True) -> str:
        """The URL as text (SQLAlchemy's quoting); the password masked unless asked otherwise."""
        s = f"{self.drivername}://"
        if self.username is not None:
            s += quote(self.username, safe=" +")
            if self.password is not None:
                s += ":" + ("***" if hide_password else quote(self.password, safe=" +"))
            s += "@"
        if self.host is not None:
            s += f"[{self.host}]" if ":" in self.host else self.host
        if self.port is not None:
            s += f":{self.port}"
        if self.database is not None:  # quoted: a '?' or '%' in a name must stay in the name
            s += "/" + quote(self.database, safe="+/")
        if self.query:
            pairs = [(k, v) for k, vs in self.query.items()
                     for v in (vs if isinstance(vs, tuple) else (vs,))]
            s += "?" + "&".join(f"{quote(k)}={quote('***' if hide_password and k in SECRET_PARAMS else v)}"
                                for k, v in pairs)
        return s

    def to_sqlalchemy(self) -> Any:
        """The same URL as a sqlalchemy.engine.URL (imports SQLAlchemy)."""
        from sqlalchemy.engine import URL

        return URL.create(self.drivername, username=self.username, password=self.password,
                          host=self.host, port=self.port, database=self.database,
                          query=dict(self.query))


def _first(value: str | tuple[str, ...] | None) -> str | None:
    return value[0] if isinstance(value, tuple) else value


def parse(raw: str) -> DbUrl:
    """Parse and check a PostgreSQL URL; raise UrlError naming the fix (never quoting the URL)."""
    m = _PATTERN.match(raw.strip())
    if m is None:
        raise UrlError(f"DATABASE_URL is not a valid URL: use {PLACEHOLDER} (percent-encode "
                       "special characters in the user and password)")
    parts = m.groupdict()
    password = unquote(parts["password"]) if parts["password"] is not None else None
    query: dict[str, str | tuple[str, ...]] = {}
    for key, value in parse_qsl(parts["query"] or ""):
        old = query.get(key)
        query[key] = value if old is None else (*(old if isinstance(old, tuple) else (old,)), value)
    for secret in (password, *(query.get(k) for k in SECRET_PARAMS)):
        for value in (secret if isinstance(secret, tuple) else (secret,)):
            if value:
                register_secret(value)
                register_secret(quote(value, safe=""))
    host = parts["ipv4host"] or parts["ipv6host"]
    username = unquote(parts["username"]) if parts["username"] is not None else None
    if "@" in (host or "") or "@" in (username or ""):
        raise UrlError("DATABASE_URL has an '@' in its user or password that is not "
                       "percent-encoded: write it as %40 (and ':' as %3A, '/' as %2F)")
    backend, _, driver = parts["name"].partition("+")
    if backend == "sqlite":
        return _sqlite(parts, driver, bool(query))
    if backend not in ("postgresql", "postgres") or (driver and driver not in DRIVERS):
        raise UrlError(f"DATABASE_URL uses '{parts['name']}': only PostgreSQL URLs, and sqlite:/// "
                       "files for local development, are supported (postgresql://, "
                       "postgresql+psycopg2://, +psycopg, +asyncpg, sqlite:///path.db)")
    port = _port(parts["port"])
    database = unquote(parts["database"]) if parts["database"] else None
    if not database:
        raise UrlError("DATABASE_URL names no database: append /DBNAME to the URL")
    _check_query(query)
    name = "postgresql" + (f"+{driver}" if driver else "")
    return DbUrl(name, username, password, host, port, database, query)


def _sqlite(parts: dict[str, Any], driver: str, has_query: bool) -> DbUrl:
    """A SQLite file, as SQLAlchemy reads it: sqlite:///relative.db, sqlite:////absolute.db."""
    if driver and driver not in SQLITE_DRIVERS:
        raise UrlError(f"DATABASE_URL uses 'sqlite+{driver}': use sqlite:///path.db (the runner "
                       "opens the file with Python's sqlite3)")
    if parts["username"] is not None or parts["ipv4host"] or parts["ipv6host"] or parts["port"]:
        raise UrlError("DATABASE_URL is a SQLite URL with a user or host: a SQLite URL names a file, "
                       "use sqlite:///relative/path.db or sqlite:////absolute/path.db")
    database = unquote(parts["database"]) if parts["database"] else ""
    if not database or database == ":memory:" or database.startswith("file:"):
        raise UrlError("DATABASE_URL is an in-memory or URI-form SQLite database: nothing would "
                       "persist and concurrent runners could not share it; name a file: "
                       "sqlite:///path.db (relative) or sqlite:////path.db (absolute)")
    if has_query:
        raise UrlError("DATABASE_URL is a SQLite URL with a query string: the runner opens the file "
                       "itself; remove the ?... part (sqlite:///path.db)")
    if database.endswith("/") or "\0" in database:
        raise UrlError("DATABASE_URL names a directory, not a SQLite file: use sqlite:///path.db")
    return DbUrl("sqlite" + (f"+{driver}" if driver else ""), database=database)


def _port(text: str | None) -> int | None:
    if not text:
        return None
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise UrlError("DATABASE_URL has an invalid port: use a number from 1 to 65535 "
                       "(percent-encode ':' in the password as %3A)")
    return int(text)


def _check_query(query: Mapping[str, str | tuple[str, ...]]) -> None:
    mode = _first(query.get("sslmode"))
    if mode is not None and mode not in SSLMODES:
        raise UrlError(f"DATABASE_URL has sslmode={mode!r}: use one of {', '.join(SSLMODES)}")
    timeout = _first(query.get("connect_timeout"))
    if timeout is not None and not timeout.isdigit():
        raise UrlError("DATABASE_URL has a connect_timeout that is not a whole number of seconds")
    unknown = [key for key in query if not _libpq_knows(key)]
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:3])
        raise UrlError(f"DATABASE_URL has query parameter(s) {shown} that libpq does not know: the "
                       "runner connects with libpq (psycopg2) whatever the driver; use libpq's "
                       "connection parameters (e.g. sslmode=require, not ssl=true)")


def _libpq_knows(key: str) -> bool:
    """Ask libpq's own conninfo parser: its keywords depend on its version."""
    import psycopg2.extensions  # only for URLs with a query string

    if not key.isidentifier():  # never hand the parser syntax of its own
        return False
    try:
        psycopg2.extensions.parse_dsn(f"{key}=''")
    except psycopg2.ProgrammingError:
        return False
    return True
