"""Recording one run: a Tracker per run that takes the migration lock.

Its row starts as `running` once the run is about to change something (so a run killed by
SIGKILL or the OOM killer stays visible) and is completed by report() through run.finishers, with
the exit code and error the run really ended with. Checksums are written under the lock. A ledger
that cannot be read or written never changes a run's outcome: it logs one warning and the run
goes on without it. A ledger that can be read but is inconsistent (runner.ledger.integrity) fails
closed instead: upgrade and stamp refuse (exit 7), repair fixes it, the others warn.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

import runner
from runner import db, revisions
from runner.context import Run
from runner.exitcodes import ExitCode
from runner.ledger import checksum, integrity
from runner.ledger.sqlite_store import store_for
from runner.ledger.store import Recorded
from runner.redact import redact
from runner.revisions import DbState, fmt

# these start their row themselves once they know they will change something
DEFERRED_START = ("upgrade", "downgrade", "stamp", "repair")
# these refuse an inconsistent ledger (exit 7): they rely on its checksums or write new ones next
# to a gap. A downgrade warns (as it does about edited revisions: fixing a downgrade() is the usual
# reason to edit one); backup and restore do not use the checksums
REFUSE_DAMAGE = ("upgrade", "stamp")
_FAILED_OUTCOMES = {ExitCode.LOCK_TIMEOUT: "lock timeout", ExitCode.PREFLIGHT_REFUSED: "refused",
                    ExitCode.RUN_DEADLINE: "deadline", ExitCode.SIGTERM: "interrupted",
                    ExitCode.SIGINT: "interrupted"}
ERROR_LIMIT = 2000
GRANTS_HINT = "docs/history.md lists the privileges it needs"


class Tracker:
    """What the ledger knows about one run; its finish() is one of run.finishers."""

    def __init__(self, run: Run, seen: DbState) -> None:
        self.run, self.seen = run, seen
        self.store = store_for(run, seen.version_schema)  # PostgreSQL's, or a SQLite file's
        self.id = str(uuid.uuid4())  # the row's key: run ids are short, made for reading
        self.started = self.broken = False
        self.script: ScriptDirectory | None = None
        self.state = seen
        self.recorded: dict[str, Recorded] | None = None  # None: not read (yet, or unreadable)
        self.kept: list[dict[str, Any]] = []  # rows a restore would otherwise lose
        self.notes: list[dict[str, Any]] = []  # steps added besides revisions (repair, restore point)
        self.damage: dict[str, str] = {}  # column -> what is wrong with it (repair fixes it)
        self.deleted: dict[str, list[str]] = {}  # applied revision whose row was deleted -> later ones
        self._sums: dict[str, str] = {}

    # -- the hooks ---------------------------------------------------------------------------
    def enter(self, script: ScriptDirectory, state: DbState) -> None:
        """Under the lock: create the tables, baseline applied revisions without a checksum."""
        self.script, self.state = script, state
        self.attempt("prepare the ledger", self._prepare)
        if self.run.command not in DEFERRED_START:
            self.start()

    def inspect(self, script: ScriptDirectory, state: DbState) -> None:
        """Without the lock, read-only (a no-op upgrade): read the checksums, refuse a damaged
        ledger; write nothing, not even a baseline."""
        self.script, self.state = script, state
        self.attempt("read the ledger", self._read)

    def _prepare(self, conn: Connection) -> None:
        if self.store.ensure(conn):
            self.run.log("ledger.created", f"created the ledger tables {self.store.where} and "
                         f"{self.store.where}_revisions")
        if self.run.command == "restore":  # it replaces the ledger with the backup's copy
            self.kept = self.store.all_runs(conn)
        missing = self._read(conn)
        if missing:
            entries = [self.entry(rev) for rev in missing]
            self.store.record(conn, entries, "baseline", replace=False)
            assert self.recorded is not None
            self.recorded.update({r: Recorded(c, "baseline", None, self.run.run_id)
                                  for r, c, _ in entries})
            self.run.log("ledger.baseline", f"recorded the checksums of {len(missing)} revision(s) "
                         "applied without the ledger (before it existed, or by another tool)",
                         revisions=missing)

    def _read(self, conn: Connection) -> list[str]:
        """Read the checksums (self.recorded); refuse or note damage; return the applied revisions
        without a row that may be baselined (the newest ones: see integrity.deleted)."""
        if not self.store.has_revisions(conn):
            return []
        where = f"{self.store.where}_revisions"
        self.damage = integrity.shape_problems(self.store.revision_columns(conn))
        if self.damage:
            self._damaged(integrity.damaged_table(where, self.damage))
            return []  # nothing can be read from it: nothing checked, nothing baselined
        self.recorded = self.store.recorded(conn)
        missing = self.applied(self.state.heads) - set(self.recorded)
        self.deleted = integrity.deleted(self.script, missing, set(self.recorded))  # type: ignore[arg-type]
        if self.deleted:
            self._damaged(integrity.deleted_rows(where, self.deleted))
        return sorted(missing - set(self.deleted))

    def _damaged(self, error: integrity.LedgerDamaged) -> None:
        """Fail closed where the checksums matter; repair collects what to fix; the rest warn."""
        if self.run.command in REFUSE_DAMAGE:
            raise error
        if self.run.command != "repair":
            self.run.log.warning("ledger.damaged", f"{error}; this {self.run.command} goes on")

    def start(self) -> None:
        """Write the row as `running`: the run is about to change the database."""
        if not self.started:
            self.started = self.attempt(
                "record the run", lambda c: self.store.save_run(c, self.row(None, None), finished=False))

    def rewrite(self) -> None:
        """Write the running row again with what the run added to it (a note)."""
        if self.started:
            self.attempt("record the run", lambda c: self.store.save_run(c, self.row(None, None),
                                                                         finished=False))

    def leave(self) -> None:
        """Under the lock, after the steps: record the checksums of what was applied, forget what
        was downgraded (also when a later step failed: earlier steps are committed)."""
        if self.run.command == "restore":
            self.attempt("keep the ledger's rows across the restore", self._after_restore)
        if self.script is None or not self.run.steps:
            return
        applied, gone = self.changes()
        if applied or gone:
            def write(conn: Connection) -> None:
                self.store.record(conn, [self.entry(r) for r in sorted(applied)], "applied", replace=True)
                self.store.forget(conn, sorted(gone))
            self.attempt("record the checksums of the applied revisions", write)

    def finish(self, code: int, error: str | None) -> None:
        """report() calls this with the run's exit code: complete the row, or write it when the
        run failed before it started one (lock timeout, preflight refusal)."""
        try:
            if (code == 0 and not self.started) or self.broken:
                return
            if self.run.ending.abandoned:  # the backstop reports: a fresh connection, short timeouts
                self.store.reopen_short()
            row = self.row(code, error)

            def write(conn: Connection) -> None:
                if self.started or self.store.exists(conn):
                    self.store.save_run(conn, row, finished=True)
                else:  # the tables are created under the lock only, and this run never held it
                    self.run.log("ledger.skipped", f"run not recorded: {self.store.where} does not "
                                 "exist yet (the first run that takes the migration lock creates it)")

            self.attempt("record the run", write)
        finally:
            self.store.close()  # the last use: fleet workers run many targets in one process

    def _after_restore(self, conn: Connection) -> None:
        """The restore replaced the ledger with the backup's copy (or none, from before it existed):
        put back the rows it held before, then this run's own."""
        self.store.ensure(conn)
        self.store.put_back(conn, self.kept)
        if self.started:
            self.store.save_run(conn, self.row(None, None), finished=False)

    # -- helpers -----------------------------------------------------------------------------
    def attempt(self, what: str, fn: Callable[[Connection], object]) -> bool:
        """Run fn on a ledger connection; on any failure warn once and skip the ledger from then on."""
        if self.broken:
            return False
        try:
            with self.store.session() as conn:
                fn(conn)
            return True
        except integrity.LedgerDamaged:
            raise  # read, and found inconsistent: fails closed
        except Exception as exc:  # noqa: BLE001 - an unreadable ledger never changes a run's outcome
            self.broken = True
            self.run.summary["ledger"] = f"not recorded: could not {what} ({reason(exc)})"
            # the privileges are worth naming unless the server itself went away
            hint = "" if db.connection_lost(exc) else f" ({GRANTS_HINT})"
            self.run.log.warning("ledger.unavailable", f"could not {what} in {self.store.where} "
                                 f"({reason(exc)}); this run goes on without the ledger and keeps "
                                 f"its exit code{hint}")
            return False

    def applied(self, heads: tuple[str, ...]) -> set[str]:
        """Revisions applied at heads: the heads and everything below them that the scripts know."""
        assert self.script is not None
        known = tuple(h for h in heads if revisions.lookup(self.script, h) is not None)
        return revisions.ancestors(self.script, known)

    def checksum(self, revision: str) -> str:
        if revision not in self._sums:
            self._sums[revision] = checksum.of_file(self._path(revision))
        return self._sums[revision]

    def entry(self, revision: str) -> tuple[str, str, str]:
        """(revision, checksum, script file name) as the revisions table stores them."""
        return revision, self.checksum(revision), Path(self._path(revision)).name

    def _path(self, revision: str) -> str:
        assert self.script is not None
        return self.script.get_revision(revision).path  # type: ignore[union-attr]

    def changes(self) -> tuple[set[str], set[str]]:
        """Revisions this run's successful steps applied and removed, walking from the state read
        under the lock."""
        applied: set[str] = set()
        gone: set[str] = set()
        heads = self.state.heads
        for step in self.run.steps:
            if step["outcome"] not in ("applied", "downgraded"):
                continue
            dest = () if step["to"] == "base" else tuple(step["to"].split(":"))
            before, after = self.applied(heads), self.applied(dest)
            if step["outcome"] == "applied":
                applied |= after - before
                gone -= after
            else:
                gone |= before - after
                applied -= before - after
            heads = dest
        return applied, gone

    def row(self, code: int | None, error: str | None) -> dict[str, Any]:
        """The run's row: everything as text passes through redact()."""
        run, s, summary = self.run, self.run.settings, self.run.summary
        # the revision read under the lock: another copy may have migrated while this one waited
        start = fmt(self.state.heads) if self.script else summary.get("from") or fmt(self.seen.heads)
        row = {
            "id": self.id, "run_id": run.run_id, "command": run.command,
            "outcome": _outcome(code, summary, run.command),
            "exit_code": code, "from_revision": start,
            "to_revision": None if code is None else summary.get("to") or self.reached(start),
            "target": summary.get("target"),
            "steps": [{k: _clean(v) for k, v in step.items()} for step in [*run.steps, *self.notes]],
            "error": redact(error)[:ERROR_LIMIT] if error else None,
            "backup_key": summary.get("backup"), "started_at": run.started_at,
            "runner_version": runner.__version__, "image_version": s.image_version or None,
            "image_revision": s.image_revision or None,
            "host": s.pod_name or socket.gethostname(), "job_name": s.job_name or None,
        }
        return {k: _clean(v) for k, v in row.items()}

    def reached(self, start: str) -> str:
        """Where a run that did not finish left the database: after its last successful step."""
        done = [s["to"] for s in self.run.steps if s["outcome"] in ("applied", "downgraded")]
        return done[-1].replace(":", ",") if done else start


def _outcome(code: int | None, summary: dict[str, Any], command: str) -> str:
    if code is None:
        return "running"
    if code == 0:
        done = str(summary.get("outcome") or "ok")
        return "downgraded" if command == "downgrade" and done == "migrated" else done
    try:
        return _FAILED_OUTCOMES.get(ExitCode(code), "failed")
    except ValueError:
        return "failed"


def _clean(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


def reason(exc: BaseException) -> str:
    """One redacted line: the server's message, or the exception's."""
    orig = getattr(exc, "orig", None) or exc
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    return redact(first)


def tracker_of(run: Run) -> Tracker | None:
    """The run's tracker: the owner of its ledger finisher (there is at most one)."""
    for finish in run.finishers:
        owner = getattr(finish, "__self__", None)
        if isinstance(owner, Tracker):
            return owner
    return None


def track(run: Run, seen: DbState) -> Tracker | None:
    """Start recording a run that is about to take the migration lock (idempotent)."""
    if run.settings.history_table == "off":
        return None
    tracker = tracker_of(run)
    if tracker is None:
        tracker = Tracker(run, seen)
        run.finishers.append(tracker.finish)
    return tracker
