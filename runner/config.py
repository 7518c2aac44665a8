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
    Setting("HEAD_WAIT_TIMEOUT", "10m", "`wait --until-head` (init containers): how long to "
            "wait for the database to reach the image's head before exiting 10."),
    Setting("HEAD_POLL_INTERVAL", "5s", "`wait --until-head`: how often to read the database's "
            "revision (one log line per look)."),
    Setting("BACKUP_MODE", "required", "`required`: upgrade/downgrade back the database up to "
            "S3 before changing it (exit 5 when that fails); `off`: no backup (local development)."),
    Setting("BACKUP_S3_URI", "(required for backups)", "`s3://bucket/prefix`: where backups and "
            "their manifests go. Credentials, region and endpoint come from the AWS chain "
            "(`AWS_ENDPOINT_URL_S3` for S3-compatible stores, IRSA / Pod Identity in clusters)."),
    Setting("BACKUP_COMPRESSION", "zstd", "`zstd` (`pg_dump -Fc -Z0` piped through "
            "`zstd -1 -T0`: fast), `gzip` (pg_dump's own: slow) or `none`."),
    Setting("BACKUP_CHECKSUM", "when_supported", "boto3 request checksum policy; "
            "`when_required` for S3-compatible stores that reject boto3's default checksums."),
    Setting("BACKUP_LOCK_WAIT_TIMEOUT", "60s", "`pg_dump --lock-wait-timeout`: how long the "
            "dump may wait for a table lock held by another session before failing (exit 5)."),
    Setting("PG_DUMP_BIN", "pg_dump", "pg_dump to use (at least the server's major version)."),
    Setting("PG_RESTORE_BIN", "pg_restore", "pg_restore to use; `psql` is taken from the same "
            "directory (or PATH)."),
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
    head_wait_timeout: float = 600.0
    head_poll_interval: float = 5.0
    backup_mode: str = "required"
    backup_s3_uri: str = ""
    backup_compression: str = "zstd"
    backup_checksum: str = "when_supported"
    backup_lock_wait_timeout: float = 60.0
    pg_dump_bin: str = "pg_dump"
    pg_restore_bin: str = "pg_restore"

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


def _backup_settings(env: Mapping[str, str], command: str, errors: list[str]) -> dict[str, object]:
    """Read the BACKUP_* settings; the S3 URI is required only where a backup is needed."""
    mode = _choice(env, "BACKUP_MODE", ("required", "off"), errors)
    uri = env.get("BACKUP_S3_URI", "").strip()
    if uri and not re.match(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$", uri):
        errors.append(f"BACKUP_S3_URI={uri!r} is not an S3 URI: use s3://BUCKET/PREFIX")
    needs_uri = command in BACKUP_COMMANDS or (command in MIGRATE_COMMANDS and mode == "required")
    if needs_uri and not uri:
        errors.append("BACKUP_S3_URI is not set: set it to s3://BUCKET/PREFIX" + (
            "" if command in BACKUP_COMMANDS else
            ", or BACKUP_MODE=off to migrate without a backup (local development only)"))
    return dict(
        backup_mode=mode, backup_s3_uri=uri,
        backup_compression=_choice(env, "BACKUP_COMPRESSION", ("zstd", "gzip", "none"), errors),
        backup_checksum=_choice(env, "BACKUP_CHECKSUM", ("when_supported", "when_required"), errors),
        backup_lock_wait_timeout=_duration(env, "BACKUP_LOCK_WAIT_TIMEOUT", 60.0, errors),
        pg_dump_bin=env.get("PG_DUMP_BIN") or "pg_dump",
        pg_restore_bin=env.get("PG_RESTORE_BIN") or "pg_restore",
    )


BACKUP_COMMANDS = ("backup", "backups", "restore")
MIGRATE_COMMANDS = ("upgrade", "downgrade")


def load(environ: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None,
         need_database: bool = True, command: str = "") -> Settings:
    """Build Settings from the environment (flags in overrides win).

    command decides whether BACKUP_S3_URI is required (backup commands; upgrade and downgrade
    unless BACKUP_MODE=off).

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
        head_wait_timeout=_duration(env, "HEAD_WAIT_TIMEOUT", 600.0, errors),
        head_poll_interval=_duration(env, "HEAD_POLL_INTERVAL", 5.0, errors),
    )
    settings.update(_backup_settings(env, command, errors))
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
