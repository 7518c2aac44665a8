"""The runner's SQLite connections: pysqlite, one transaction per revision (DDL included), a busy
timeout, and interruptible.

pysqlite leaves DDL outside transactions by default; a revision that fails halfway would keep
what it created. So the driver's own transaction handling is off (isolation_level=None) and the
engine's `begin` emits BEGIN itself, as SQLAlchemy's documentation shows for pysqlite: each
revision commits or rolls back as a whole, as on PostgreSQL. AUTOCOMMIT connections (Alembic's
autocommit_block(), the ledger) get no BEGIN. A file is opened read-write without being created
(mode=rw), except by `upgrade` (runner.sqlite.files.CREATES).
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from runner.context import Run
from runner.sqlite import files

BUSY_TIMEOUT = 5.0  # seconds a statement waits for another connection's write lock (sqlite3's default)
VERSION = sqlite3.sqlite_version_info[0] * 1_000_000 + sqlite3.sqlite_version_info[1] * 1000 \
    + sqlite3.sqlite_version_info[2]  # SQLITE_VERSION_NUMBER

_open: dict[str, set[sqlite3.Connection]] = {}  # run id -> its open connections
_open_lock = threading.Lock()


def engine(run: Run, purpose: str, *, autocommit: bool = False, migrating: bool = False) -> Engine:
    """Return the pool-less engine of one purpose for the run's SQLite file (kept for the run)."""
    key = ("sqlite", purpose, autocommit, migrating, run.settings.database_url.database, run.command)
    cached = run.engines.get(key)
    if cached is not None:
        return cached
    file = files.path(run.settings.database_url)
    create = run.command in files.CREATES

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(files.uri(file, create=create), uri=True, timeout=BUSY_TIMEOUT,
                               isolation_level=None, check_same_thread=False)

    eng = sa.create_engine("sqlite+pysqlite://", poolclass=NullPool, creator=connect)
    transactional(eng)
    tracked(eng, run.run_id)
    if autocommit:  # as an execution option, so that `begin` sees it (runner.sqlite.engine)
        eng = eng.execution_options(isolation_level="AUTOCOMMIT")
    if not migrating:
        eng = eng.execution_options(runner_control=True)
    run.engines[key] = eng
    return eng


def transactional(eng: Engine) -> None:
    """Make BEGIN explicit: DDL inside a transaction rolls back with it (SQLAlchemy's recipe)."""

    @sa.event.listens_for(eng, "connect")
    def _no_driver_transactions(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(eng, "begin")
    def _begin(conn: Connection) -> None:
        if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            # on the driver's connection: bookkeeping, not a statement of the revision's (verify
            # and `plan --scratch` capture those)
            conn.connection.driver_connection.execute("BEGIN")


def tracked(eng: Engine, run_id: str) -> None:
    """Keep the run's open connections, so that a signal can interrupt what they run."""

    @sa.event.listens_for(eng, "connect")
    def _opened(dbapi_connection: Any, record: Any) -> None:
        with _open_lock:
            _open.setdefault(run_id, set()).add(dbapi_connection)

    @sa.event.listens_for(eng, "close")
    def _closed(dbapi_connection: Any, record: Any) -> None:
        with _open_lock:
            _open.get(run_id, set()).discard(dbapi_connection)


def interrupt(run: Run) -> int:
    """Interrupt the statements running on this run's connections (SIGTERM, RUN_DEADLINE); return
    how many connections were told."""
    with _open_lock:
        conns = list(_open.get(run.run_id, ()))
    for conn in conns:
        try:
            conn.interrupt()
        except sqlite3.ProgrammingError:  # closed meanwhile
            continue
    return len(conns)

