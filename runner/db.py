"""Runner connections: sync driver, application_name, keepalives and protective session settings."""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from runner import keepalives
from runner.context import Run
from runner.errors import ConnectionLost
from runner.log import one_line
from runner.redact import redact

CHECK_INTERVAL = "2s"  # client_connection_check_interval: a killed runner's query stops this fast
IDLE_IN_TX_TIMEOUT = "10min"
# admin_shutdown, crash_shutdown, cannot_connect_now: the server is going down or starting up
_LOST_SQLSTATES = ("57P01", "57P02", "57P03")


def _ms(seconds: float) -> str:
    return f"{int(seconds * 1000)}ms"


def session_options(run: Run, migrating: bool, lock_timeout: float | None = None) -> str:
    """Return libpq `options` (-c name=value ...) for a runner connection; a migrating one gets
    lock_timeout (an attempt's, runner.migrate.lockschedule), by default the schedule's longest."""
    opts = {"idle_in_transaction_session_timeout": IDLE_IN_TX_TIMEOUT, **keepalives.SERVER}
    if run.server_version >= 120000:
        opts["tcp_user_timeout"] = keepalives.SERVER_USER_TIMEOUT
    if run.server_version >= 140000:
        opts["client_connection_check_interval"] = CHECK_INTERVAL
        # the lock session idles for the whole migration: a server-wide idle_session_timeout
        # would end it and hand the migration lock to another copy mid-migration
        opts["idle_session_timeout"] = "0"
    if migrating:
        s = run.settings
        opts["lock_timeout"] = _ms(lock_timeout if lock_timeout is not None else _longest(s))
        opts["statement_timeout"] = _ms(s.migration_statement_timeout)
    return " ".join(f"-c {k}={v}" for k, v in opts.items())


def engine(run: Run, purpose: str, *, autocommit: bool = False, migrating: bool = False,
           connect_timeout: float = 10.0, lock_timeout: float | None = None) -> Engine:
    """Return the pool-less engine for one purpose (wait, lock, migrate, cancel, ...).

    Pool-less: every connect() is a new server session with the settings below. The engine
    itself is kept for the run, so SQLAlchemy initialises its dialect once, not per connection.
    A SQLite file (local development) gets runner.sqlite.engine's instead.
    """
    if run.settings.database_url.is_sqlite:
        from runner.sqlite import engine as sqlite_engine

        return sqlite_engine.engine(run, purpose, autocommit=autocommit, migrating=migrating)
    key = (purpose, autocommit, migrating, int(connect_timeout), run.server_version, lock_timeout,
           run.settings.database_url.render(hide_password=False))
    cached = run.engines.get(key)
    if cached is not None:
        return cached
    args: dict[str, Any] = dict(keepalives.CLIENT, application_name=run.app_name(purpose),
                                connect_timeout=max(1, int(connect_timeout)))
    if run.server_version:  # unknown before the first successful connection
        # the caller's options (e.g. -c search_path=app) come first; ours win on a clash
        args["options"] = " ".join(filter(None, (caller_options(run),
                                                 session_options(run, migrating, lock_timeout))))
    kw: dict[str, Any] = {"poolclass": NullPool, "connect_args": args}
    if autocommit:
        kw["isolation_level"] = "AUTOCOMMIT"
    eng = sa.create_engine(run.settings.sync_url, **kw)
    if not migrating:
        eng = eng.execution_options(runner_control=True)
    run.engines[key] = eng
    return eng


def connect(run: Run, purpose: str, **kw: Any) -> Connection:
    return engine(run, purpose, **kw).connect()


def sqlstate(exc: BaseException) -> str | None:
    """Return the SQLSTATE of a database error (psycopg2 or psycopg), or None."""
    orig = getattr(exc, "orig", exc)
    return getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)


def db_message(exc: BaseException) -> str:
    """Return the server's error as one redacted line (no SQL, no parameters)."""
    orig = getattr(exc, "orig", exc)
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    return redact(first)


def connection_lost(exc: BaseException | None) -> bool:
    """Return True when exc (or what caused it) says the server connection is gone: a restart,
    a failover, a killed backend. Such a run is worth retrying; nothing half-done was kept."""
    return lost_cause(exc) is not None


def lost_cause(exc: BaseException | None) -> BaseException | None:
    """The error in exc's chain that says the connection is gone (what to report: SQLAlchemy's
    later "Can't reconnect until invalid transaction is rolled back" says nothing), or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(getattr(exc, "orig", exc)).__module__ == "sqlite3":
            return None  # a SQLite file has no connection to lose: its errors are the statement's
        if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
            return exc
        orig = getattr(exc, "orig", exc)
        code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
        if isinstance(code, str) and (code.startswith("08") or code in _LOST_SQLSTATES):
            return exc
        if isinstance(exc, sa.exc.OperationalError) and not code:
            return exc  # libpq reports every server error with a SQLSTATE: this is the connection
        exc = exc.__cause__ or exc.__context__
    return None


def lost_connection_error(exc: BaseException) -> ConnectionLost | None:
    """Return the error for a connection lost outside the steps that say so themselves, or None."""
    cause = lost_cause(exc)
    if cause is None:
        return None
    message = redact(one_line(str(getattr(cause, "orig", cause)))) or type(cause).__name__
    return ConnectionLost(f"lost the connection to the database ({message}): a restart or failover; "
                          "run again once the server is back")


def caller_options(run: Run) -> str | None:
    """The libpq options the caller chose, taken as libpq takes them on a connection without
    explicit options (the first one of a run, the fast path's, the gate's): DATABASE_URL's
    `options`, else PGOPTIONS. Every runner connection extends them, and so does the PGOPTIONS
    env.py's own engines get, so a search_path set either way finds the version table in the
    same schema for the wait, the lock, the migration and the ledger."""
    return run.settings.database_url.libpq_params().get("options") or _caller_pgoptions()


def _caller_pgoptions() -> str | None:
    current = os.environ.get("PGOPTIONS")
    if _exported and current == _exported["set"]:  # ours, written over the caller's
        return _exported["caller"] or None
    return current or None


_exported: dict[str, str] = {}  # the PGOPTIONS apply_libpq_environment set, and the caller's before


def libpq_environment(run: Run, lock_timeout: float | None = None) -> dict[str, str]:
    """Return PGAPPNAME/PGOPTIONS so engines that env.py builds itself get the same protection
    (the caller's PGOPTIONS kept first, and the same attempt's lock_timeout)."""
    return {"PGAPPNAME": run.app_name("migrate"),
            "PGOPTIONS": " ".join(filter(None, (caller_options(run),
                                                session_options(run, True, lock_timeout))))}


def cancel_own_statements(run: Run) -> int:
    """Cancel this run's running statements from a fresh connection; return how many."""
    if run.settings.database_url.is_sqlite:
        from runner.sqlite import engine as sqlite_engine

        return sqlite_engine.interrupt(run)
    with connect(run, "cancel", autocommit=True, connect_timeout=5) as conn:
        return conn.execute(sa.text(
            "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name LIKE :pattern AND pid <> pg_backend_pid() "
            "AND state <> 'idle'"),
            {"pattern": f"{run.settings.application_name}/%/{run.run_id}"}).scalar_one()


def install_statement_guard(run: Run) -> None:
    """Refuse new migration statements once the run is cancelled (between two statements)."""

    @sa.event.listens_for(Engine, "before_cursor_execute")
    def _guard(conn: Connection, *args: Any) -> None:
        if run.cancel.is_set and not conn.get_execution_options().get("runner_control"):
            run.cancel.check()


def apply_libpq_environment(run: Run, lock_timeout: float | None = None) -> None:
    env = libpq_environment(run, lock_timeout)
    _exported.update(set=env["PGOPTIONS"], caller=_caller_pgoptions() or "")
    os.environ.update(env)


def _longest(settings: Any) -> float:
    """The schedule's longest lock_timeout, for migrating connections outside its attempts."""
    from runner.migrate.lockschedule import ceiling

    return ceiling(settings)
