"""The steps every command shares: load the scripts, wait until ready, take the lock, plan.

Commands (runner.commands, the ledger's and verify's) are built from these; they sit below every
command module and import none of them, so imports only go down.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Iterator

from alembic.config import Config
from alembic.script import ScriptDirectory

from runner import db, ledger, revisions
from runner.context import Run
from runner.errors import PreflightRefused
from runner.revisions import DbState, fmt
from runner.wait.ready import wait_until_ready


def load(run: Run) -> tuple[Config, ScriptDirectory]:
    """Return the Alembic config and the loaded scripts (a broken directory: exit 2 or 7)."""
    cfg = revisions.alembic_config(run.settings)
    # online operations (runner.online) inside a revision find the run's settings, log and
    # cancellation here; under plain `alembic upgrade` there is none and they use the defaults
    cfg.attributes["runner_run"] = run
    if run.tenant is not None:  # fleet schema mode, as Alembic's cookbook: `alembic -x tenant=...`
        cfg.cmd_opts = argparse.Namespace(x=[f"tenant={run.tenant}"])
        cfg.attributes["tenant"] = run.tenant
    revisions.route_logging(run.log)
    return cfg, revisions.load_scripts(cfg)


def ready_state(run: Run, cfg: Config, script: ScriptDirectory) -> DbState:
    """Wait until the database is ready (exit 3 at the deadline), then read its revisions."""
    with wait_until_ready(run) as conn:
        return revisions.read_state(cfg, script, conn)


@contextlib.contextmanager
def locked(run: Run, cfg: Config, script: ScriptDirectory, seen: DbState,
           goal: tuple[str, ...] | None = None) -> Iterator[DbState]:
    """Hold the migration lock for the version table seen; yield the state read again under it
    (another copy may have changed the database while we waited).

    With goal, a waiter reads the version table on every poll and stops waiting once the database
    is there: it yields that state without taking the lock (read-only; nothing left to do).
    """
    if run.settings.database_url.is_sqlite:  # a kernel lock on a file next to the database
        from runner.sqlite.lock import migration_lock
    else:
        from runner.lock.migration import migration_lock  # off the no-op fast path

    ledger.track(run, seen)  # the ledger records this run, a lock timeout too
    there = None if goal is None else lambda conn: set(revisions.stamped(conn, seen)) == set(goal)
    with migration_lock(run, seen.version_schema or "", seen.version_table, there) as lock:
        if lock is None:  # another copy reached the goal while we waited
            yield dataclasses.replace(seen, heads=goal or ())
            return
        with db.connect(run, "inspect") as conn:
            state = revisions.read_state(cfg, script, conn)
        with ledger.locked(run, script, state):  # tables, baseline; checksums of what was applied
            yield state


def plan(run: Run, script: ScriptDirectory, state: DbState, target: str,
         downgrade: bool) -> tuple[str, ...]:
    """Refuse what must not run; return the resolved target revisions."""
    revisions.check_known(script, state.heads)
    goal = revisions.resolve(script, target, state.heads)
    check_direction(script, state.heads, goal, downgrade)
    run.summary.update({"from": fmt(state.heads), "target": fmt(goal)})
    return goal


def check_direction(script: ScriptDirectory, current: tuple[str, ...], goal: tuple[str, ...],
                    downgrade: bool) -> None:
    """Refuse a downgrade that does not go back, or an upgrade that does not go forward (exit 7)."""
    below = revisions.ancestors(script, current)
    if set(goal) == set(current):
        return
    if downgrade and not set(goal) <= below:
        raise PreflightRefused(f"downgrade target {fmt(goal)} is not an ancestor of the current "
                               f"revision {fmt(current)}: a downgrade can only go back")
    if not downgrade and set(goal) <= below:  # base (no revisions) included
        raise PreflightRefused(f"upgrade target {fmt(goal)} is older than the current revision "
                               f"{fmt(current)}: use 'downgrade --to {fmt(goal)}"
                               + (" --yes'" if not goal else "'"))
