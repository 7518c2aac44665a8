"""One function per command, each readable top to bottom (after Alembic's command.py)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from typing import IO

from alembic.config import Config
from alembic.script import ScriptDirectory

from runner import db, ledger, revisions
from runner.context import Run
from runner.errors import ConfigError, MigrationFailed, Pending, PreflightRefused
from runner.revisions import DbState, fmt
from runner.wait import wait_until_ready


def dispatch(run: Run, args: argparse.Namespace) -> None:
    """Run the command args names (runner.cli.COMMANDS) on one database."""
    match args.command:
        case "upgrade":
            upgrade(run, args.to)
        case "downgrade":
            downgrade(run, args.to, args.yes, args.confirm)
        case "status":
            status(run, args.check)
        case "wait":
            wait(run, args.until_head)
        case "plan":
            plan(run, args.to, scratch=args.scratch)
        case "verify":
            from runner import verify

            verify.verify(run, from_rev=args.from_rev, against=args.against, fmt=args.format)
        case "backup":
            backup(run)
        case "backups":
            backups(run, from_database=args.from_database, all_databases=args.all_databases)
        case "restore":
            restore(run, args.backup, args.yes, from_database=args.from_database)
        case "history":
            from runner import ledger

            ledger.history(run, limit=args.limit, fmt=args.format)
        case "stamp":
            from runner import ledger

            ledger.stamp(run, args.revision, args.yes)
        case "repair":
            from runner import ledger

            ledger.repair(run, args.revisions)


def upgrade(run: Run, target: str = "head") -> None:
    """Bring the database up to target (default head), under the lock."""
    _migrate(run, target, downgrade=False)


def downgrade(run: Run, target: str, yes: bool = False, confirm: str | None = None) -> None:
    """Take the database back to target: a revision id, -N, or base (with yes).

    confirm, when given, must repeat target: a rollback Job carries both, so a stale or missing
    confirmation refuses (exit 2) instead of rolling back to a revision nobody re-checked.
    """
    if confirm is not None and confirm != target:
        raise ConfigError(f"downgrade --to {target!r} is not confirmed (--confirm {confirm!r}): "
                          "set the confirmation to the same revision to roll back")
    if target == "base" and not yes:
        raise ConfigError("downgrade --to base removes every migrated object: add --yes to confirm")
    _migrate(run, target, downgrade=True)


def _migrate(run: Run, target: str, downgrade: bool) -> None:
    cfg, script = _load(run)
    if target in ("head", "heads"):
        revisions.single_head(script)
    # 1. wait, then the fast path: nothing to do means no lock, no backup
    state = _ready_state(run, cfg, script)
    goal = _plan(run, script, state, target, downgrade)
    if set(state.heads) == set(goal):
        return _nothing_to_do(run, state)
    # 2. the lock, then look again: another copy may have migrated meanwhile
    from runner.migrate import apply_steps  # off the no-op fast path, like the lock

    with _locked(run, cfg, script, state, goal) as state:
        revisions.check_known(script, state.heads)
        if set(state.heads) == set(goal):
            return _nothing_to_do(run, state)
        _check_direction(script, state.heads, goal, downgrade)
        # 3. migrate, one transaction per revision
        plan = revisions.steps(script, state.heads, goal, downgrade)
        run.summary["pending"] = [rev for rev, _ in plan]
        ledger.preflight(run, downgrade)  # an edited applied revision: exit 7; the ledger row starts
        if plan:  # 3a. backup first: fail closed, nothing is migrated without one
            _backup_before(run, state)
        with run.timed("migrate"):
            apply_steps(run, cfg, script, plan, downgrade)
        # 4. verify
        with db.connect(run, "verify") as conn:
            after = revisions.read_state(cfg, script, conn).heads
    if set(after) != set(goal):
        raise MigrationFailed(f"after migrating the database is at {fmt(after)}, expected "
                              f"{fmt(goal)}: check env.py's run_migrations for skipped revisions")
    run.summary.update(to=fmt(after), outcome="downgraded" if downgrade else "migrated")


def status(run: Run, check: bool = False, out: IO[str] | None = None) -> None:
    """Print current revision(s), heads and pending revisions; with check, fail when pending."""
    out = out or sys.stdout
    cfg, script = _load(run)
    state = _ready_state(run, cfg, script)
    heads = tuple(script.get_heads())
    unknown = [h for h in state.heads if h not in revisions.ancestors(script, heads)]
    pending = [] if unknown else [s.revision for s in reversed(list(
        script.iterate_revisions(heads if len(heads) > 1 else heads[0], state.heads or "base")))]
    print(f"database: {run.settings.safe_target}", file=out)
    print(f"current:  {fmt(state.heads)}", file=out)
    print(f"head:     {fmt(heads)}", file=out)
    print(f"pending:  {', '.join(pending) if pending else 'none'}", file=out)
    if unknown:
        print(f"unknown:  {', '.join(unknown)} (not in these scripts: the image is older than "
              "the database)", file=out)
    ledger.print_last_run(run, state, out)  # "last run: ..." from the ledger, when there is one
    run.summary.update({"from": fmt(state.heads), "to": fmt(state.heads), "head": fmt(heads),
                        "pending": pending})
    if check and (pending or unknown or set(state.heads) != set(heads)):
        raise Pending(f"database is at {fmt(state.heads)}, not at head {fmt(heads)}: "
                      f"{len(pending)} revision(s) pending")
    run.summary["outcome"] = "at head" if set(state.heads) == set(heads) else "behind head"


def wait(run: Run, until_head: bool = False) -> None:
    """Wait until the database is ready; with until_head, until it is at the scripts' head too."""
    if until_head:  # init containers: read-only polling, no lock, no migration
        from runner.headwait import wait_for_head

        cfg, script = _load(run)
        return wait_for_head(run, cfg, script)
    wait_until_ready(run).close()
    run.summary["outcome"] = "ready"


def plan(run: Run, target: str = "head", out: IO[str] | None = None, scratch: bool = False) -> None:
    """Print the SQL that upgrade would run (Alembic offline mode) for the pending range."""
    if scratch:
        from runner import verify

        return verify.plan_scratch(run, target, out or sys.stdout)
    cfg, script = _load(run)
    state = _ready_state(run, cfg, script)
    goal = _plan(run, script, state, target, downgrade=False)
    if set(state.heads) == set(goal):
        print("-- nothing to do: the database is at the target", file=out or sys.stdout)
    else:
        (out or sys.stdout).write(revisions.offline_sql(cfg, state.heads, ":".join(goal)))
    run.summary.update(outcome="planned")


def backup(run: Run) -> None:
    """Back the database up to BACKUP_S3_URI, under the migration lock (no migration waits on it)."""
    from runner.backup.take import take

    cfg, script = _load(run)
    with _locked(run, cfg, script, _ready_state(run, cfg, script)) as state:
        with run.timed("backup"):
            manifest = take(run, state)
    run.summary.update(backup=manifest["key"], revision=fmt(state.heads), outcome="backed up")


def backups(run: Run, out: IO[str] | None = None, from_database: str | None = None,
            all_databases: bool = False) -> None:
    """List committed backups, newest first: this database's, another's (from_database) or those
    of every database under the prefix (all_databases)."""
    from runner.backup import s3
    from runner.backup.manifest import newest

    if all_databases and from_database:
        raise ConfigError("--all-databases and --from-database exclude each other: pick one")
    out = out or sys.stdout
    loc, client = s3.Location.parse(run.settings.backup_s3_uri), s3.client(run.settings, run.cancel)
    names = (s3.databases(run, client, loc) if all_databases
             else [from_database or run.settings.database_url.database or ""])
    found = newest([m for name in names for m in s3.backups(run, client, loc, name)])
    print(f"{'key':<60} {'created':<25} {'size':>12} {'revision':<14} {'database':<20} server", file=out)
    for m in found:
        print(f"{m['key']:<60} {m['created']:<25} {m['size']:>12} {fmt(m['alembic_revision']):<14} "
              f"{m['database']:<20} {m.get('system_identifier') or '-'}", file=out)
    run.summary.update(backups=len(found), outcome="listed")


def restore(run: Run, which: str, yes: bool = False, from_database: str | None = None) -> None:
    """Replace the database's contents with a backup in one transaction, under the migration lock:
    KEY, or the newest backup of this database (or of from_database) for 'latest'."""
    from runner.backup import s3
    from runner.backup.restore import check_compatible, inspect_target, replay, resolve_backup

    if not yes:
        raise ConfigError("restore replaces every schema in the database with the backup's: "
                          "add --yes to confirm")
    if from_database and which != "latest":
        raise ConfigError("--from-database goes with --backup latest: a KEY names its database already")
    cfg, script = _load(run)
    client, loc = s3.client(run.settings, run.cancel), s3.Location.parse(run.settings.backup_s3_uri)
    with _locked(run, cfg, script, _ready_state(run, cfg, script)) as state:
        target = inspect_target(run)
        manifest = resolve_backup(run, client, loc, target, which, from_database)
        tools = check_compatible(run, client, loc, manifest, target)
        run.log("restore.begin", f"restoring {manifest['key']} in one transaction",
                source=manifest["database"], server_version=manifest["server_version"],
                revision=fmt(manifest["alembic_revision"]), size=manifest["size"])
        with run.timed("restore"):
            replay(run, client, loc, manifest, target, tools)
        with db.connect(run, "verify") as conn:
            after = revisions.read_state(cfg, script, conn).heads
    run.summary.update({"backup": manifest["key"], "from": fmt(state.heads), "to": fmt(after),
                        "outcome": "restored"})


def _backup_before(run: Run, state: DbState) -> None:
    if run.settings.backup_mode == "off":
        run.log.warning("backup.skipped", "BACKUP_MODE=off: migrating without a backup")
        return
    from runner.backup.take import take  # boto3 loads only when a backup is taken

    with run.timed("backup"):
        run.summary["backup"] = take(run, state)["key"]


def _ready_state(run: Run, cfg: Config, script: ScriptDirectory) -> DbState:
    """Wait until the database is ready (exit 3 at the deadline), then read its revisions."""
    with wait_until_ready(run) as conn:
        return revisions.read_state(cfg, script, conn)


@contextlib.contextmanager
def _locked(run: Run, cfg: Config, script: ScriptDirectory, seen: DbState,
            goal: tuple[str, ...] | None = None) -> Iterator[DbState]:
    """Hold the migration lock for the version table seen; yield the state read again under it
    (another copy may have changed the database while we waited).

    With goal, a waiter reads the version table on every poll and stops waiting once the database
    is there: it yields that state without taking the lock (read-only; nothing left to do).
    """
    from runner.lock import migration_lock  # off the no-op fast path

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


def _load(run: Run) -> tuple[Config, ScriptDirectory]:
    cfg = revisions.alembic_config(run.settings)
    if run.tenant is not None:  # fleet schema mode, as Alembic's cookbook: `alembic -x tenant=...`
        cfg.cmd_opts = argparse.Namespace(x=[f"tenant={run.tenant}"])
        cfg.attributes["tenant"] = run.tenant
    revisions.route_logging(run.log)
    return cfg, revisions.load_scripts(cfg)


def _plan(run: Run, script: ScriptDirectory, state: DbState, target: str,
          downgrade: bool) -> tuple[str, ...]:
    """Refuse what must not run; return the resolved target revisions."""
    revisions.check_known(script, state.heads)
    goal = revisions.resolve(script, target, state.heads)
    _check_direction(script, state.heads, goal, downgrade)
    run.summary.update({"from": fmt(state.heads), "target": fmt(goal)})
    return goal


def _check_direction(script: ScriptDirectory, current: tuple[str, ...], goal: tuple[str, ...],
                     downgrade: bool) -> None:
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


def _nothing_to_do(run: Run, state: DbState) -> None:
    run.log("migrate.noop", f"database already at {fmt(state.heads)}: nothing to do")
    run.summary.update(to=fmt(state.heads), outcome="nothing to do", applied=[])
