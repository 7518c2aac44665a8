"""Everything the runner asks of Alembic: scripts, the database's revision, targets and steps.

Works with any env.py: the runner hands it a connection in config.attributes['connection'] and
also sets sqlalchemy.url, for env.py files that build their own engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import io
import itertools
import logging
import os
import sys
from collections.abc import Iterator
from typing import IO, Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, ProgrammingError

from runner import owntables
from runner.config import Settings
from runner.errors import ConfigError, NeedsDatabase, PreflightRefused, RunnerError
from runner.redact import redact


@dataclasses.dataclass(frozen=True)
class DbState:
    """What env.py reports: the version table it uses and the revisions stamped in it."""

    heads: tuple[str, ...]
    version_table: str
    version_schema: str | None


@functools.cache  # once per process: SQLAlchemy's dialect registry is process-wide
def bare_postgresql_means_psycopg2() -> None:
    """Where psycopg 3 is not installed (the image ships psycopg2), make a bare postgresql:// URL
    mean psycopg2 again, as before SQLAlchemy 2.1: env.py files that build their engine from
    DATABASE_URL themselves (`config.set_main_option("sqlalchemy.url", os.environ[...])`, the
    FastAPI templates' way) would otherwise fail on `import psycopg`. With psycopg 3 installed,
    SQLAlchemy's own choice stands."""
    if importlib.util.find_spec("psycopg") is None:
        sa.dialects.registry.register("postgresql", "sqlalchemy.dialects.postgresql.psycopg2",
                                      "PGDialect_psycopg2")


def alembic_config(settings: Settings, stdout: IO[str] | None = None) -> Config:
    """Build the Alembic Config; sqlalchemy.url comes from DATABASE_URL."""
    from runner import online  # noqa: F401 - importing it registers op.*_online for env.py

    cfg = Config(str(settings.alembic_config), stdout=stdout or sys.stdout)
    if not cfg.file_config.has_section(cfg.config_ini_section):
        raise ConfigError(f"ALEMBIC_CONFIG={settings.alembic_config} has no [alembic] section: "
                          "point it at your project's alembic.ini")
    app_url = settings.database_url
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the image ships psycopg2
    if "+" not in app_url.drivername and not app_url.is_sqlite:
        app_url = app_url.set(drivername="postgresql+psycopg2")
    bare_postgresql_means_psycopg2()
    url = app_url.to_sqlalchemy().render_as_string(hide_password=False)
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # ConfigParser interpolation
    cfg.attributes["configure_logger"] = False  # our env.py leaves logging to the runner
    # for env.py's autogenerate filter (docs/history.md): the ledger's tables, the backfills' state
    cfg.attributes["runner_tables"] = owntables.names(settings)
    return cfg


def load_scripts(cfg: Config) -> ScriptDirectory:
    """Load the revision scripts; a broken script directory is a configuration error."""
    try:
        script = ScriptDirectory.from_config(cfg)
        script.revision_map.heads  # noqa: B018 - loads and validates every revision file now
        return script
    except CommandError as exc:
        raise ConfigError(f"ALEMBIC_CONFIG: {redact(str(exc))}: fix script_location in "
                          "alembic.ini") from None
    except Exception as exc:  # noqa: BLE001 - a revision file that fails to import
        raise PreflightRefused(f"the migration scripts cannot be loaded ({type(exc).__name__}: "
                               f"{redact(str(exc))}); fix the revision file") from None


def read_state(cfg: Config, script: ScriptDirectory, conn: Connection | None) -> DbState:
    """Run env.py without migrating to learn its version table and the stamped revisions."""
    seen: dict[str, Any] = {}

    def capture(rev: Any, context: Any) -> list[Any]:
        seen.update(heads=context.get_current_heads(), table=context.version_table,
                    schema=context.version_table_schema)
        return []

    try:
        with lent(cfg, conn), EnvironmentContext(cfg, script, fn=capture, dont_mutate=True):
            script.run_env()
    except (RunnerError, DBAPIError):
        raise
    except Exception as exc:  # noqa: BLE001 - env.py is user code; its failures are config errors
        raise ConfigError(f"env.py failed ({type(exc).__name__}: {redact(str(exc))}): fix the "
                          "migration environment (imports, settings) and rebuild the image") from None
    finally:
        if conn is not None and conn.in_transaction():
            conn.commit()
    if "heads" not in seen:
        raise ConfigError("env.py did not run migrations for the runner (it must call "
                          "context.run_migrations() in online mode)")
    return DbState(tuple(seen["heads"]), seen["table"], seen["schema"])


def check_known(script: ScriptDirectory, heads: tuple[str, ...]) -> None:
    """Refuse when the database is stamped with revisions the scripts don't contain."""
    for rev in heads:
        if lookup(script, rev) is None:
            raise PreflightRefused(
                f"the database is at revision {rev}, which these migration scripts do not contain: "
                "the image is older than the database; deploy an image that includes it")


def single_head(script: ScriptDirectory) -> str:
    heads = script.get_heads()
    if len(heads) > 1:
        raise PreflightRefused(f"the migration scripts have {len(heads)} heads ({', '.join(sorted(heads))}): "
                               "merge them with 'alembic merge heads' and rebuild the image")
    if not heads:
        raise PreflightRefused("the migration scripts contain no revisions")
    return heads[0]


def resolve(script: ScriptDirectory, target: str, current: tuple[str, ...]) -> tuple[str, ...]:
    """Resolve head/base/REV/-N/+N to the tuple of revision ids the database should end at."""
    if target in ("head", "heads"):
        return (single_head(script),)
    if target == "base":
        return ()
    if target[:1] in "+-" and target[1:].isdigit():
        return (_relative(script, target, current),) if int(target) else current
    rev = lookup(script, target)
    if rev is None:
        raise PreflightRefused(f"target revision {target} is not in the migration scripts: "
                               "check the id ('python -m runner status' lists them)")
    return (rev.revision,)


def _relative(script: ScriptDirectory, target: str, current: tuple[str, ...]) -> str:
    """Walk N revisions up (+N) or down (-N) from the current one; from base, +N starts at the
    first revision, as Alembic does."""
    n = int(target)
    if not current and n > 0:
        bases = script.get_bases()
        if len(bases) != 1:
            raise PreflightRefused(f"relative target {target} from base is ambiguous: the scripts have "
                                   f"{len(bases)} base revisions; use a revision id")
        current, n = (bases[0],), n - 1
    if len(current) != 1:
        raise PreflightRefused(f"relative target {target} needs exactly one current revision, "
                               f"the database has {len(current) or 'none'}: use a revision id")
    rev = current[0]
    for _ in range(abs(n)):
        nxt = _parents(script, rev) if n < 0 else list(lookup(script, rev).nextrev)  # type: ignore[union-attr]
        if len(nxt) != 1:
            what = "base" if n < 0 and not nxt else "head" if not nxt else "a branch point"
            raise PreflightRefused(f"relative target {target} goes past {what}: use a revision id "
                                   "(or 'base --yes')")
        rev = nxt[0]
    return rev


def fmt(revs: tuple[str, ...] | list[str]) -> str:
    """Revisions as the runner prints them: comma-separated, or 'base' for none."""
    return ",".join(revs) if revs else "base"


def ancestors(script: ScriptDirectory, revs: tuple[str, ...]) -> set[str]:
    """Return every revision reachable downwards from revs (inclusive)."""
    seen: set[str] = set()
    todo = list(revs)
    while todo:
        rev = todo.pop()
        if rev not in seen:
            seen.add(rev)
            todo.extend(_parents(script, rev))
    return seen


def steps(script: ScriptDirectory, current: tuple[str, ...], target: tuple[str, ...],
          downgrade: bool) -> list[tuple[str, str]]:
    """Return [(revision being applied, destination)]: one step per revision on a linear path.

    One call per revision gives each revision its own transaction whatever env.py says, and
    lets the runner name, retry or stop at the exact revision. A branched path is one step.
    """
    upper, lower = (current, target) if downgrade else (target, current)
    revs: list[Script] = list(script.iterate_revisions(upper or "base", lower or "base"))
    if not downgrade:
        revs.reverse()
    dest_all = ":".join(target) if target else "base"
    linear = all(isinstance(r.down_revision, (str, type(None))) for r in revs) and all(
        (a.down_revision == b.revision) if downgrade else (b.down_revision == a.revision)
        for a, b in itertools.pairwise(revs))
    if not revs:
        return []
    if not linear or len(current) > 1 or len(target) > 1:
        return [(f"{len(revs)} revisions", dest_all)]
    if downgrade:
        return [(r.revision, r.down_revision or "base") for r in revs]  # type: ignore[misc]
    return [(r.revision, r.revision) for r in revs]


def run_step(cfg: Config, script: ScriptDirectory, dest: str, downgrade: bool,
             conn: Connection | None) -> None:
    """Apply one step through env.py, on conn when env.py accepts a connection.

    What alembic.command.upgrade/downgrade do, with the run's ScriptDirectory: theirs loads every
    revision file again on each call, and the runner makes one call per revision.
    """

    def steps(rev: Any, context: Any) -> Any:
        return script._downgrade_revs(dest, rev) if downgrade else script._upgrade_revs(dest, rev)

    with lent(cfg, conn), EnvironmentContext(cfg, script, fn=steps, as_sql=False,
                                              starting_rev=None, destination_rev=dest):
        script.run_env()


def stamped(conn: Connection, state: DbState) -> tuple[str, ...]:
    """Read the revisions stamped in the version table env.py reported, with one query (no env.py)."""
    quote = conn.dialect.identifier_preparer
    table = quote.quote(state.version_table)
    if state.version_schema:
        table = f"{quote.quote_schema(state.version_schema)}.{table}"
    try:
        return tuple(conn.execute(sa.text(f"SELECT version_num FROM {table}")).scalars())
    except ProgrammingError as exc:
        if getattr(exc.orig, "pgcode", None) == "42P01":  # no version table yet: at base
            return ()
        raise
    except sa.exc.OperationalError as exc:
        if conn.dialect.name == "sqlite" and "no such table" in str(exc.orig):  # SQLite's 42P01
            return ()
        raise


class _Branchable(Connection):
    """The runner's connection as env.py sees it. SQLAlchemy 1.x let env.py "branch" a Connection
    with connect(), and Alembic's older cookbook relies on it (`connectable = config.attributes
    .get("connection") or engine_from_config(...)`, then `with connectable.connect() as
    connection:`). A branch is the same connection, with the runner's settings; closing a branch
    leaves it open for the runner."""

    _branches = 0

    def connect(self) -> _Branchable:
        self._branches += 1
        return self

    def close(self) -> None:
        if self._branches:
            self._branches -= 1
            return
        super().close()


@contextlib.contextmanager
def lent(cfg: Config, conn: Connection | None) -> Iterator[None]:
    """Hand conn to env.py through config.attributes['connection'] for the block."""
    if conn is not None and type(conn) is Connection:
        conn.__class__ = _Branchable  # a subclass adding connect(): same object, same state
    cfg.attributes["connection"] = conn
    try:
        yield
    finally:
        cfg.attributes.pop("connection", None)
        if conn is not None and type(conn) is _Branchable:
            conn.__class__ = Connection
            conn.__dict__.pop("_branches", None)


def offline_sql(cfg: Config, current: tuple[str, ...], target: str) -> str:
    """Return the SQL Alembic would run from current to target (offline mode).

    A revision that inspects or queries the database cannot be rendered without one (e.g.
    NoInspectionAvailable on Alembic's MockConnection): refuse naming it (exit 7).
    """
    buf = io.StringIO()
    cfg.output_buffer = buf
    start = ":".join(current) if len(current) == 1 else None
    try:
        command.upgrade(cfg, f"{start}:{target}" if start else target, sql=True)
    except RunnerError as exc:
        failed = _failing_revision(exc) if isinstance(exc, NeedsDatabase) else None
        if failed is None:
            raise
        operation = str(exc).partition(": ")[0]
        raise _offline_refusal(failed, f"{operation}: an online operation, its steps depend on the "
                               "catalog") from None
    except Exception as exc:
        failed = _failing_revision(exc)
        if failed is None:
            raise
        first = redact((str(exc).strip().splitlines() or [""])[0])[:160]
        raise _offline_refusal(failed, f"{type(exc).__name__}: {first}") from None
    return buf.getvalue()


def _offline_refusal(failed: tuple[str, str], why: str) -> PreflightRefused:
    rev, path = failed
    return PreflightRefused(f"revision {rev} ({path}) cannot be rendered offline ({why}): it needs a "
                            "database; use 'plan --scratch', which captures the SQL on a throwaway "
                            "database (VERIFY_DATABASE_URL)")


def _failing_revision(exc: BaseException) -> tuple[str, str] | None:
    """The revision module whose code raised exc (innermost frame of a revision file)."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        g = tb.tb_frame.f_globals
        if isinstance(g.get("revision"), str) and "down_revision" in g and g.get("__file__"):
            rel = os.path.relpath(g["__file__"])
            found = (g["revision"], g["__file__"] if rel.startswith("..") else rel)
        tb = tb.tb_next
    return found


def lookup(script: ScriptDirectory, rev: str) -> Script | None:
    """Return the revision rev names (a unique prefix works), or None when the scripts have none."""
    try:
        return script.get_revision(rev)
    except Exception:  # noqa: BLE001 - Alembic raises several types for unknown / ambiguous ids
        return None


def _parents(script: ScriptDirectory, rev: str) -> list[str]:
    down = script.get_revision(rev).down_revision  # type: ignore[union-attr]
    if down is None:
        return []
    return [down] if isinstance(down, str) else list(down)


_NOISE = ("Context impl", "Will assume")


class _ToEventLog(logging.Handler):
    """Send Alembic's and SQLAlchemy's log records through the runner's event log."""

    def __init__(self, log: Any) -> None:
        super().__init__(logging.INFO)
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(_NOISE):
            return
        self._log("alembic", record.getMessage(), level=record.levelname.lower())


def route_logging(log: Any) -> None:
    root = logging.getLogger("alembic")
    root.setLevel(logging.INFO)
    root.handlers[:] = [_ToEventLog(log)]
    root.propagate = False
