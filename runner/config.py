"""Settings: one immutable object built once from an injectable environment mapping.

Every problem is collected and reported in one go; secrets never appear in repr().
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

from sqlalchemy.engine import URL, make_url

from runner.errors import ConfigError
from runner.redact import register_secret

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
# drivers we accept in DATABASE_URL; the runner's own connections always use psycopg2
_PG_DRIVERS = {"postgresql", "postgres", "psycopg2", "psycopg", "asyncpg", "pg8000", "psycopg2cffi"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One documented setting: the README table is rendered from these."""

    env: str
    default: str
    help: str
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("DATABASE_URL", "(required)", "SQLAlchemy PostgreSQL URL; any driver "
            "(postgresql://, +psycopg2, +psycopg, +asyncpg). `DATABASE_URL_FILE` reads it "
            "from a file. Use a direct connection, not a transaction-mode PgBouncer.", True),
    Setting("ALEMBIC_CONFIG", "./alembic.ini", "Path to alembic.ini (flag `-c`)."),
    Setting("DB_WAIT_TIMEOUT", "60s", "How long to wait for the database to be ready."),
    Setting("LOCK_WAIT_TIMEOUT", "300s", "How long to wait for the migration lock."),
    Setting("MIGRATION_LOCK_TIMEOUT", "4s", "`lock_timeout` for migration statements: how "
            "long one DDL may queue behind other sessions' table locks before it is retried."),
    Setting("MIGRATION_STATEMENT_TIMEOUT", "0 (off)", "`statement_timeout` for migration "
            "statements; when set it must exceed MIGRATION_LOCK_TIMEOUT."),
    Setting("LOCK_RETRY_ATTEMPTS", "10", "Attempts per revision when a statement hits "
            "lock_timeout (SQLSTATE 55P03)."),
    Setting("LOCK_RETRY_MAX_WAIT", "30s", "Longest backoff between lock_timeout retries."),
    Setting("INVALID_INDEX_POLICY", "drop", "`drop`: drop an INVALID index left by an "
            "interrupted CREATE INDEX CONCURRENTLY before retrying; `refuse`: stop (exit 7)."),
    Setting("RUN_DEADLINE", "0 (off)", "Total budget for the run; waits and retries stop "
            "in time to exit 9 cleanly. Set it below the Job's activeDeadlineSeconds."),
    Setting("LOG_FORMAT", "text", "`text` or `json` (one event per line on stderr)."),
    Setting("APPLICATION_NAME", "migration-runner", "application_name prefix of every "
            "runner connection, visible in pg_stat_activity."),
    Setting("TERMINATION_MESSAGE_PATH", "(unset)", "Where to write the JSON run summary "
            "(Kubernetes: /dev/termination-log)."),
)


def parse_duration(value: str) -> float:
    """Parse '30', '30s', '500ms', '5m', '1h' into seconds; raise ValueError otherwise."""
    m = _DURATION.match(value)
    if not m:
        raise ValueError(value)
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclasses.dataclass(frozen=True)
class Settings:
    database_url: URL = dataclasses.field(repr=False)
    alembic_config: Path
    wait_timeout: float = 60.0
    lock_wait_timeout: float = 300.0
    migration_lock_timeout: float = 4.0
    migration_statement_timeout: float = 0.0
    lock_retry_attempts: int = 10
    lock_retry_max_wait: float = 30.0
    invalid_index_policy: str = "drop"
    run_deadline: float = 0.0
    log_format: str = "text"
    application_name: str = "migration-runner"
    termination_message_path: str | None = None

    @property
    def sync_url(self) -> URL:
        """Return the URL the runner's own connections use (psycopg2, whatever the app uses)."""
        return self.database_url.set(drivername="postgresql+psycopg2")

    @property
    def safe_target(self) -> str:
        """Return host:port/database for logs: no user, no password."""
        u = self.database_url
        return f"{u.host or 'local socket'}:{u.port or 5432}/{u.database}"


def _read_database_url(env: Mapping[str, str], errors: list[str]) -> URL | None:
    raw = env.get("DATABASE_URL", "")
    path = env.get("DATABASE_URL_FILE", "")
    if path and raw:
        errors.append("DATABASE_URL and DATABASE_URL_FILE are both set: keep only one")
        return None
    if path:
        try:
            raw = Path(path).read_text().strip()
        except OSError as exc:
            errors.append(f"DATABASE_URL_FILE={path} cannot be read ({exc.strerror}): "
                          "mount the secret file or fix the path")
            return None
    if not raw:
        errors.append("DATABASE_URL is not set: set it to postgresql://USER:PASSWORD@HOST:PORT/DB")
        return None
    return _parse_url(raw, errors)


def _parse_url(raw: str, errors: list[str]) -> URL | None:
    try:
        url = make_url(raw)
        if url.password:
            register_secret(str(url.password))
            register_secret(quote(str(url.password), safe=""))
        _ = url.port  # the port is parsed lazily; make a bad one fail here
    except Exception:  # noqa: BLE001 - any parse failure is the same operator mistake
        errors.append("DATABASE_URL is not a valid URL: use postgresql://USER:PASSWORD@HOST:PORT/DB "
                      "(percent-encode special characters in the password)")
        return None
    backend, _, driver = url.drivername.partition("+")
    if backend not in ("postgresql", "postgres") or (driver and driver not in _PG_DRIVERS):
        errors.append(f"DATABASE_URL uses '{url.drivername}': only PostgreSQL URLs are supported "
                      "(postgresql://, postgresql+psycopg2://, +psycopg, +asyncpg)")
        return None
    if not url.database:
        errors.append("DATABASE_URL names no database: append /DBNAME to the URL")
        return None
    if backend == "postgres":
        url = url.set(drivername="postgresql" + (f"+{driver}" if driver else ""))
    return url


def _duration(env: Mapping[str, str], name: str, default: float, errors: list[str],
              allow_zero: bool = False) -> float:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        value = parse_duration(raw)
    except ValueError:
        errors.append(f"{name}={raw!r} is not a duration: use seconds or a unit, e.g. 30s, 500ms, 5m")
        return default
    if value <= 0 and not allow_zero:
        errors.append(f"{name}={raw!r} must be greater than zero")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, errors: list[str]) -> int:
    raw = env.get(name, "")
    if raw == "":
        return default
    if not raw.strip().isdigit() or int(raw) < 1:
        errors.append(f"{name}={raw!r} must be a whole number of at least 1")
        return default
    return int(raw)


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], errors: list[str]) -> str:
    raw = env.get(name, "") or choices[0]
    if raw not in choices:
        errors.append(f"{name}={raw!r} is not one of: {', '.join(choices)}")
        return choices[0]
    return raw


def load(environ: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None,
         need_database: bool = True) -> Settings:
    """Build Settings from the environment (flags in overrides win).

    Raise ConfigError listing every problem at once.
    """
    env = dict(os.environ if environ is None else environ)
    env.update({k: v for k, v in (overrides or {}).items() if v is not None})
    errors: list[str] = []
    url = _read_database_url(env, errors) if need_database else None
    alembic_config = Path(env.get("ALEMBIC_CONFIG") or "alembic.ini")
    if not alembic_config.is_file():
        errors.append(f"ALEMBIC_CONFIG={alembic_config} is not a readable file: "
                      "point ALEMBIC_CONFIG (or -c) at your alembic.ini")
    elif not os.access(alembic_config, os.R_OK):
        errors.append(f"ALEMBIC_CONFIG={alembic_config} is not readable: fix its permissions")
    settings = dict(
        wait_timeout=_duration(env, "DB_WAIT_TIMEOUT", 60.0, errors),
        lock_wait_timeout=_duration(env, "LOCK_WAIT_TIMEOUT", 300.0, errors),
        migration_lock_timeout=_duration(env, "MIGRATION_LOCK_TIMEOUT", 4.0, errors),
        migration_statement_timeout=_duration(env, "MIGRATION_STATEMENT_TIMEOUT", 0.0, errors,
                                              allow_zero=True),
        lock_retry_attempts=_integer(env, "LOCK_RETRY_ATTEMPTS", 10, errors),
        lock_retry_max_wait=_duration(env, "LOCK_RETRY_MAX_WAIT", 30.0, errors),
        invalid_index_policy=_choice(env, "INVALID_INDEX_POLICY", ("drop", "refuse"), errors),
        run_deadline=_duration(env, "RUN_DEADLINE", 0.0, errors, allow_zero=True),
        log_format=_choice(env, "LOG_FORMAT", ("text", "json"), errors),
        application_name=env.get("APPLICATION_NAME") or "migration-runner",
        termination_message_path=env.get("TERMINATION_MESSAGE_PATH") or None,
    )
    st, lt = settings["migration_statement_timeout"], settings["migration_lock_timeout"]
    if st and st <= lt:
        errors.append(f"MIGRATION_STATEMENT_TIMEOUT ({st:g}s) must be greater than "
                      f"MIGRATION_LOCK_TIMEOUT ({lt:g}s): raise it or set it to 0 (off)")
    if len(settings["application_name"]) > 40:
        errors.append("APPLICATION_NAME is longer than 40 characters: shorten it "
                      "(PostgreSQL keeps 63 and the runner appends a suffix)")
    if errors:
        raise ConfigError("; ".join(errors))
    return Settings(database_url=url or URL.create("postgresql"), alembic_config=alembic_config,
                    **settings)  # type: ignore[arg-type]
