"""The ledger's commands: `history`, `stamp REV --yes` and `repair [REV ...]`, and status's line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import IO

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection

from runner import db, revisions
from runner.context import Run
from runner.errors import ConfigError, MigrationFailed, PreflightRefused
from runner.flow import load, locked, ready_state
from runner.ledger import edits, integrity, render
from runner.ledger.recording import GRANTS_HINT, Tracker, reason, tracker_of
from runner.ledger.sqlite_store import store_for
from runner.revisions import fmt


def history(run: Run, args: argparse.Namespace, out: IO[str] | None = None) -> None:
    """Print the newest runs first, as a table or JSON; changes nothing, takes no lock."""
    limit, fmt_ = args.limit, args.format
    if limit < 1:
        raise ConfigError(f"history --limit {limit}: give a number of runs, at least 1")
    _require_ledger(run, "history")
    cfg, script = load(run)
    store = store_for(run, ready_state(run, cfg, script).version_schema)
    try:
        with store.session() as conn:
            rows = store.latest(conn, limit) if store.exists(conn) else []
    except Exception as exc:  # noqa: BLE001 - one line naming the table and the fix
        raise ConfigError(f"cannot read the ledger {store.where} ({reason(exc)}): grant the runner's "
                          f"role SELECT on it ({GRANTS_HINT})") from None
    finally:
        store.close()
    out = out or sys.stdout
    if fmt_ == "json":
        print(render.as_json(rows), file=out)
    elif rows:
        print(render.as_text(rows), file=out)
    else:
        print(f"no runs recorded in {store.where} yet: the first run that takes the migration lock "
              "creates it", file=out)
    run.summary.update(outcome="listed", runs=len(rows))


def stamp(run: Run, args: argparse.Namespace) -> None:
    """Set the version table to REV without running any migration, under the lock."""
    revision = args.revision
    if not args.yes:
        raise ConfigError(f"stamp {revision} sets the database's revision without running any "
                          "migration: check the schema matches it, then add --yes to confirm")
    cfg, script = load(run)
    with locked(run, cfg, script, ready_state(run, cfg, script)) as state:
        revisions.check_known(script, state.heads)
        goal = revisions.resolve(script, revision, state.heads)
        run.summary.update({"from": fmt(state.heads), "target": fmt(goal)})
        if set(goal) == set(state.heads):
            run.log("stamp.noop", f"database already stamped {fmt(goal)}: nothing to do")
            run.summary.update(to=fmt(goal), outcome="nothing to do")
            return
        tracker = tracker_of(run)
        if tracker:
            tracker.start()
        with db.connect(run, "migrate", migrating=True) as conn:
            _alembic_stamp(cfg, goal, conn)
        with db.connect(run, "verify") as conn:
            after = revisions.read_state(cfg, script, conn).heads
        if tracker:
            _record_stamp(tracker, state.heads, after)
    if set(after) != set(goal):
        raise MigrationFailed(f"after stamping the database is at {fmt(after)}, expected {fmt(goal)}: "
                              "check env.py's run_migrations")
    run.log("stamp.done", f"stamped {fmt(after)} (was {fmt(state.heads)}); no migration ran")
    run.summary.update(to=fmt(after), outcome="stamped")


def repair(run: Run, args: argparse.Namespace) -> None:
    """Re-record the checksums of applied revisions whose scripts were edited (reviewed), under the
    lock; also give a damaged ledger back what it lost (its checksum column, deleted rows)."""
    wanted: list[str] = args.revisions
    _require_ledger(run, "repair")
    cfg, script = load(run)
    with locked(run, cfg, script, ready_state(run, cfg, script)) as state:
        revisions.check_known(script, state.heads)
        tracker = tracker_of(run)
        if tracker is not None and tracker.damage:
            return _rebuild(run, tracker, state.heads)
        if tracker is None or tracker.recorded is None:  # tracker: HISTORY_TABLE is not off
            where = tracker.store.where if tracker else run.settings.history_table
            raise ConfigError(f"cannot read the ledger {where}: {GRANTS_HINT}")
        chosen = [_applied_id(tracker, rev) for rev in wanted]
        changed = {rev: (rec.checksum, now) for rev, rec, now in edits.edited(tracker)}
        changed.update({rev: (None, tracker.checksum(rev)) for rev in tracker.deleted})
        todo = [rev for rev in (chosen or sorted(changed)) if rev in changed]
        for rev in sorted(set(chosen) - set(changed)):
            run.log("ledger.repair", f"revision {rev} already matches its recorded checksum")
        run.summary.update({"from": fmt(state.heads), "to": fmt(state.heads), "repaired": todo})
        if not todo:
            run.summary["outcome"] = "nothing to repair"
            return
        _write(tracker, {rev: changed[rev] for rev in todo}, lambda conn: tracker.store.record(
            conn, [tracker.entry(rev) for rev in todo], "repaired", replace=True))
    run.summary["outcome"] = "repaired"


def _rebuild(run: Run, tracker: Tracker, heads: tuple[str, ...]) -> None:
    """The revisions table lost its checksum column (dropped or retyped): rebuild it with the
    checksum of every applied revision, whatever revisions were named."""
    if set(tracker.damage) - set(integrity.REPAIRABLE):
        raise integrity.damaged_table(f"{tracker.store.where}_revisions", tracker.damage)
    applied = sorted(tracker.applied(heads))
    old: dict[str, str | None] = {}
    tracker.attempt("read the ledger", lambda conn: old.update(tracker.store.old_checksums(conn)))
    run.log.warning("ledger.rebuild", f"the ledger {tracker.store.where}_revisions lost its checksum "
                    f"column ({tracker.damage['checksum']}): rebuilding it with the checksums of the "
                    f"{len(applied)} applied revision(s) in these scripts")
    run.summary.update({"from": fmt(heads), "to": fmt(heads), "repaired": applied})
    _write(tracker, {rev: (old.get(rev), tracker.checksum(rev)) for rev in applied},
           lambda conn: tracker.store.rebuild_checksums(
               conn, tracker.damage, [tracker.entry(rev) for rev in applied]))
    run.summary["outcome"] = "repaired"


def _write(tracker: Tracker, changes: dict[str, tuple[str | None, str]],
           write: Callable[[Connection], object]) -> None:
    """Record the run as `running`, write, and log each revision's old and new checksum."""
    tracker.notes = [{"revision": rev, "outcome": "repaired", "old": old, "new": new}
                     for rev, (old, new) in changes.items()]
    tracker.start()
    if not tracker.attempt("re-record the checksums", write):
        raise ConfigError(f"could not write the ledger {tracker.store.where}: {GRANTS_HINT}")
    for rev, (old, new) in changes.items():
        what = "recorded the missing checksum" if old is None else "re-recorded the checksum"
        tracker.run.log("ledger.repaired", f"{what} of {rev}", old=old, new=new)


def _applied_id(tracker: Tracker, revision: str) -> str:
    """The full id of an applied revision (a unique prefix works, as in Alembic)."""
    assert tracker.script is not None
    found = revisions.lookup(tracker.script, revision)
    full = found.revision if found is not None else None
    if full is None:
        raise PreflightRefused(f"revision {revision} is not in the migration scripts: check the id "
                               "('python -m runner history' and 'status' show them)")
    if full not in tracker.applied(tracker.state.heads):
        raise PreflightRefused(f"revision {full} is not applied to this database (at "
                               f"{fmt(tracker.state.heads)}): only applied revisions have checksums")
    return full


def _alembic_stamp(cfg: Config, goal: tuple[str, ...], conn: Connection) -> None:
    cfg.attributes["connection"] = conn
    try:
        command.stamp(cfg, list(goal) if goal else "base")
    finally:
        cfg.attributes.pop("connection", None)


def _record_stamp(tracker: Tracker, before: tuple[str, ...], after: tuple[str, ...]) -> None:
    """Revisions the stamp marked applied get checksums of kind `stamped`; ones it removed go."""
    new = sorted(tracker.applied(after) - tracker.applied(before))
    gone = sorted(tracker.applied(before) - tracker.applied(after))

    def write(conn: Connection) -> None:
        tracker.store.record(conn, [tracker.entry(rev) for rev in new], "stamped", replace=True)
        tracker.store.forget(conn, gone)

    tracker.attempt("record the stamped revisions", write)


def _require_ledger(run: Run, what: str) -> None:
    if run.settings.history_table == "off":
        raise ConfigError(f"HISTORY_TABLE=off disables the ledger, so there is nothing for '{what}' "
                          "to work on: unset HISTORY_TABLE (default runner_history)")
