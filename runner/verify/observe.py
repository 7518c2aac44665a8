"""Observe what each revision step really does to the tables: locks, rewrites, scans.

Static lint reads SQL text; this reads PostgreSQL. For every step of the walk (upgrade,
downgrade, upgrade again) it takes a snapshot of the step's own backend just before its
transaction commits (SQLAlchemy's commit event, on env.py's connection whatever engine it came
from) and compares it with the tables as the previous commit left them (read when the
transaction begins instead, after anything it did not observe):

- locks: pg_locks rows of pg_backend_pid() on relations (granted; a lock is held until commit,
  so the commit-time snapshot has every lock the transaction took);
- rewrites: pg_class.relfilenode changed (a table rewrite, or a TRUNCATE when the table was not
  read);
- scans: pg_stat_get_xact_numscans() (a sequential scan of the whole table: a validation scan,
  an index build, an UPDATE without a usable index, a rewrite). PostgreSQL 15+ keeps a backend's
  counters pending across transactions until it sends them: the snapshot asks for them to be sent
  (pg_stat_force_next_flush) so the next transaction's start from zero.

The walk gives every revision its own transaction (steps.run_env(per_migration=True)), so a
step's locks are its own.

Statements that run outside a transaction (`autocommit_block()`: CREATE INDEX CONCURRENTLY,
ALTER TYPE ... ADD VALUE, VACUUM) have no commit to observe: their locks are sampled from a second
connection while the statement runs (at once, then 1, 2, 4 ... 32 ms apart: a statement takes its
table locks as it starts and holds them to its end, but a lock taken and released in between can
be missed), and relfilenode is compared before and after the statement. A transaction opened
with BEGIN on such a connection (each step of an online operation is one, runner.online) is
observed like any other: its tables when BEGIN returns, its locks, rewrites and scans just before
its COMMIT. Statements that take no table lock (SET, SHOW) are not sampled.

Each transaction and sampled statement names the online operation that ran it, if one did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from runner import db
from runner.context import Run
from runner.online.session import RUNNING

MODES = ("AccessShareLock", "RowShareLock", "RowExclusiveLock", "ShareUpdateExclusiveLock", "ShareLock",
         "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock")
STRONG = MODES.index("ShareLock")  # from here on the lock blocks writes (ACCESS EXCLUSIVE: reads too)
DML = "RowExclusiveLock"  # INSERT, UPDATE, DELETE

_RELATIONS = r"""
SELECT 'r', c.oid::bigint, format('%I.%I', n.nspname, c.relname), c.relkind::text, c.relfilenode::bigint,
       pg_stat_get_xact_numscans(c.oid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid >= 16384 AND c.relkind IN ('r', 'p', 'm')
  AND n.nspname NOT LIKE 'pg\_%' AND n.nspname <> 'information_schema'
"""
# every table this backend holds a lock on (a table read or changed is locked until commit), with
# its name (NULL: dropped in this transaction), relfilenode and pending scan count
_LOCKED = r"""
SELECT l.relation::bigint, CASE WHEN c.oid IS NOT NULL THEN format('%I.%I', n.nspname, c.relname) END,
       c.relkind::text, c.relfilenode::bigint,
       pg_stat_get_xact_numscans(l.relation), l.mode
FROM pg_locks l
LEFT JOIN pg_class c ON c.oid = l.relation
LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation' AND l.granted AND l.relation >= 16384
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
T = TypeVar("T")
_FORCE_FLUSH = "SELECT pg_stat_force_next_flush();\n"
_SAMPLE = ("SELECT relation::bigint, mode FROM pg_locks WHERE pid = %s AND locktype = 'relation' "
           "AND granted AND relation >= 16384")
# transaction control sent as statements on a connection outside a transaction (an online step)
_BEGIN = re.compile(r"\s*(?:BEGIN|START\s+TRANSACTION)\b", re.I)
_COMMIT = re.compile(r"\s*(?:COMMIT|END)(?:\s+(?:WORK|TRANSACTION))?\s*;?\s*$", re.I)
_ROLLBACK = re.compile(r"\s*(?:ROLLBACK|ABORT)(?:\s+(?:WORK|TRANSACTION))?\s*;?\s*$", re.I)
_NO_TABLE_LOCK = re.compile(r"\s*(?:SET|SHOW|RESET)\b", re.I)
_IN_TRANSACTION = 2  # libpq's PQTRANS_INTRANS: idle in a transaction, no error


def mode_name(mode: str) -> str:
    """'AccessExclusiveLock' -> 'ACCESS EXCLUSIVE' (as PostgreSQL's documentation names it)."""
    words = "".join(f" {c}" if c.isupper() else c for c in mode.removesuffix("Lock")).strip()
    return words.upper()


def strongest(modes: Iterator[str] | list[str] | set[str]) -> str | None:
    found = sorted(modes, key=MODES.index)
    return found[-1] if found else None


class ObservationFailed(RuntimeError):
    """verify's own reads during a step failed: not the chain's fault."""


@dataclasses.dataclass(frozen=True)
class Relation:
    name: str  # schema.table, quoted where needed (format('%I.%I')), as the fingerprint names it
    kind: str  # relkind: r, p, m
    filenode: int
    scans: int  # this backend's sequential scans of it not yet flushed to the statistics


@dataclasses.dataclass(frozen=True)
class Snapshot:
    relations: dict[int, Relation]
    locks: dict[int, frozenset[str]]
    partial: bool = False  # only the tables this backend locked (the others did not change)


@dataclasses.dataclass(frozen=True)
class Touch:
    """What one transaction (or one statement outside a transaction) did to one table."""

    relation: str  # its name when the transaction began
    modes: frozenset[str]  # lock modes it took
    new_filenode: bool
    scans: int | None  # None: not observable (outside a transaction)
    dropped: bool = False

    @property
    def mode(self) -> str | None:
        return strongest(self.modes)

    @property
    def strong(self) -> bool:
        return self.mode is not None and MODES.index(self.mode) >= STRONG

    @property
    def rewritten(self) -> bool:
        """A new relfilenode with the old rows read: a rewrite (without a read: TRUNCATE)."""
        return self.new_filenode and self.scans != 0

    @property
    def scanned(self) -> bool:
        return bool(self.scans)


@dataclasses.dataclass
class Transaction:
    touched: list[Touch]
    statement: str | None = None  # the statement (sampled), or the first of a BEGIN ... COMMIT
    sampled: bool = False  # one statement outside a transaction, watched from a second connection
    operation: str | None = None  # the online operation that ran it (runner.online)


@dataclasses.dataclass
class _Opened:
    """A transaction opened by BEGIN on a connection outside a transaction (an online step)."""

    dbapi: int  # id() of the DBAPI connection
    baseline: Snapshot
    operation: str | None
    statement: str | None = None


@dataclasses.dataclass
class StepObservation:
    revision: str
    step: str  # upgrade, downgrade, upgrade again
    before: frozenset[str]  # the tables that existed when the step began
    transactions: list[Transaction] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    complete: bool = False


def diff(before: Snapshot, after: Snapshot) -> list[Touch]:
    """What happened to each table between two snapshots of one transaction."""
    touched = []
    for oid in sorted(set(after.locks) if after.partial else set(before.relations) | set(after.locks)):
        old, new = before.relations.get(oid), after.relations.get(oid)
        if old is None:
            continue  # created in this transaction: nobody else can be using it
        modes = after.locks.get(oid, frozenset()) - before.locks.get(oid, frozenset())
        if new is None:
            touched.append(Touch(old.name, modes, False, 0, dropped=True))
            continue
        scans = new.scans - old.scans if new.scans >= old.scans else new.scans
        if modes or scans or new.filenode != old.filenode:
            touched.append(Touch(old.name, modes, new.filenode != old.filenode, scans))
    return touched


def _timed(method: Callable[..., T]) -> Callable[..., T]:
    """Add the time a method takes to the observer's `spent`."""

    @functools.wraps(method)
    def timed(self: Observer, *args: Any, **kw: Any) -> T:
        t0 = time.perf_counter()
        try:
            return method(self, *args, **kw)
        finally:
            self.spent += time.perf_counter() - t0

    return timed


class Observer:
    """Collects one StepObservation per step of the walk (install with observing())."""

    def __init__(self, scratch: Run) -> None:
        self.scratch = scratch
        self.steps: list[StepObservation] = []
        self.spent = 0.0  # seconds the walk waited for the observation (its own cost, for the bench)
        self._current: StepObservation | None = None
        self._baseline: Snapshot | None = None
        self._started = 0.0
        self._monitor: Connection | None = None
        self._outside: _Sampler | None = None
        self._opened: _Opened | None = None
        self._beginning = False  # a BEGIN is running outside a transaction: read the baseline after it
        # the tables as they were committed last (their scan counters flushed since): the next
        # transaction's baseline without reading it again; None when unknown (start, a failure)
        self._known: Snapshot | None = None

    # -- driven by the walk ------------------------------------------------------------------------
    @_timed
    def arm(self, revision: str, step: str, conn: Connection) -> None:
        """A step is about to run on conn."""
        self._baseline, self._started = None, time.monotonic()
        self._opened, self._beginning = None, False
        if conn.in_transaction() and not _autocommit(conn):  # runs inside a transaction already open
            self._baseline = snapshot(conn, locks=False)
        before = _names(self._baseline) if self._baseline is not None else frozenset()
        self._current = StepObservation(revision, step, before)

    @_timed
    def finish(self, conn: Connection) -> StepObservation | None:
        """The step ran: close what is still open (one transaction for several steps)."""
        found = self._current
        if found is None:
            return None
        if self._baseline is not None and conn.in_transaction():
            self._end(snapshot(conn))
        found.seconds, found.complete = time.monotonic() - self._started, True
        self.steps.append(found)
        self._current, self._baseline = None, None
        return found

    def abort(self) -> None:
        """The step failed: what it did is rolled back; keep nothing of it."""
        self._stop_sampler()
        self._current, self._baseline, self._opened, self._beginning = None, None, None, False

    def close(self) -> None:
        self.abort()
        if self._monitor is not None:
            with contextlib.suppress(Exception):
                self._monitor.close()
        self._monitor = None

    # -- SQLAlchemy events ---------------------------------------------------------------------------
    @_timed
    def on_begin(self, conn: Connection) -> None:
        if self._current is not None and not _autocommit(conn):
            # no locks yet (the transaction just began); the tables as the last commit left them,
            # or read now (relfilenodes and scan counters only)
            self._baseline = _fresh(self._known) if self._known is not None else snapshot(conn, locks=False)
            if not self._current.before:
                self._current.before = _names(self._baseline)

    @_timed
    def on_commit(self, conn: Connection) -> None:
        if self._current is not None and self._baseline is not None and not _autocommit(conn):
            end = snapshot(conn, flush=True)
            baseline = self._baseline
            self._end(end)
            self._known = _merge(baseline, end)  # committed; its scans sent before the next transaction

    def on_rollback(self, conn: Connection) -> None:
        if self._current is not None and not _autocommit(conn):
            self._baseline = None

    @_timed
    def on_statement(self, conn: Connection, statement: str) -> None:
        """A statement is about to run: outside a transaction, watch it from a second connection;
        a transaction it opened with BEGIN is read at its COMMIT."""
        if self._current is None or not _autocommit(conn):
            return
        opened = self._opened
        if opened is not None and opened.dbapi == id(conn.connection.dbapi_connection):
            if _COMMIT.match(statement):
                self._commit_opened(conn, opened)
            elif _ROLLBACK.match(statement):
                self._opened, self._known = None, None  # its scans may still be pending: read afresh
            elif opened.statement is None and not _NO_TABLE_LOCK.match(statement):
                opened.statement = statement
            return
        if _BEGIN.match(statement):
            self._beginning = True
            return
        if _NO_TABLE_LOCK.match(statement) or _COMMIT.match(statement) or _ROLLBACK.match(statement):
            return
        monitor = self._monitor_connection()
        self._outside = _Sampler(monitor, _backend_pid(conn), statement, self._known, RUNNING.get())

    def _commit_opened(self, conn: Connection, opened: _Opened) -> None:
        """Just before the COMMIT of a transaction opened by BEGIN: what it did (as on_commit)."""
        self._opened = None
        if not _in_transaction(conn):
            self._known = None  # failed: the COMMIT rolls it back
            return
        end = snapshot(conn, flush=True)
        touched = diff(opened.baseline, end)
        self._known = _merge(opened.baseline, end)
        if touched and self._current is not None:
            self._current.transactions.append(Transaction(touched, opened.statement, False, opened.operation))

    @_timed
    def on_statement_done(self, conn: Connection | None, failed: bool = False) -> None:
        if self._beginning:
            self._beginning = False
            if not failed and conn is not None and self._current is not None and _in_transaction(conn):
                # the tables (and pending scan counters) as the transaction starts: no lock yet
                self._opened = _Opened(id(conn.connection.dbapi_connection), snapshot(conn, locks=False),
                                       RUNNING.get())
            return
        sampler, self._outside = self._outside, None
        if sampler is None or self._current is None:
            return
        touched, after = sampler.stop()
        self._known = None
        if not failed and conn is not None and _flush_next(conn):
            self._known = after  # its scans reach the statistics before the next transaction
        if not failed and touched:
            self._current.transactions.append(Transaction(touched, sampler.statement, sampled=True,
                                                          operation=sampler.operation))

    # -- helpers --------------------------------------------------------------------------------------
    def _end(self, end: Snapshot) -> None:
        assert self._current is not None and self._baseline is not None
        touched = diff(self._baseline, end)
        if touched:
            self._current.transactions.append(Transaction(touched))
        self._baseline = None

    def _stop_sampler(self) -> None:
        if self._outside is not None:
            self._outside.stop()
            self._outside = None
        self._known = None

    def _monitor_connection(self) -> Connection:
        if self._monitor is None:
            self._monitor = db.connect(self.scratch, "verify-observe", autocommit=True, connect_timeout=10)
        return self._monitor


def snapshot(conn: Connection, locks: bool = True, flush: bool = False) -> Snapshot:
    """Read the tables (and this backend's locks), inside conn's transaction (a driver cursor: no
    SQLAlchemy events, nothing captured for the lint). flush: this backend's statistics are sent
    as soon as the transaction ends, so the next one's scan counters start at zero."""
    cursor = conn.connection.cursor()
    force = _FORCE_FLUSH if flush and _can_force_flush(conn) else ""
    try:
        if force and conn.dialect.driver != "psycopg2":  # asyncpg: one statement per execute
            cursor.execute(force)
            force = ""
        cursor.execute(force + (_LOCKED if locks else _RELATIONS))
        return _parse_locked(cursor.fetchall()) if locks else _parse(cursor.fetchall())
    except Exception as exc:
        raise ObservationFailed(f"verify could not read the locks and tables of a step: {exc}") from exc
    finally:
        cursor.close()


def _parse(rows: list[tuple[Any, ...]]) -> Snapshot:
    relations: dict[int, Relation] = {}
    locks: dict[int, set[str]] = {}
    for row in rows:
        if row[0] == "r":
            relations[row[1]] = Relation(row[2], row[3], row[4], row[5] or 0)
        else:
            locks.setdefault(row[1], set()).add(row[2])
    return Snapshot(relations, {oid: frozenset(m) for oid, m in locks.items()})


def _parse_locked(rows: list[tuple[Any, ...]]) -> Snapshot:
    relations: dict[int, Relation] = {}
    locks: dict[int, set[str]] = {}
    for oid, name, kind, filenode, scans, mode in rows:
        if name is not None and (kind not in ("r", "p", "m") or name.startswith(("pg_", '"pg_'))):
            continue  # an index, a sequence, a temporary table
        if name is not None:
            relations[oid] = Relation(name, kind, filenode, scans or 0)
        locks.setdefault(oid, set()).add(mode)
    return Snapshot(relations, {oid: frozenset(m) for oid, m in locks.items()}, partial=True)


def _merge(before: Snapshot, end: Snapshot) -> Snapshot:
    """The tables after a transaction: before's, with what the end snapshot (partial) saw."""
    relations = dict(before.relations)
    for oid in end.locks:
        if oid in end.relations:
            relations[oid] = end.relations[oid]
        else:
            relations.pop(oid, None)  # dropped
    return Snapshot(relations, {})


def _fresh(snap: Snapshot) -> Snapshot:
    """The committed tables as the next transaction's baseline: no locks held, no scan pending."""
    return Snapshot({oid: dataclasses.replace(r, scans=0) for oid, r in snap.relations.items()}, {})


def _can_force_flush(conn: Connection) -> bool:
    """PostgreSQL 15+ keeps a backend's scan counters pending across transactions until it sends
    them (pg_stat_force_next_flush() makes that happen at its next idle moment); 13 and 14 count
    per transaction."""
    return (conn.dialect.server_version_info or (0,)) >= (15,)


def _flush_next(conn: Connection) -> bool:
    """After a statement outside a transaction: have its scans sent before the next transaction;
    return whether the next transaction's counters will start at zero."""
    if not _can_force_flush(conn):
        return True
    try:
        cursor = conn.connection.cursor()
        cursor.execute(_FORCE_FLUSH)
        cursor.close()
    except Exception:  # noqa: BLE001 - then the next transaction reads its own baseline
        return False
    return True


def _names(snap: Snapshot) -> frozenset[str]:
    return frozenset(r.name for r in snap.relations.values())


def _autocommit(conn: Connection) -> bool:
    dbapi = conn.connection.dbapi_connection
    return bool(getattr(dbapi, "autocommit", False))


def _in_transaction(conn: Connection) -> bool:
    """Whether the server holds a transaction open on conn, not failed (libpq's status)."""
    dbapi = conn.connection.dbapi_connection
    status = getattr(getattr(dbapi, "info", None), "transaction_status", None)  # psycopg2 2.8+, psycopg 3
    if status is None and hasattr(dbapi, "get_transaction_status"):
        status = dbapi.get_transaction_status()
    return status is not None and int(status) == _IN_TRANSACTION


def _backend_pid(conn: Connection) -> int:
    dbapi = conn.connection.dbapi_connection
    get = getattr(dbapi, "get_backend_pid", None)  # psycopg2
    if get is not None:
        return int(get())
    info = getattr(dbapi, "info", None)  # psycopg 3
    if info is not None and getattr(info, "backend_pid", None):
        return int(info.backend_pid)
    cursor = conn.connection.cursor()
    try:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])
    finally:
        cursor.close()


class _Sampler:
    """Poll one backend's table locks from the monitor connection while its statement runs."""

    def __init__(self, monitor: Connection, pid: int, statement: str, known: Snapshot | None,
                 operation: str | None = None) -> None:
        self.statement, self.pid, self.operation = statement, pid, operation
        self._cursor = monitor.connection.cursor()
        if known is None:
            self._cursor.execute(_RELATIONS)
            known = _parse(self._cursor.fetchall())
        self._before = known
        self._seen: dict[int, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="verify-lock-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pause = 0.001
        while not self._stop.is_set():
            try:
                self._cursor.execute(_SAMPLE, (self.pid,))
                for oid, mode in self._cursor.fetchall():
                    self._seen.setdefault(oid, set()).add(mode)
            except Exception:  # noqa: BLE001 - sampling is best effort; the statement is what matters
                return
            # a statement takes its table locks as it starts and keeps them to the end: sample at
            # once, then back off (1, 2, 4 ... 32 ms), so a long CONCURRENTLY build is not hammered
            self._stop.wait(pause)
            pause = min(pause * 2, 0.032)

    def stop(self) -> tuple[list[Touch], Snapshot]:
        """Stop sampling; return what the statement did and the tables after it."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._cursor.execute(_RELATIONS)
            after = _parse(self._cursor.fetchall())
            self._cursor.close()
        except Exception:  # noqa: BLE001 - the monitor connection died: report what was sampled
            after = self._before
        touched = []
        for oid, old in self._before.relations.items():
            modes = frozenset(self._seen.get(oid, ()))
            new = after.relations.get(oid)
            moved = new is not None and new.filenode != old.filenode
            if modes or moved:
                touched.append(Touch(old.name, modes, moved, None, dropped=new is None))
        return touched, after


# -- installation ---------------------------------------------------------------------------------------
_active: Observer | None = None
_installed = False


@contextlib.contextmanager
def observing(observer: Observer | None) -> Iterator[Observer | None]:
    """Route SQLAlchemy's events to observer while the block runs (None: observe nothing)."""
    global _active
    if observer is None:
        yield None
        return
    _install()
    _active = observer
    try:
        yield observer
    finally:
        _active = None
        observer.close()


def _install() -> None:
    global _installed
    if _installed:
        return
    sa.event.listen(Engine, "begin", lambda conn: _route(conn, "on_begin"))
    sa.event.listen(Engine, "commit", lambda conn: _route(conn, "on_commit"))
    sa.event.listen(Engine, "rollback", lambda conn: _route(conn, "on_rollback"))
    sa.event.listen(Engine, "before_cursor_execute", _before_execute)
    sa.event.listen(Engine, "after_cursor_execute", _after_execute)
    sa.event.listen(Engine, "handle_error", _on_error)
    _installed = True


def _ours(conn: Connection) -> bool:
    return _active is not None and not conn.get_execution_options().get("runner_control")


def _route(conn: Connection, method: str) -> None:
    if _ours(conn):
        getattr(_active, method)(conn)


def _before_execute(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
    if _ours(conn):
        assert _active is not None
        _active.on_statement(conn, statement)


def _after_execute(conn: Connection, *args: Any) -> None:
    if _ours(conn):
        assert _active is not None
        _active.on_statement_done(conn)


def _on_error(context: Any) -> None:
    conn = getattr(context, "connection", None)
    if conn is not None and _ours(conn):
        assert _active is not None
        _active.on_statement_done(conn, failed=True)
