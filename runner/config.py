"""Settings: each declared once (variable, default, parser, help) as a field of one immutable object.

`load()` builds that object from an injectable environment mapping and reports every problem in
one go; the README's configuration table is rendered from the same declarations. Secrets never
appear in repr(). Importing this module does not import SQLAlchemy (the no-op fast path needs it
to be cheap).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from runner import dburl
from runner.dburl import DbUrl
from runner.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
DAY = 86400.0
WEEK = 7 * DAY
MAX_PATH = 4096  # PATH_MAX: longer paths fail in the kernel with "File name too long"
BACKUP_COMMANDS = ("backup", "backups", "restore")
MIGRATE_COMMANDS = ("upgrade", "downgrade")
DUMP_MODES = ("required", "both")  # the BACKUP_MODEs that take a pg_dump before migrating
POINT_MODES = ("restore-point", "both")  # ... and those that mark a restore point


def parse_duration(value: str) -> float:
    """Parse '30', '30s', '500ms', '5m', '1h' into seconds; raise ValueError otherwise."""
    m = _DURATION.match(value)
    if not m:
        raise ValueError(value)
    return float(m.group(1)) * _UNITS[m.group(2)]


# -- parsers: text -> value, or ValueError whose message completes "NAME='raw' ..." --------------

Parser = Callable[[str], Any]


def duration(maximum: float = DAY, zero: bool = False, pg: bool = False) -> Parser:
    """A duration up to maximum; zero allowed (meaning off) when zero; pg: whole milliseconds,
    since PostgreSQL rounds 0.5ms to 0, which turns a timeout off."""

    def parse(raw: str) -> float:
        try:
            value = parse_duration(raw)
        except ValueError:
            raise ValueError("is not a duration: use seconds or a unit, e.g. 30s, 500ms, 5m") from None
        if value == 0 and not zero:
            raise ValueError("must be greater than zero")
        if value > maximum:
            off = " (0 turns it off)" if zero else ""
            raise ValueError(f"is too long: at most {_human(maximum)}{off}")
        if pg and value and (value < 0.001 or abs(value * 1000 - round(value * 1000)) > 1e-6):
            raise ValueError("must be a whole number of milliseconds (PostgreSQL would round it, "
                             "and 0 turns the timeout off)")
        return value

    return parse


def integer(minimum: int = 1, maximum: int = 1000) -> Parser:
    def parse(raw: str) -> int:
        if not raw.strip().isdigit() or not minimum <= int(raw) <= maximum:
            raise ValueError(f"must be a whole number from {minimum} to {maximum}")
        return int(raw)

    return parse


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|kB|KB|MB|GB|TB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}


def size(maximum: int = 1 << 50) -> Parser:
    """A size in bytes: a number with an optional unit (kB, MB, GB, TB: powers of 1024)."""

    def parse(raw: str) -> int:
        m = _SIZE.match(raw)
        if not m:
            raise ValueError("is not a size: use bytes or a unit, e.g. 512MB, 1GB")
        value = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])
        if value > maximum:
            raise ValueError(f"is too large: at most {maximum >> 30} GB")
        return value

    return parse


def jobs(raw: str) -> int | None:
    """A number of parallel jobs (1 to 64), or 'auto' (None: the CPUs available)."""
    if raw.strip() == "auto":
        return None
    return integer(1, 64)(raw)


def choice(*options: str) -> Parser:
    def parse(raw: str) -> str:
        if raw not in options:
            raise ValueError(f"is not one of: {', '.join(options)}")
        return raw

    return parse


def text(maximum: int = 200) -> Parser:
    def parse(raw: str) -> str:
        if len(raw) > maximum or any(ord(c) < 32 for c in raw):
            raise ValueError(f"must be at most {maximum} printable characters")
        return raw

    return parse


def path(raw: str) -> Path:
    if len(raw) > MAX_PATH or any(len(part) > 255 for part in raw.split("/")):
        raise ValueError("is too long to be a file name: use a shorter path")
    if "\0" in raw:
        raise ValueError("contains a NUL byte")
    return Path(raw)


def names(raw: str) -> tuple[str, ...]:
    """A comma- or space-separated list (revision ids, ...)."""
    items = tuple(x for x in re.split(r"[,\s]+", raw) if x)
    if any(not re.fullmatch(r"[\w.\-]{1,128}", x) for x in items):
        raise ValueError("must be a comma-separated list of revision ids")
    return items


def identifier_or_off(raw: str) -> str:
    if raw != "off" and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", raw):
        raise ValueError("must be a table name (letters, digits, _; at most 63) or 'off'")
    return raw


def extension_names(raw: str) -> tuple[str, ...]:
    items = tuple(x for x in re.split(r"[,\s]+", raw) if x)
    if any(not re.fullmatch(r"[A-Za-z_][\w\-]{0,62}", x) for x in items):
        raise ValueError("must be a comma-separated list of extension names, e.g. postgis,bloom")
    return items


def database_name(raw: str) -> str:
    if len(raw.encode()) > 63 or any(ord(c) < 32 for c in raw) or not raw.strip():
        raise ValueError("must be a database name (at most 63 bytes)")
    return raw


def setup_file(raw: str) -> Path:
    found = path(raw)
    if found.suffix not in (".sql", ".py"):
        raise ValueError("must be a .sql file or a .py file defining setup(connection)")
    return found


def s3_uri(raw: str) -> str:
    if raw and not re.match(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\x00-\x1f]*)?$", raw):
        raise ValueError("is not an S3 URI: use s3://BUCKET/PREFIX")
    return raw


def optional_index(raw: str) -> int | None:
    if not raw.strip().isdigit():
        raise ValueError("must be a whole number (Kubernetes sets it for Indexed Jobs)")
    return int(raw)


def _human(seconds: float) -> str:
    for unit, size in (("d", DAY), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


# -- declarations ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Setting:
    """One documented setting: the Settings field, load() and the README table come from it."""

    env: str
    default: str  # as documented; parsed for the field's default unless shown is given
    help: str
    parse: Parser = str
    secret: bool = False
    shown: str | None = None  # the README's default column when it is not a parsable value
    group: str = "core"


_UNSET: Any = object()


def setting(env: str, default: str, help: str, parse: Parser = str, *, secret: bool = False,
            shown: str | None = None, value: Any = _UNSET, group: str = "core") -> Any:
    """Declare a Settings field: its variable, documented default, parser and help.

    The field's default is parse(default), or value when given (unset means None, (), ...).
    """
    spec = Setting(env, default, help, parse, secret, shown, group)
    initial = value if value is not _UNSET else parse(default) if default else ""
    return dataclasses.field(default=initial, repr=not secret, metadata={"setting": spec})


@dataclasses.dataclass(frozen=True)
class Settings:
    database_url: DbUrl = setting(
        "DATABASE_URL", "", "SQLAlchemy PostgreSQL URL; any driver (postgresql://, +psycopg2, "
        "+psycopg, +asyncpg). `DATABASE_URL_FILE` reads it from a file. Percent-encode `@ : / ? #` "
        "in the user and password. Use a direct connection, not a transaction-mode PgBouncer. "
        "Local development: `sqlite:///path.db` (docs/sqlite.md).",
        secret=True, shown="(required)", value=DbUrl("postgresql"))
    alembic_config: Path = setting("ALEMBIC_CONFIG", "alembic.ini", "Path to alembic.ini (flag `-c`).",
                                   path, shown="./alembic.ini")
    wait_timeout: float = setting("DB_WAIT_TIMEOUT", "60s", "How long to wait for the database to "
                                  "be ready.", duration())
    auth_timeout: float = setting(
        "DB_AUTH_TIMEOUT", "30s", "How long authentication failures (wrong password, unknown role, "
        "missing database) are retried, within DB_WAIT_TIMEOUT: roles and secrets provisioned by an "
        "operator can arrive late. Then exit 12; 0 fails at the first one.", duration(zero=True))
    lock_wait_timeout: float = setting("LOCK_WAIT_TIMEOUT", "300s", "How long to wait for the "
                                       "migration lock.", duration())
    migration_lock_timeout: float = setting(
        "MIGRATION_LOCK_TIMEOUT", "4s", "`lock_timeout` of every attempt with "
        "LOCK_TIMEOUT_SCHEDULE=fixed; with `escalate` it sets the schedule's patience (see "
        "LOCK_TIMEOUT_SCHEDULE) and stays the `lock_timeout` of CONCURRENTLY statements, which "
        "never block the application's queries.", duration(pg=True))
    lock_timeout_schedule: str = setting(
        "LOCK_TIMEOUT_SCHEDULE", "escalate", "`escalate`: a revision's attempts get a `lock_timeout` "
        "starting at LOCK_TIMEOUT_START and doubling up to LOCK_TIMEOUT_CEILING (a DDL queued for "
        "its lock stalls the application's queries on that table that long at most), with jittered "
        "pauses, until attempts and pauses add up to the `fixed` schedule's total (132 s with the "
        "defaults); `fixed`: LOCK_RETRY_ATTEMPTS attempts of MIGRATION_LOCK_TIMEOUT (the behaviour "
        "before the schedule existed).",
        choice("escalate", "fixed"))
    lock_timeout_start: float = setting(
        "LOCK_TIMEOUT_START", "100ms", "`escalate`: the first attempt's `lock_timeout`.",
        duration(3600.0, pg=True))
    lock_timeout_ceiling: float = setting(
        "LOCK_TIMEOUT_CEILING", "500ms", "`escalate`: the longest `lock_timeout`, hence the longest "
        "an application query waits behind a queued DDL of the runner.", duration(3600.0, pg=True))
    migration_statement_timeout: float = setting(
        "MIGRATION_STATEMENT_TIMEOUT", "0", "`statement_timeout` for migration statements; when "
        "set it must exceed every `lock_timeout` (MIGRATION_LOCK_TIMEOUT, LOCK_TIMEOUT_CEILING).",
        duration(WEEK, zero=True, pg=True), shown="0 (off)")
    lock_retry_attempts: int = setting("LOCK_RETRY_ATTEMPTS", "10", "`fixed`: attempts per revision "
                                       "when a statement hits lock_timeout (SQLSTATE 55P03); "
                                       "`escalate`: sets its patience.", integer(1, 1000))
    lock_retry_max_wait: float = setting("LOCK_RETRY_MAX_WAIT", "30s", "Longest pause between two "
                                         "attempts (both schedules).", duration(3600.0))
    deploy_phase: str = setting(
        "DEPLOY_PHASE", "all", "Which revisions `upgrade` applies: `all`, `pre-deploy` or "
        "`post-deploy` (flag `--phase`). `all` is for development; `pre-deploy` (the Job before the "
        "rollout) applies every revision not marked post-deploy; `post-deploy` (the Job after it) "
        "the revisions whose module sets `runner_phase = \"post-deploy\"`. `status` reports and "
        "checks the same phase.",
        choice("all", "pre-deploy", "post-deploy"))
    invalid_index_policy: str = setting(
        "INVALID_INDEX_POLICY", "drop", "`drop`: when a revision is about to build an index that an "
        "interrupted CREATE INDEX CONCURRENTLY of that same revision left INVALID, drop it first; "
        "`refuse`: stop (exit 7). Other INVALID indexes are reported, never touched.",
        choice("drop", "refuse"))
    run_deadline: float = setting("RUN_DEADLINE", "0", "Total budget for the run; waits and retries "
                                  "stop in time to exit 9 cleanly. Set it below the Job's "
                                  "activeDeadlineSeconds.", duration(WEEK, zero=True), shown="0 (off)")
    log_format: str = setting("LOG_FORMAT", "text", "`text` or `json` (one event per line on stderr).",
                              choice("text", "json"))
    application_name: str = setting("APPLICATION_NAME", "migration-runner", "application_name prefix "
                                    "of every runner connection, visible in pg_stat_activity.", text(40))
    termination_message_path: str | None = setting(
        "TERMINATION_MESSAGE_PATH", "", "Where to write the JSON run summary (Kubernetes: "
        "/dev/termination-log).", lambda raw: str(path(raw)), shown="(unset)", value=None)
    head_wait_timeout: float = setting("HEAD_WAIT_TIMEOUT", "10m", "`wait --until-head` (init "
                                       "containers): how long to wait for the database to reach the "
                                       "image's head before exiting 10.", duration(WEEK))
    head_poll_interval: float = setting("HEAD_POLL_INTERVAL", "5s", "`wait --until-head`: how often "
                                        "to read the database's revision (one log line per look).",
                                        duration(3600.0))
    fast_path: str = setting("FAST_PATH", "on", "`on`: answer a no-op `upgrade` / `wait --until-head` "
                             "from the facts recorded in the image with one query, when they match "
                             "the scripts present; `off`: always run env.py.", choice("on", "off"))
    # -- backups ---------------------------------------------------------------------------------
    backup_mode: str = setting(
        "BACKUP_MODE", "required", "`required`: upgrade/downgrade back the database up to S3 (a "
        "pg_dump) before changing it (exit 5 when that fails); `restore-point`: check that WAL "
        "archiving is healthy and mark a restore point instead (large databases with point-in-time "
        "recovery: docs/backups.md); `both`: the dump and the point; `off`: no backup (local "
        "development).", choice("required", "restore-point", "both", "off"), group="backup")
    backup_s3_uri: str = setting(
        "BACKUP_S3_URI", "", "`s3://bucket/prefix`: where backups and their manifests go. "
        "Credentials, region and endpoint come from the AWS chain (`AWS_ENDPOINT_URL_S3` for "
        "S3-compatible stores, IRSA / Pod Identity in clusters).", s3_uri,
        shown="(required for backups)", group="backup")
    backup_compression: str = setting("BACKUP_COMPRESSION", "zstd", "`zstd` (`pg_dump -Fc -Z0` piped "
                                      "through `zstd -1 -T0`: fast), `gzip` (pg_dump's own: slow) or "
                                      "`none`.", choice("zstd", "gzip", "none"), group="backup")
    backup_checksum: str = setting("BACKUP_CHECKSUM", "when_supported", "boto3 request checksum "
                                   "policy; `when_required` for S3-compatible stores that reject "
                                   "boto3's default checksums.",
                                   choice("when_supported", "when_required"), group="backup")
    backup_lock_wait_timeout: float = setting(
        "BACKUP_LOCK_WAIT_TIMEOUT", "60s", "`pg_dump --lock-wait-timeout`: how long the dump may wait "
        "for a table lock held by another session before failing (exit 5).", duration(pg=True),
        group="backup")
    s3_timeout: float = setting("S3_TIMEOUT", "30s", "Longest wait for one S3 request (connect and "
                                "each read) before it is retried or fails (exit 5); a hung endpoint "
                                "is logged while the runner waits.", duration(3600.0), group="backup")
    archive_max_lag: int = setting(
        "ARCHIVE_MAX_LAG", "1GB", "`restore-point`/`both`: how much completed WAL may wait to be "
        "archived before the archiver counts as falling behind (exit 5).", size(), group="backup")
    archive_confirm_timeout: float = setting(
        "ARCHIVE_CONFIRM_TIMEOUT", "60s", "`restore-point`/`both`: how long to wait, before "
        "migrating, for the WAL holding the restore point to be archived (after a forced WAL "
        "switch); exit 5 when it is not. 0: do not wait.", duration(3600.0, zero=True),
        group="backup")
    archive_unverifiable: str = setting(
        "ARCHIVE_UNVERIFIABLE", "refuse", "`restore-point`/`both`, when the server does not let the "
        "role see WAL archiving (pg_stat_archiver, hidden by some managed services): `refuse` "
        "(exit 5) or `warn` (record the time and WAL position, migrate, and say the archive was "
        "not checked).",
        choice("refuse", "warn"), group="backup")
    backup_jobs: int = setting(
        "BACKUP_JOBS", "1", "Parallel pg_dump jobs. Above 1: a directory-format dump, each table's "
        "file shipped to S3 as pg_dump closes it (local disk in BACKUP_WORKDIR holds the files being "
        "written: at worst the largest tables, uncompressed); 1 streams one archive, no local disk.",
        integer(1, 64), group="backup")
    restore_jobs: int | None = setting(
        "RESTORE_JOBS", "auto", "`restore`: parallel pg_restore jobs. Above 1 the backup is first "
        "copied to BACKUP_WORKDIR and verified, restored into a new database with that many jobs, "
        "and swapped in by renames (needs CREATEDB and ownership of the database; ends the other "
        "sessions on it: docs/backups.md); 1 streams it into the database in one transaction. "
        "`auto`: the CPUs available for archives of 1 GB or more, falling back to 1 where a "
        "parallel restore cannot run.",
        jobs, shown="auto", value=None, group="backup")
    backup_workdir: Path | None = setting(
        "BACKUP_WORKDIR", "", "Local directory for parallel dumps' files and for restores' verified "
        "copy of a backup (the space needed is checked and logged first).", path,
        shown="(the system's temporary directory)", value=None, group="backup")
    pg_dump_bin: str = setting("PG_DUMP_BIN", "pg_dump", "pg_dump to use (at least the server's major "
                               "version).", text(MAX_PATH), group="backup")
    pg_restore_bin: str = setting("PG_RESTORE_BIN", "pg_restore", "pg_restore to use; `psql` is taken "
                                  "from the same directory (or PATH).", text(MAX_PATH), group="backup")
    # -- history -----------------------------------------------------------------------------------
    history_table: str = setting("HISTORY_TABLE", "runner_history", "The ledger table (in the version "
                                 "table's schema): one row per run that changed something or failed; "
                                 "`off` disables it.", identifier_or_off, group="history")
    allow_edited_revisions: tuple[str, ...] = setting(
        "ALLOW_EDITED_REVISIONS", "", "Applied revisions whose script may differ from the checksum "
        "recorded when they ran (comma-separated ids); others are refused (exit 7).", names,
        shown="(none)", value=(), group="history")
    image_version: str = setting("RUNNER_IMAGE_VERSION", "", "Set by the image (build arg VERSION); "
                                 "recorded in the ledger.", text(), shown="(from the image)",
                                 group="history")
    image_revision: str = setting("RUNNER_IMAGE_REVISION", "", "Set by the image (build arg "
                                  "REVISION); recorded in the ledger.", text(), shown="(from the image)",
                                  group="history")
    pod_name: str = setting("POD_NAME", "", "Recorded in the ledger (Kubernetes downward API "
                            "`metadata.name`; the host name otherwise).", text(253),
                            shown="(host name)", group="history")
    job_name: str = setting("JOB_NAME", "", "Recorded in the ledger (downward API, label "
                            "`batch.kubernetes.io/job-name`).", text(253), shown="(unset)",
                            group="history")
    # -- verify ------------------------------------------------------------------------------------
    verify_database_url: DbUrl | None = setting(
        "VERIFY_DATABASE_URL", "", "`verify`: the admin connection to a server where the runner may "
        "create and drop a throwaway database and role (CREATEDB and CREATEROLE; never the target); "
        "the revisions run as that least-privilege role. `VERIFY_DATABASE_URL_FILE` reads it from a "
        "file.",
        secret=True, shown="(required for verify)", value=None, group="verify")
    verify_lint: str = setting("VERIFY_LINT", "error", "`verify`: lint findings are `error` (exit 13), "
                               "`warn` (reported only) or `off`.", choice("error", "warn", "off"),
                               group="verify")
    # -- online operations (docs/online.md) ---------------------------------------------------------
    online_index_wait_timeout: float = setting(
        "ONLINE_INDEX_WAIT_TIMEOUT", "10m", "How long one CREATE/DROP INDEX CONCURRENTLY of an online "
        "operation may wait, in total, for transactions older than it (those waits do not block the "
        "application; its wait for the table lock follows the lock_timeout schedule). Then it is "
        "cancelled and the run exits 8 naming those transactions.", duration(WEEK), group="online")
    online_backfill_batch_size: int = setting(
        "ONLINE_BACKFILL_BATCH_SIZE", "1000", "Rows in a backfill's first batch; later batches are "
        "sized to take ONLINE_BACKFILL_BATCH_TIME.", integer(1, 1_000_000), group="online")
    online_backfill_max_batch_size: int = setting(
        "ONLINE_BACKFILL_MAX_BATCH_SIZE", "50000", "Most rows in one backfill batch (each batch holds "
        "its rows' locks until it commits).", integer(1, 1_000_000), group="online")
    online_backfill_batch_time: float = setting(
        "ONLINE_BACKFILL_BATCH_TIME", "150ms", "The time each backfill batch (one transaction) aims "
        "at: the batch size follows it.", duration(60.0), group="online")
    online_backfill_pause: float = setting(
        "ONLINE_BACKFILL_PAUSE", "20ms", "Pause between two backfill batches (0: none).",
        duration(60.0, zero=True), group="online")
    online_backfill_max_replication_lag: float = setting(
        "ONLINE_BACKFILL_MAX_REPLICATION_LAG", "10s", "A backfill waits between batches while a "
        "streaming replica (pg_stat_replication) lags more than this; 0 turns the check off.",
        duration(3600.0, zero=True), group="online")
    online_backfill_progress_interval: float = setting(
        "ONLINE_BACKFILL_PROGRESS_INTERVAL", "5s", "How often a backfill logs its progress (rows done "
        "of the estimated total, rows/s, ETA).", duration(3600.0), group="online")
    verify_role_url: DbUrl | None = setting(
        "VERIFY_ROLE_URL", "", "`verify`: run the revisions as this existing role (user and "
        "password; host and port must be VERIFY_DATABASE_URL's) instead of a throwaway one. It must "
        "be NOSUPERUSER NOCREATEDB NOCREATEROLE, and the VERIFY_DATABASE_URL role a member of it. "
        "`VERIFY_ROLE_URL_FILE` reads it from a file.", secret=True, shown="(a throwaway role)",
        value=None, group="verify")
    verify_extensions: tuple[str, ...] = setting(
        "VERIFY_EXTENSIONS", "", "`verify`: extensions created in the scratch database by the "
        "VERIFY_DATABASE_URL role before the first revision (comma-separated), for chains that need "
        "one the revisions' role may not create.", extension_names, shown="(none)", value=(),
        group="verify")
    verify_template: str | None = setting(
        "VERIFY_TEMPLATE", "", "`verify`: create the scratch database from this template database on "
        "the verify server (the tables a chain expects before its first revision).",
        database_name, shown="(template1)", value=None, group="verify")
    verify_setup: Path | None = setting(
        "VERIFY_SETUP", "", "`verify`: a `.sql` file, or a `.py` file defining `setup(connection)`, "
        "run on every fresh scratch database before the first revision, as the revisions' role.",
        setup_file, shown="(none)", value=None, group="verify")
    verify_roundtrip: str = setting(
        "VERIFY_ROUNDTRIP", "error", "`verify`: `error`: a downgrade that fails or does not undo its "
        "upgrade fails verify; `warn`: reported as warnings; `off`: upgrades only (lint, observed "
        "locks, models and drift still checked).", choice("error", "warn", "off"), group="verify")
    verify_locks: str = setting(
        "VERIFY_LOCKS", "error", "`verify`: findings from the locks and rewrites each revision was "
        "observed to take are `error` (exit 13 when they fail), `warn` (reported only) or `off` (not "
        "observed).", choice("error", "warn", "off"), group="verify")
    verify_max_lock_hold: float = setting(
        "VERIFY_MAX_LOCK_HOLD", "3s", "`verify --against`: the longest a revision may hold a lock that "
        "blocks the application (SHARE or stronger on an existing table), estimated from the live "
        "table's size; above it the finding is an error.", duration(3600.0, pg=True), group="verify")
    # -- fleets ------------------------------------------------------------------------------------
    targets_file: Path | None = setting(
        "TARGETS_FILE", "", "Fleet mode: one target per line (a full URL, or a name substituted into "
        "DATABASE_URL_TEMPLATE); `#` comments.", path, shown="(unset)", value=None, group="fleet")
    database_url_template: str = setting(
        "DATABASE_URL_TEMPLATE", "", "Fleet mode: a URL with `{name}`, e.g. "
        "`postgresql://app@db/{name}`. `DATABASE_URL_TEMPLATE_FILE` reads it from a file.",
        secret=True, shown="(unset)", group="fleet")
    target_schemas: tuple[str, ...] = setting(
        "TARGET_SCHEMAS", "", "Fleet mode, schema per tenant on DATABASE_URL: comma-separated schemas, "
        "each passed to env.py as `-x tenant=SCHEMA` and `config.attributes['tenant']`.",
        lambda raw: tuple(x.strip() for x in raw.split(",") if x.strip()), shown="(unset)",
        value=(), group="fleet")
    fleet_parallel: int = setting("FLEET_PARALLEL", "4", "Fleet mode: worker processes (flag "
                                  "`--parallel`).", integer(1, 64), group="fleet")
    job_completion_index: int | None = setting(
        "JOB_COMPLETION_INDEX", "", "Set by Kubernetes in Indexed Jobs: with JOB_COMPLETIONS, this "
        "pod takes only its shard of the targets.", optional_index, shown="(unset)", value=None,
        group="fleet")
    job_completions: int | None = setting("JOB_COMPLETIONS", "", "The Indexed Job's `completions` "
                                          "(set it from the manifest).", optional_index,
                                          shown="(unset)", value=None, group="fleet")

    @property
    def sync_url(self) -> Any:
        """The SQLAlchemy URL the runner's own connections use (psycopg2, whatever the app uses;
        pysqlite for a SQLite file)."""
        driver = "sqlite+pysqlite" if self.database_url.is_sqlite else "postgresql+psycopg2"
        return self.database_url.set(drivername=driver).to_sqlalchemy()

    @property
    def safe_target(self) -> str:
        """host:port/database for logs: no user, no password."""
        return self.database_url.safe_target


SETTINGS: tuple[Setting, ...] = tuple(f.metadata["setting"] for f in dataclasses.fields(Settings))
_FIELDS = {f.metadata["setting"].env: f.name for f in dataclasses.fields(Settings)}
_URL_SETTINGS = ("DATABASE_URL", "VERIFY_DATABASE_URL", "VERIFY_ROLE_URL", "DATABASE_URL_TEMPLATE")


def load(environ: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None,
         need_database: bool = True, command: str = "") -> Settings:
    """Build Settings from the environment (flags in overrides win).

    command decides whether BACKUP_S3_URI is required (backup commands; upgrade and downgrade
    unless BACKUP_MODE=off). Raise ConfigError listing every problem at once.
    """
    env = dict(os.environ if environ is None else environ)
    env.update({k: v for k, v in (overrides or {}).items() if v is not None})
    errors: list[str] = []
    values: dict[str, Any] = {}
    for spec in SETTINGS:
        if spec.env in _URL_SETTINGS:
            continue
        raw = env.get(spec.env, "")
        if raw == "":
            continue
        try:
            values[_FIELDS[spec.env]] = spec.parse(raw)
        except ValueError as exc:
            shown = "(hidden)" if spec.secret else repr(raw if len(raw) <= 80 else raw[:77] + "...")
            errors.append(f"{spec.env}={shown} {exc}")
    for name in _URL_SETTINGS:
        text_value = read_secret(env, name, errors)
        if name == "DATABASE_URL_TEMPLATE":
            if text_value:
                values["database_url_template"] = text_value
            continue
        if not text_value:
            continue
        try:
            values[_FIELDS[name]] = dburl.parse(text_value)
        except dburl.UrlError as exc:
            errors.append(str(exc).replace("DATABASE_URL", name, 1))
    if need_database and "database_url" not in values and not _mentioned(errors, "DATABASE_URL"):
        errors.append(f"DATABASE_URL is not set: set it to {dburl.PLACEHOLDER}")
    _check_alembic_config(values.get("alembic_config", Path("alembic.ini")), errors)
    _check_combinations(values, command, errors)
    template = values.get("database_url_template", "")
    if any(u is not None and u.is_sqlite for u in (values.get("database_url"),
                                                   values.get("verify_database_url"))) \
            or template.lstrip().startswith("sqlite"):
        from runner.sqlite import refusals  # what cannot work on a SQLite file (imported only then)

        errors += refusals.problems(values, command, template)
    if errors:
        raise ConfigError("; ".join(errors))
    return Settings(**values)


def _mentioned(errors: list[str], name: str) -> bool:
    return any(e.startswith((name + " ", name + "=", name + "_FILE")) for e in errors)


def read_secret(env: Mapping[str, str], name: str, errors: list[str]) -> str:
    """Return NAME, or the content of the file NAME_FILE points at (mounted secrets)."""
    raw, file = env.get(name, ""), env.get(f"{name}_FILE", "")
    if raw and file:
        errors.append(f"{name} and {name}_FILE are both set: keep only one")
        return ""
    if not file:
        return raw
    try:
        return path(file).read_text().strip()
    except ValueError as exc:
        errors.append(f"{name}_FILE {exc}")
    except OSError as exc:
        errors.append(f"{name}_FILE={file} cannot be read ({exc.strerror}): mount the secret file "
                      "or fix the path")
    return ""


def _check_alembic_config(cfg: Path, errors: list[str]) -> None:
    try:
        if not cfg.is_file():
            errors.append(f"ALEMBIC_CONFIG={cfg} is not a readable file: point ALEMBIC_CONFIG (or -c) "
                          "at your alembic.ini")
        elif not os.access(cfg, os.R_OK):
            errors.append(f"ALEMBIC_CONFIG={cfg} is not readable: fix its permissions")
    except OSError as exc:
        errors.append(f"ALEMBIC_CONFIG cannot be used ({exc.strerror}): point it at your alembic.ini")


def _check_combinations(values: dict[str, Any], command: str, errors: list[str]) -> None:
    defaults = Settings()
    st = values.get("migration_statement_timeout", defaults.migration_statement_timeout)
    lt = values.get("migration_lock_timeout", defaults.migration_lock_timeout)
    start = values.get("lock_timeout_start", defaults.lock_timeout_start)
    ceiling = values.get("lock_timeout_ceiling", defaults.lock_timeout_ceiling)
    escalate = values.get("lock_timeout_schedule", defaults.lock_timeout_schedule) == "escalate"
    longest = max(lt, ceiling) if escalate else lt
    if st and st <= longest:
        name = "MIGRATION_LOCK_TIMEOUT" if longest == lt else "LOCK_TIMEOUT_CEILING"
        errors.append(f"MIGRATION_STATEMENT_TIMEOUT ({st:g}s) must be greater than "
                      f"{name} ({longest:g}s): raise it or set it to 0 (off)")
    if escalate and start > ceiling:
        errors.append(f"LOCK_TIMEOUT_START ({start:g}s) must not exceed LOCK_TIMEOUT_CEILING "
                      f"({ceiling:g}s): lower the start or raise the ceiling")
    mode = values.get("backup_mode", defaults.backup_mode)
    needs_uri = command in BACKUP_COMMANDS or (command in MIGRATE_COMMANDS and mode in DUMP_MODES)
    if needs_uri and not values.get("backup_s3_uri") and not _mentioned(errors, "BACKUP_S3_URI"):
        url = values.get("database_url")
        errors.append("BACKUP_S3_URI is not set: set it to s3://BUCKET/PREFIX" + (
            "" if command in BACKUP_COMMANDS else
            ", or BACKUP_MODE=off (no backup: local development only)" if url and url.is_sqlite else
            ", or BACKUP_MODE=restore-point (WAL archiving, no dump) or BACKUP_MODE=off (no backup: "
            "local development only)"))


def first_sentence(text: str) -> str:
    """The help text up to its first '. ' or '; ' outside parentheses and `code`."""
    depth, code = 0, False
    for i, c in enumerate(text):
        if c == "`":
            code = not code
        elif not code and c in "([":
            depth += 1
        elif not code and c in ")]":
            depth = max(0, depth - 1)
        elif not code and not depth and c in ".;" and text[i + 1:i + 2] == " ":
            return text[:i] + "."
    return text.rstrip(".") + "."


def markdown_table(groups: tuple[str, ...] = (), brief: bool = False) -> str:
    """Render the settings (of some groups, or all) as a configuration table; brief keeps the
    first sentence of each help text."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for s in SETTINGS:
        if not groups or s.group in groups:
            text = first_sentence(s.help) if brief else s.help
            rows.append(f"| `{s.env}` | {s.shown if s.shown is not None else s.default} | {text} |")
    return "\n".join(rows)
