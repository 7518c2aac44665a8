"""Round trips, one revision at a time, in topological order (branches and merges included):
upgrade r (its SQL captured for the lint), downgrade r, the schema must equal the one before r,
upgrade r again. A revision may declare itself irreversible:

    runner_irreversible = "drops the legacy audit table; restore it from a backup instead"

The whole walk is one env.py run: the steps come from a generator, which Alembic asks for the
next step only once the previous one is applied and committed (every revision in a transaction
of its own, as `upgrade` runs them, whatever env.py's transaction_per_migration says), so the
fingerprints are read between steps, on env.py's own connection. A failing step ends that run;
the walk rebuilds the scratch database and goes on with the next revision.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.migration import RevisionStep
from alembic.script import Script, ScriptDirectory
from sqlalchemy.engine import Connection

from runner import db, phases
from runner.db import sqlstate
from runner.errors import PreflightRefused, RunnerError
from runner.verify import capture, fingerprint, instead, steps
from runner.verify.fingerprint import Fingerprint, Table
from runner.verify.instead import Change
from runner.verify.lint import RevisionSql
from runner.verify.observe import ObservationFailed, Observer
from runner.verify.report import ERROR, NOTE, WARN, Finding, relative
from runner.verify.role import INSUFFICIENT_PRIVILEGE
from runner.verify.scratch import Scratch


class _OwnError(Exception):
    """verify's own work between two steps failed (the cause is attached)."""


FIRST, DOWN, AGAIN, REBUILD = "upgrade", "downgrade", "upgrade again", "rebuild"
_DOING = {AGAIN: "upgrade again (after its downgrade)", REBUILD: "rebuilding the scratch database: upgrade"}


@dataclasses.dataclass(frozen=True)
class Markers:
    """What a revision file declares about itself."""

    irreversible: str | None
    allow: dict[str, str]
    post_deploy: bool = False  # runner_phase = "post-deploy" (runner.phases)


def markers(script: Script, directory: ScriptDirectory) -> tuple[Markers, list[Finding]]:
    """Read runner_irreversible, runner_allow and runner_phase; a malformed marker is a finding."""
    module, problems = script.module, []
    where = dict(revision=script.revision, file=relative(script.path))
    irreversible = getattr(module, "runner_irreversible", None)
    if irreversible is not None and not (isinstance(irreversible, str) and irreversible.strip()):
        problems.append(Finding("chain", ERROR, "runner_irreversible must be a non-empty string: "
                                "the reason the revision cannot be undone", **where))
        irreversible = None
    allow = getattr(module, "runner_allow", None) or {}
    if not (isinstance(allow, dict) and all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                            for k, v in allow.items())):
        problems.append(Finding("chain", ERROR, 'runner_allow must be a dict {"squawk-rule": '
                                '"reason"} with a reason for every rule', **where))
        allow = {}
    try:
        post_deploy = phases.phase_of(directory, script.revision) == phases.POST
    except PreflightRefused as exc:  # what upgrade refuses (exit 7)
        problems.append(Finding("chain", ERROR, str(exc), **where))
        post_deploy = False
    return Markers(irreversible, dict(allow), post_deploy), problems


class RoundTrips:
    """Walk the chain on the scratch database; collect findings, the SQL and, for drift, the
    fingerprint at one given revision."""

    def __init__(self, scratch: Scratch, cfg: Config, script: ScriptDirectory, exclude: list[Table],
                 version_table: str, marks: dict[str, Markers], keep_at: tuple[str, ...] | None,
                 observer: Observer | None = None) -> None:
        self.scratch, self.cfg, self.script = scratch, cfg, script
        self.mode = scratch.server.settings.verify_roundtrip  # error, warn, off (upgrades only)
        self.observer = observer
        self.changes: dict[str, list[Change]] = {}  # revision -> how its upgrade changed each table
        self.upgraded = 0
        self.exclude, self.version_table, self.marks = exclude, version_table, marks
        self.keep_at = None if keep_at is None else frozenset(keep_at)
        self.kept: Fingerprint | None = None
        self.findings: list[Finding] = []
        self.sql: list[RevisionSql] = []
        self.round_tripped = 0
        self.irreversible = 0
        self.complete = False
        self.applied: list[str] = []  # what the scratch database holds, in order
        self._rebuild: list[str] = []  # applied without checks first (before --from, after a failure)
        self._todo: list[str] = []
        self._before: Fingerprint | None = None  # the schema before the next revision
        self._phase: tuple[str, str] | None = None  # the step running now: (revision, FIRST...)
        self._seen: list[capture.Statement] | None = None  # the first upgrade's SQL, while it runs
        self._ran = False
        self._conn: Connection | None = None

    def walk(self, plain: list[str], revisions: list[str]) -> None:
        """Apply `plain` without checks (before --from), then round-trip each of `revisions`."""
        self._rebuild, self._todo = list(plain), list(revisions)
        with self._connection():
            while True:
                try:
                    steps.run_env(self.cfg, self.script, self._conn, lambda rev, ctx: self._steps(ctx),
                                  per_migration=True)
                except RunnerError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a revision can raise anything: a finding
                    if not self._failed(exc):
                        return
                    continue
                self.complete = True
                return

    def models(self) -> list[object] | None:
        """Autogenerate's differences at head (None when env.py declares no target_metadata)."""
        with self._connection():
            return steps.compare_models(self.cfg, self.script, self._conn)

    def fingerprint_at(self, heads: tuple[str, ...]) -> Fingerprint:
        """The schema at heads, built from an empty database (drift when the walk did not pass
        there, e.g. with --from past the live revision)."""
        self.scratch.recreate()
        wanted = set().union(*(self._ancestors(h) for h in heads)) if heads else set()
        order = [s.revision for s in steps.topological(self.script) if s.revision in wanted]
        with self._connection():
            if order:
                steps.apply(self.cfg, self.script, [(r, True) for r in order], self._conn)
            assert self._conn is not None
            return fingerprint.read(self._conn, self.exclude)

    # -- the steps, generated one at a time ----------------------------------------------------------
    def _steps(self, context: Any) -> Iterator[RevisionStep]:
        conn = context.connection
        for rev in self._rebuild:
            yield from self._step(rev, REBUILD, conn)
            self.applied.append(rev)
        self._rebuild = []
        if self._before is None:
            self._before = self._fingerprint(conn)
        while self._todo:
            rev = self._todo[0]
            mark = self.marks.get(rev, Markers(None, {}))
            before = self._before
            self._seen = capture.begin(self.version_table)
            yield from self._step(rev, FIRST, conn)
            self._end_capture(rev)
            self.applied.append(rev)
            if self.mode == "off":
                pass
            elif mark.irreversible:
                self.irreversible += 1
                self._finding(NOTE, "roundtrip", f"not round-tripped: declared irreversible "
                              f"({mark.irreversible})", rev)
            else:
                yield from self._step(rev, DOWN, conn)
                for line in fingerprint.diff(before or {}, self._fingerprint(conn, keep=False)):
                    self._finding(self._severity, "roundtrip", f"the downgrade does not undo the upgrade: "
                                  f"{line} [after the downgrade, compared with before the upgrade]", rev)
                yield from self._step(rev, AGAIN, conn)
                self.round_tripped += 1
            self._before = self._fingerprint(conn)
            self.changes[rev] = instead.changes(before, self._before)
            self.upgraded += 1
            self._todo.pop(0)
            self.scratch.server.log("verify.revision", f"{rev}: " + (
                "upgraded" if self.mode == "off" else "upgraded (irreversible)" if mark.irreversible
                else "upgraded, downgraded, upgraded again"))

    @property
    def _severity(self) -> str:
        """Round-trip problems fail verify unless VERIFY_ROUNDTRIP=warn."""
        return WARN if self.mode == "warn" else ERROR

    def _step(self, rev: str, phase: str, conn: Connection) -> Iterator[RevisionStep]:
        self._phase, self._ran = (rev, phase), False
        watch = self.observer if phase != REBUILD else None
        if watch is not None:
            self._own(lambda: watch.arm(rev, phase, conn))
        yield steps.step(self.script, rev, phase != DOWN, on_run=self._mark_ran)
        if not self._ran:  # a generator only works if Alembic applies each step before the next
            raise RuntimeError("Alembic asked for the next migration step before running this one")
        if watch is not None:
            self._own(lambda: watch.finish(conn))
        self._phase = None  # done: a failure from here on is not this step's

    def _own(self, work: Callable[[], object]) -> None:
        """verify's own reads between two steps: their failure is not the chain's."""
        try:
            work()
        except Exception as exc:
            raise _OwnError() from exc

    def _mark_ran(self) -> None:
        self._ran = True

    # -- failures ----------------------------------------------------------------------------------
    def _failed(self, exc: BaseException) -> bool:
        """Record a failed step; return whether the walk can go on (rebuilt from empty)."""
        self.scratch.server.cancel.check()  # a signal or the deadline: stop, don't report
        if self.observer is not None:
            self.observer.abort()
        if isinstance(exc, _OwnError):
            raise exc.__cause__ or exc  # verify's own reads between steps: not the chain's fault
        if _caused_by(exc, ObservationFailed):
            raise exc  # verify's own reads during a step: not the chain's fault either
        if self._phase is None:  # env.py, before the first step (e.g. creating its version table)
            self.findings.append(Finding("migration", ERROR, "env.py failed before the first revision "
                                         f"ran: {steps.describe(exc)}"))
            return False
        rev, phase = self._phase
        self._end_capture(rev)
        hint = ""
        if phase == DOWN and isinstance(exc, NotImplementedError):
            hint = '; if it cannot be undone, declare it: runner_irreversible = "reason"'
        elif sqlstate(exc) == INSUFFICIENT_PRIVILEGE:
            hint = ("; verify runs revisions as a role that owns only the scratch database (not a "
                    "superuser, no CREATEDB or CREATEROLE): an extension it may not create goes in "
                    "VERIFY_EXTENSIONS or VERIFY_TEMPLATE")
        what = _DOING.get(phase, phase)
        self._finding(self._severity if phase in (DOWN, AGAIN) else ERROR, "migration",
                      f"{what} failed: {steps.describe(exc)}{hint}", rev, step=phase)
        if phase in (FIRST, REBUILD):
            return False  # what follows builds on it
        # the database is in no known state: start over from empty, then the next revision
        self._close()
        self.scratch.recreate()
        self._open()
        self._rebuild, self.applied, self._before = list(self.applied), [], None
        self._todo.pop(0)
        return True

    def _end_capture(self, rev: str) -> None:
        """Stop capturing; keep what the revision's first upgrade executed, for the lint."""
        if self._seen is None:
            return
        capture.end()
        executed = [s for s in self._seen if not (s.version_table or s.catalog_read)]
        mark = self.marks.get(rev, Markers(None, {}))
        first = next((i for i, s in enumerate(executed) if s.operation), len(executed))
        self.sql.append(RevisionSql(rev, self.file_of(rev), [s.sql for s in executed if not s.operation],
                                    fingerprint.relation_names(self._before or {}), mark.allow,
                                    list(dict.fromkeys(s.operation for s in executed if s.operation)),
                                    sum(1 for s in executed if s.operation), mark.post_deploy,
                                    [s.sql for s in executed[:first]]))
        self._seen = None

    def _finding(self, severity: str, check: str, message: str, rev: str, step: str | None = None) -> None:
        self.findings.append(Finding(check, severity, message, rev, self.file_of(rev), step=step))

    # -- fingerprints --------------------------------------------------------------------------------
    def _fingerprint(self, conn: Connection, keep: bool = True) -> Fingerprint:
        """Read the schema on env.py's connection, between two steps."""
        try:
            fp = self._read(conn)
        except Exception as exc:
            raise _OwnError() from exc
        if keep and self.keep_at is not None and self.kept is None and self._heads() == self.keep_at:
            self.kept = fp
        return fp

    def _read(self, conn: Connection) -> Fingerprint:
        # env.py runs every revision in one transaction: read in it (SQLite: no search_path to keep)
        if conn.in_transaction() and conn.dialect.name != "sqlite":
            path = conn.exec_driver_sql("SELECT current_setting('search_path')").scalar()
            fp = fingerprint.query(conn, self.exclude, prepared=True)
            conn.execute(sa.text("SELECT set_config('search_path', :p, true)"), {"p": path})
        else:  # committed per migration: a read-only transaction of our own
            fp = fingerprint.read(conn, self.exclude)
        return fp

    def _heads(self) -> frozenset[str]:
        """What the version table holds now: applied revisions no applied revision revises."""
        applied = set(self.applied)
        parents = {p for r in applied for p in self._script(r)._versioned_down_revisions}
        return frozenset(applied - parents)

    def _ancestors(self, rev: str) -> set[str]:
        """rev, its ancestors and their depends_on: everything applied to reach rev."""
        found, todo = set(), [rev]
        while todo:
            r = todo.pop()
            if r not in found:
                found.add(r)
                todo.extend(self._script(r)._all_down_revisions)
        return found

    def _script(self, rev: str) -> Script:
        script = self.script.get_revision(rev)
        assert script is not None, rev
        return script

    def file_of(self, rev: str) -> str | None:
        """The revision's file, relative to the working directory."""
        return relative(self._script(rev).path)

    # -- the connection handed to env.py -----------------------------------------------------------
    @contextlib.contextmanager
    def _connection(self) -> Iterator[None]:
        self._open()
        try:
            yield
        finally:
            self._close()

    def _open(self) -> None:
        self._conn = db.connect(self.scratch.run, "migrate", migrating=True)

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None


def _caused_by(exc: BaseException | None, kind: type[BaseException]) -> bool:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
