"""Apply revisions one transaction at a time; retry on lock_timeout; report who blocks us."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory

from runner import db, revisions
from runner.context import Run
from runner.errors import ConnectionLost, LockRetriesExhausted, MigrationFailed, RunnerError
from runner.migrate import autovacuum, concurrently, indexes, lockschedule
from runner.redact import scrub_query

LOCK_NOT_AVAILABLE = "55P03"
QUERY_CANCELED = "57014"

BLOCKERS_SQL = sa.text("""
SELECT DISTINCT b.pid, b.application_name, b.state,
       round(extract(epoch FROM now() - b.xact_start))::int AS xact_age_s,
       left(b.query, 400) AS query
FROM pg_stat_activity w
CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS bp(pid)
JOIN pg_stat_activity b ON b.pid = bp.pid
WHERE w.application_name = :app
""")

class _LockTimeout(Exception):
    def __init__(self, revision: str, attempt: int, message: str, blockers: list[int]) -> None:
        super().__init__(message)
        self.revision, self.attempt, self.blockers = revision, attempt, blockers


def apply_steps(run: Run, cfg: Config, script: ScriptDirectory, plan: list[tuple[str, str]],
                downgrade: bool, before_step: Callable[[str], None] | None = None) -> None:
    """Apply each step in its own transaction; the summary lists what was applied.

    before_step(revision) runs right before each step and may refuse it (runner.phases: a
    post-deploy revision while a backfill is unfinished).
    """
    applied: list[str] = run.summary.setdefault("applied", [])
    with (run.cancel.on_cancel(lambda: db.cancel_own_statements(run)), indexes.guarded(run) as guard,
          concurrently.guarded(run)):
        for revision, dest in plan:
            if before_step is not None:
                before_step(revision)
            run.log("migrate.step", f"{'downgrading' if downgrade else 'upgrading'} {revision}",
                    revision=revision, to=dest)
            step = {"revision": revision, "to": dest, "seconds": 0.0, "outcome": "failed"}
            run.steps.append(step)
            guard.revision = revision
            t0 = run.clock()
            try:
                _with_lock_retries(run, cfg, script, revision, dest, downgrade)
                step["outcome"] = "downgraded" if downgrade else "applied"
            finally:
                step["seconds"] = round(run.clock() - t0, 3)
            applied.append(revision)
    indexes.report_invalid(run)


def _with_lock_retries(run: Run, cfg: Config, script: ScriptDirectory, revision: str, dest: str,
                       downgrade: bool) -> None:
    """Run the step under each attempt's lock_timeout in turn (runner.migrate.lockschedule) until one
    gets its locks; exit 8 when the schedule runs out."""
    schedule = lockschedule.attempts(run.settings)
    started = run.clock()

    def on_retry(exc: BaseException, failed: lockschedule.Attempt, following: lockschedule.Attempt) -> None:
        run.log.warning("migrate.retry", f"{revision} hit lock_timeout "
                        f"({lockschedule.ms(failed.lock_timeout)}); rolled back, retrying with "
                        f"{lockschedule.ms(following.lock_timeout)}", attempt=failed.number,
                        of=len(schedule), retry_in=round(failed.pause, 2))
        assert isinstance(exc, _LockTimeout)
        if exc.blockers:
            _give_way(run, exc.blockers, revision)

    try:
        lockschedule.call(run, lambda attempt: _step_once(run, cfg, script, revision, dest, downgrade,
                                                          attempt),
                          retry_on=(_LockTimeout,), on_retry=on_retry, schedule=schedule)
    except _LockTimeout as exc:
        run.cancel.check()
        raise LockRetriesExhausted(
            f"revision {revision} could not get its table locks in {exc.attempt} attempts over "
            f"{run.clock() - started:.0f}s ({lockschedule.describe(run.settings)}; {exc}); the "
            "database stays at the last good revision: end the blocking sessions or retry at a "
            "quieter time") from None


def _give_way(run: Run, pids: list[int], revision: str) -> None:
    """Cancel the autovacuum workers among the sessions that blocked the step (runner.migrate.autovacuum)."""
    try:
        with db.connect(run, "monitor", autocommit=True, connect_timeout=5) as conn:
            autovacuum.give_way(conn, pids, run.log, f"revision {revision}")
    except Exception:  # noqa: BLE001 - best effort: the schedule goes on either way
        return


def _step_once(run: Run, cfg: Config, script: ScriptDirectory, revision: str, dest: str,
               downgrade: bool, attempt: lockschedule.Attempt) -> None:
    run.cancel.check()
    db.apply_libpq_environment(run, attempt.lock_timeout)  # for engines env.py builds itself
    monitor = _BlockerMonitor(run, attempt)
    monitor.start()
    try:
        with db.connect(run, "migrate", migrating=True, lock_timeout=attempt.lock_timeout) as conn:
            revisions.run_step(cfg, script, dest, downgrade, conn)
    except RunnerError:  # raised on purpose (preflight, online operations): it says what to do
        raise
    except Exception as exc:  # noqa: BLE001 - a migration can raise anything; all of it is classified
        run.cancel.check()  # cancelled by a signal or the deadline: say so, not "failed"
        lost = db.lost_cause(exc)
        if lost is not None:  # a restart or failover: a rerun will likely succeed
            raise ConnectionLost(f"lost the connection to the database while revision {revision} ran "
                                 f"({db.db_message(lost)}); its transaction rolled back, the database is "
                                 "at the last good revision: run again once the server is back") from None
        code = db.sqlstate(exc)
        if code == LOCK_NOT_AVAILABLE:
            blockers = monitor.last or []
            for b in blockers:
                run.log.warning("migrate.blocker", "session holding the lock we need",
                             pid=b["pid"], application_name=b["application_name"],
                             state=b["state"], xact_age_s=b["xact_age_s"],
                             query=scrub_query(b["query"]))
            raise _LockTimeout(revision, attempt.number, db.db_message(exc),
                               [b["pid"] for b in blockers]) from None
        what = "statement_timeout reached" if code == QUERY_CANCELED else db.db_message(exc)
        raise MigrationFailed(f"revision {revision} failed and was rolled back: {what}"
                              + ("" if code else f" ({type(exc).__name__})")) from None
    finally:
        monitor.stop()


POLL = 0.5  # seconds between two looks at pg_blocking_pids()


class _BlockerMonitor(threading.Thread):
    """Poll pg_blocking_pids() for our migration session while a step runs.

    Most steps finish well within the first poll: the monitor connects only for a step still
    running after POLL. Once a step hit lock_timeout, its next attempts are watched from half
    their lock_timeout on (an escalating attempt may last 100 ms), so the blockers get named.
    """

    def __init__(self, run: Run, attempt: lockschedule.Attempt) -> None:
        super().__init__(name="blocker-monitor", daemon=True)
        self.ctx: Run = run
        self.every = min(POLL, attempt.lock_timeout / 2)
        self.first = POLL if attempt.number == 1 else self.every
        self.last: list[dict[str, Any]] | None = None
        self._stop_event = threading.Event()
        self._logged: set[int] = set()

    def run(self) -> None:  # type: ignore[override]
        if self._stop_event.wait(self.first):
            return
        try:
            with db.connect(self.ctx, "monitor", autocommit=True, connect_timeout=5) as conn:
                while True:
                    rows = [dict(r) for r in conn.execute(
                        BLOCKERS_SQL, {"app": self.ctx.app_name("migrate")}).mappings()]
                    if rows:
                        self.last = rows
                        self._log_new(rows)
                    if self._stop_event.wait(self.every):
                        return
        except Exception:  # noqa: BLE001 - reporting is best effort; the migration goes on
            return

    def _log_new(self, rows: list[dict[str, Any]]) -> None:
        for b in rows:
            if b["pid"] not in self._logged:
                self._logged.add(b["pid"])
                self.ctx.log.warning("migrate.blocked", "migration is waiting for a lock held by "
                                  "another session", pid=b["pid"],
                                  application_name=b["application_name"], state=b["state"],
                                  xact_age_s=b["xact_age_s"], query=scrub_query(b["query"]))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=2)
