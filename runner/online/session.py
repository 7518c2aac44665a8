"""The session of one online operation: the revision's connection outside its transaction, the
run's settings, log and cancellation, and every step under the lock_timeout schedule.

An online operation runs inside Alembic's autocommit_block(): what the revision did before it is
committed, then each step is a short transaction of its own (or one CONCURRENTLY statement, which
cannot run in a transaction). So a pause between two lock_timeout attempts holds no lock, a
backfill never keeps the revision's transaction open, and a crash leaves whole steps behind, which
the operation finds in the catalog and skips when it runs again.

Under the runner the run (settings, log, SIGTERM / RUN_DEADLINE) comes from
`config.attributes["runner_run"]`; under plain `alembic` the operations use the default settings,
log to stderr and cannot be cancelled.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection, CursorResult

from runner import db
from runner.config import Settings
from runner.context import Run
from runner.errors import LockRetriesExhausted, MigrationFailed, NeedsDatabase
from runner.log import EventLog
from runner.migrate import autovacuum, lockschedule
from runner.migrate.lockschedule import Attempt
from runner.redact import redact, scrub_query

LOCK_NOT_AVAILABLE = "55P03"
DEADLOCK_DETECTED = "40P01"
QUERY_CANCELED = "57014"
T = TypeVar("T")

# called with the label of each completed step; the tests raise from here to crash an operation
# between two steps (and check that a rerun continues)
AFTER_STEP: list[Callable[[str], None]] = []
# the label of the operation running now, e.g. "create_index_online(ix, orders)": verify tells the
# statements and locks of an online operation from the revision's own by it
RUNNING: contextvars.ContextVar[str | None] = contextvars.ContextVar("runner_online_operation",
                                                                    default=None)


class LockWait(Exception):
    """One attempt of a step hit lock_timeout (or a deadlock): Session.retried tries it again.
    holders: the sessions holding the locks it waited for (rows with pid, application_name,
    state, xact_age_s, query)."""

    def __init__(self, step: str, holders: Sequence[Any]) -> None:
        super().__init__(step)
        self.step, self.blockers, self.pids = step, describe(holders), [h.pid for h in holders]
        self.attempt: Attempt | None = None  # set by Session.retried


# who holds locks on the tables a step needs (asked right after its lock_timeout: the long
# transaction it queued behind is still there)
HOLDERS_SQL = sa.text("""
SELECT a.pid, a.application_name, a.state,
       round(extract(epoch FROM now() - a.xact_start))::int AS xact_age_s,
       left(a.query, 400) AS query, string_agg(DISTINCT l.mode, '+') AS modes
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.granted AND l.locktype = 'relation' AND l.relation = ANY(CAST(:oids AS oid[]))
  AND a.pid <> pg_backend_pid()
GROUP BY a.pid, a.application_name, a.state, a.xact_start, a.query
ORDER BY a.xact_start NULLS LAST
LIMIT 5
""")


def ms(seconds: float) -> int:
    """Whole milliseconds, at least 1 (PostgreSQL reads 0 as "no timeout")."""
    return max(1, round(seconds * 1000))


def literal(value: str | None) -> str:
    """A string as an SQL literal, safe whatever standard_conforming_strings says."""
    if value is None:
        return "NULL"
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", exc)
    return getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)


def message(exc: BaseException) -> str:
    """The server's error, first line, redacted (no SQL, no row contents)."""
    orig = getattr(exc, "orig", exc)
    return redact((str(orig).strip().splitlines() or [type(orig).__name__])[0])


def describe(rows: Sequence[Any]) -> list[str]:
    """Sessions as one short string each: pid, application, state, transaction age, query."""
    out = []
    for r in rows:
        age = "" if r.xact_age_s is None else f", transaction {r.xact_age_s}s"
        modes = f", holds {r.modes}" if getattr(r, "modes", None) else ""
        out.append(f"pid {r.pid} ({r.application_name or '?'}, {r.state}{age}{modes}): "
                   f"{scrub_query(r.query)}")
    return out


def run_of(ctx: MigrationContext) -> Run:
    """The runner's run, or defaults under plain `alembic` (stderr log, no cancellation)."""
    run = ctx.config.attributes.get("runner_run") if ctx.config is not None else None
    return run if isinstance(run, Run) else Run(settings=Settings(), log=EventLog(), command="alembic")


def revision_of_caller() -> str | None:
    """The revision whose upgrade() or downgrade() is calling (recorded with its backfills)."""
    frame = inspect.currentframe()
    while frame is not None:
        found = frame.f_globals.get("revision")
        if (frame.f_code.co_name in ("upgrade", "downgrade") and isinstance(found, str)
                and "down_revision" in frame.f_globals):
            return found
        frame = frame.f_back
    return None


class Session:
    """One operation's connection and run; steps go through transaction() or the CONCURRENTLY
    runner (runner.online.concurrently)."""

    def __init__(self, ctx: MigrationContext, run: Run, what: str) -> None:
        self.ctx, self.run, self.what = ctx, run, what
        self.settings: Settings = run.settings
        self.revision = revision_of_caller()
        self._session_lock_timeout: str | None = None  # restored when the operation ends
        self._side: Connection | None = None
        # run on the revision's connection once the operation is done, inside the transaction
        # Alembic begins after it: they commit if and only if the revision does
        self.with_revision: list[Callable[[Connection], None]] = []

    @property
    def conn(self) -> Connection:
        """The revision's connection, in autocommit mode while the operation runs."""
        assert self.ctx.connection is not None
        return self.ctx.connection

    @property
    def version_schema(self) -> str | None:
        return self.ctx.version_table_schema

    # -- statements --------------------------------------------------------------------------
    @property
    def percents_doubled(self) -> bool:
        """Whether the driver reads % as a parameter marker (psycopg2, psycopg: `pyformat`)."""
        return self.ctx.dialect.paramstyle in ("pyformat", "format")

    def sql(self, statement: str) -> CursorResult[Any]:
        """Run one statement as written: its `%` and `:` reach the server as they are."""
        if self.percents_doubled:
            statement = statement.replace("%", "%%")
        return self.conn.exec_driver_sql(statement)

    def query(self, statement: str, **params: Any) -> CursorResult[Any]:
        return self.conn.execute(sa.text(statement), params)

    def compile(self, element: Any, **kw: Any) -> str:
        """SQL text of a DDL construct or an expression (values inline), as the server reads it."""
        if isinstance(element, sa.types.TypeEngine):
            return self.plain(str(element.compile(dialect=self.ctx.dialect)))
        return self.plain(str(element.compile(dialect=self.ctx.dialect, compile_kwargs=kw)))

    def plain(self, compiled: str) -> str:
        """SQLAlchemy's compiled text without the `%%` it writes for pyformat drivers."""
        return compiled.replace("%%", "%") if self.percents_doubled else compiled

    def side(self) -> Connection:
        """A second connection of the same engine (autocommit), e.g. to watch the first."""
        if self._side is None:  # the runner's own (runner_control): not the revision's SQL
            self._side = self.conn.engine.connect().execution_options(isolation_level="AUTOCOMMIT",
                                                                      runner_control=True)
        return self._side

    def set_lock_timeout(self, seconds: float) -> None:
        """Set lock_timeout for the session (statements outside a transaction); the operation
        puts the session's own value back when it ends."""
        if self._session_lock_timeout is None:
            self._session_lock_timeout = str(self.sql("SHOW lock_timeout").scalar_one())
        self.sql(f"SET lock_timeout = '{ms(seconds)}ms'")

    def close(self) -> None:
        """Put lock_timeout back and close the second connection (best effort: after a signal or
        a lost connection there is nothing left to restore)."""
        with contextlib.suppress(Exception):
            if self._session_lock_timeout is not None:
                self.query("SELECT set_config('lock_timeout', :v, false)", v=self._session_lock_timeout)
        if self._side is not None:
            with contextlib.suppress(Exception):
                self._side.close()

    # -- steps -------------------------------------------------------------------------------
    def transaction(self, step: str, statements: Sequence[str], tables: Sequence[int]) -> None:
        """Run statements in one transaction, each attempt under the schedule's lock_timeout; on
        lock_timeout (or a deadlock) roll back, pause and try again; out of attempts: exit 8."""
        def attempt(a: Attempt) -> None:
            try:
                self.sql("BEGIN")
                self.sql(f"SET LOCAL lock_timeout = '{ms(a.lock_timeout)}ms'")
                for statement in statements:
                    self.sql(statement)
                self.sql("COMMIT")
            except sa.exc.DBAPIError as exc:
                self.rollback()
                self.run.cancel.check()  # cancelled by SIGTERM or the deadline: say so
                if sqlstate(exc) not in (LOCK_NOT_AVAILABLE, DEADLOCK_DETECTED):
                    raise
                raise LockWait(step, self.holders(tables)) from None

        self.retried(attempt)
        self.done(step)

    def rollback(self) -> None:
        with contextlib.suppress(sa.exc.DBAPIError):
            self.sql("ROLLBACK")

    def retried(self, attempt: Callable[[Attempt], T]) -> T:
        """Return attempt(a) for the first attempt a of the lock_timeout schedule that does not
        raise LockWait (runner.migrate.lockschedule.call, as the revision-level retries): one log line per
        retry, a pause, the next attempt; out of attempts LockRetriesExhausted (exit 8)."""
        schedule = lockschedule.attempts(self.settings)

        def once(a: Attempt) -> T:
            self.run.cancel.check()
            try:
                return attempt(a)
            except LockWait as exc:
                exc.attempt = a
                raise

        def on_retry(exc: BaseException, failed: Attempt, following: Attempt) -> None:
            assert isinstance(exc, LockWait)
            self.run.log.warning("online.retry", f"{self.what}: {exc.step}: lock_timeout "
                                 f"({ms(failed.lock_timeout)}ms) on attempt {failed.number} of "
                                 f"{len(schedule)}; retrying in {failed.pause:.2f}s",
                                 attempt=failed.number, of=len(schedule), blockers=exc.blockers or None)
            with contextlib.suppress(sa.exc.DBAPIError):  # best effort: the schedule goes on
                autovacuum.give_way(self.conn, exc.pids, self.run.log, f"{self.what}: {exc.step}")

        try:
            return lockschedule.call(self.run, once, retry_on=(LockWait,), on_retry=on_retry,
                                     schedule=schedule)
        except LockWait as exc:
            self.run.cancel.check()
            assert exc.attempt is not None
            who = f" ({'; '.join(exc.blockers)})" if exc.blockers else ""
            raise LockRetriesExhausted(
                f"{self.what}: {exc.step} could not get its locks in {exc.attempt.number} attempts "
                f"(lock_timeout up to {ms(exc.attempt.lock_timeout)}ms); the steps before it are "
                f"kept and a rerun continues from there: end the blocking sessions{who} or retry "
                "at a quieter time") from None

    def holders(self, tables: Sequence[int]) -> list[Any]:
        """Sessions holding locks on these tables, oldest transaction first (best effort)."""
        try:
            return list(self.query(str(HOLDERS_SQL), oids=list(tables)).all())
        except sa.exc.DBAPIError:
            self.rollback()
            return []

    def done(self, step: str) -> None:
        self.run.log("online.step", f"{self.what}: {step}", revision=self.revision)
        for hook in AFTER_STEP:
            hook(step)


@contextlib.contextmanager
def session(operations: Operations, what: str) -> Iterator[Session]:
    """Run an online operation outside the revision's transaction; a database error becomes one
    line naming the operation (exit 6); a lost connection stays what it is (exit 11)."""
    ctx = operations.get_context()
    if ctx.as_sql:
        raise NeedsDatabase(f"{what}: online operations read the catalog to decide each step and "
                            "cannot be rendered as offline SQL: use `plan --scratch`, or run them "
                            "against a database")
    s = Session(ctx, run_of(ctx), what)
    with _outside_transaction(ctx, what):
        running = RUNNING.set(what)
        try:
            yield s
        except sa.exc.DBAPIError as exc:
            s.rollback()
            s.run.cancel.check()
            if db.connection_lost(exc):
                raise
            raise MigrationFailed(f"{what} failed: {message(exc)}; the steps it completed are kept "
                                  "and a rerun continues from them") from None
        finally:
            s.close()
            RUNNING.reset(running)
    for record in s.with_revision:
        record(s.conn)


@contextlib.contextmanager
def _outside_transaction(ctx: MigrationContext, what: str) -> Iterator[None]:
    """Alembic's autocommit_block(), unless the revision is already inside one."""
    assert ctx.connection is not None
    with contextlib.ExitStack() as stack:
        if ctx.connection.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            try:
                stack.enter_context(ctx.autocommit_block())
            except AssertionError:  # Alembic's own check: env.py began the transaction itself
                raise MigrationFailed(
                    f"{what} needs Alembic's autocommit_block(): let env.py manage transactions "
                    "with context.begin_transaction() and transaction_per_migration=True, not "
                    "connection.begin()") from None
        yield
