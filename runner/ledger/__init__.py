"""The ledger: who migrated what, when, from which image; checksums of applied revisions.

Two tables next to the version table (HISTORY_TABLE, default runner_history, and
<HISTORY_TABLE>_revisions), written by the runner on connections of their own. The hooks below
are what runner.commands calls; the modules: store (DDL, reads, writes), checksum (what a
revision's checksum covers), recording (one run's row and checksums), edits (edited
revisions), integrity (a ledger changed by hand), render (history and status output), admin
(history, stamp, repair).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import IO, Any

from alembic.script import ScriptDirectory

from runner.context import Run
from runner.revisions import DbState


def track(run: Run, seen: DbState) -> None:
    """Before taking the lock: record this run when report() runs (a lock timeout too)."""
    from runner.ledger import recording

    recording.track(run, seen)


@contextlib.contextmanager
def locked(run: Run, script: ScriptDirectory, state: DbState) -> Iterator[None]:
    """Under the lock: prepare the tables and baseline checksums; on the way out record the
    checksums of the revisions this run applied (or forget the ones it downgraded)."""
    from runner.ledger.recording import tracker_of

    tracker = tracker_of(run)
    if tracker is None:
        yield
        return
    tracker.enter(script, state)
    try:
        yield
    finally:
        tracker.leave()


def preflight(run: Run, downgrade: bool) -> None:
    """Under the lock, before the backup: refuse an edited applied revision (exit 7), then mark
    the run's row as running."""
    from runner.ledger import edits
    from runner.ledger.recording import tracker_of

    tracker = tracker_of(run)
    if tracker is not None:
        edits.check(tracker, downgrade)
        tracker.start()


def note(run: Run, entry: dict[str, Any]) -> None:
    """Add entry to the run's steps in its ledger row and write the row now (a restore point must
    be on record before the migration, even if the run is then killed)."""
    from runner.ledger.recording import tracker_of

    tracker = tracker_of(run)
    if tracker is not None:
        tracker.notes.append(entry)
        tracker.rewrite()


def detach(run: Run) -> None:
    """End the ledger's session on the database (a restore is about to swap the database under
    its name): the next write connects again, to the database that has the name then."""
    from runner.ledger.recording import tracker_of

    tracker = tracker_of(run)
    if tracker is not None:
        tracker.store.close()


def check_noop(run: Run, script: ScriptDirectory, state: DbState) -> None:
    """A no-op upgrade: refuse (exit 7) an edited applied revision or a damaged ledger, as a run
    with work does, without the lock and without writing anything (under the lock, with what the
    run read there)."""
    if run.settings.history_table == "off":
        return
    from runner.ledger import edits
    from runner.ledger.recording import Tracker, tracker_of

    tracker = tracker_of(run)
    if tracker is not None and tracker.script is not None:  # prepared under the lock
        edits.check(tracker, downgrade=False)
        return
    reader = Tracker(run, state)  # not one of run.finishers: it records nothing
    try:
        reader.inspect(script, state)
        edits.check(reader, downgrade=False)
    finally:
        reader.store.close()


def print_last_run(run: Run, state: DbState, out: IO[str]) -> None:
    """status: one line about the newest run (nothing when the ledger is off or unreadable)."""
    if run.settings.history_table == "off":
        return
    from runner.ledger import render
    from runner.ledger.recording import reason
    from runner.ledger.sqlite_store import store_for

    store = store_for(run, state.version_schema)
    try:
        with store.session() as conn:
            rows = store.latest(conn, 1) if store.exists(conn) else []
    except Exception as exc:  # noqa: BLE001 - status reports the database, the ledger is extra
        run.log.warning("ledger.unavailable", f"cannot read the ledger {store.where} ({reason(exc)})")
        return
    finally:
        store.close()
    print(render.last_run(rows[0] if rows else None), file=out)
    if rows:
        last = render.record(rows[0])
        run.summary["last_run"] = {k: last[k] for k in ("run_id", "command", "outcome", "exit_code",
                                                        "started")}
