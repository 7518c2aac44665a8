"""One function per command, each readable top to bottom (after Alembic's command.py).

Each takes (run, parsed arguments) and is named in runner.registry; the steps they share (load,
wait until ready, lock, plan) are runner.flow's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import IO, Any

import sqlalchemy as sa
from alembic.script import ScriptDirectory

from runner import db, ledger, phases, revisions
from runner.backup.layout import is_point
from runner.context import Run
from runner.errors import ConfigError, MigrationFailed, Pending
from runner.flow import check_direction, load, locked, ready_state
from runner.flow import plan as resolve_target
from runner.revisions import DbState, fmt
from runner.wait.ready import wait_until_ready


def upgrade(run: Run, args: argparse.Namespace) -> None:
    """Bring the database up to --to (default head), under the lock."""
    _migrate(run, args.to, downgrade=False)


def downgrade(run: Run, args: argparse.Namespace) -> None:
    """Take the database back to --to: a revision id, -N, or base (with --yes).

    --confirm, when given, must repeat --to: a rollback Job carries both, so a stale or missing
    confirmation refuses (exit 2) instead of rolling back to a revision nobody re-checked.
    """
    check_downgrade(args.to, args.yes, args.confirm)
    _migrate(run, args.to, downgrade=True)


def check_downgrade(target: str, yes: bool, confirm: str | None) -> None:
    """Refuse (exit 2) an unconfirmed downgrade, or one to base without yes."""
    if confirm is not None and confirm != target:
        raise ConfigError(f"downgrade --to {target!r} is not confirmed (--confirm {confirm!r}): "
                          "set the confirmation to the same revision to roll back")
    if target == "base" and not yes:
        raise ConfigError("downgrade --to base removes every migrated object: add --yes to confirm")


def _migrate(run: Run, target: str, downgrade: bool) -> None:
    cfg, script = load(run)
    if target in ("head", "heads"):
        revisions.single_head(script)
    phase = phases.ALL if downgrade else run.settings.deploy_phase
    if not downgrade:
        run.summary["phase"] = phase
    # 1. wait, then the fast path: nothing to do means no lock, no backup
    state = ready_state(run, cfg, script)
    wanted = resolve_target(run, script, state, target, downgrade)
    goal = phases.goal(script, state.heads, wanted, phase)  # a broken phase order: exit 7 here
    if set(state.heads) == set(goal):
        _note_other_phase(run, script, state, wanted, phase)
        return _nothing_to_do(run, script, state, downgrade)
    # 2. the lock, then look again: another copy may have migrated meanwhile
    from runner.migrate.apply import apply_steps  # off the no-op fast path, like the lock

    with locked(run, cfg, script, state, goal) as state:
        revisions.check_known(script, state.heads)
        goal = phases.goal(script, state.heads, wanted, phase)
        if set(state.heads) == set(goal):
            return _nothing_to_do(run, script, state, downgrade)
        check_direction(script, state.heads, wanted, downgrade)
        # 3. migrate, one transaction per revision (the phase's revisions only)
        plan, guard = _steps(run, script, state, wanted, phase, downgrade)
        run.summary["pending"] = [rev for rev, _ in plan]
        ledger.preflight(run, downgrade)  # an edited applied revision: exit 7; the ledger row starts
        if plan:  # 3a. backup first: fail closed, nothing is migrated without one
            _backup_before(run, state)
        with run.timed("migrate"):
            apply_steps(run, cfg, script, plan, downgrade, before_step=guard)
        # 4. verify
        with db.connect(run, "verify") as conn:
            after = revisions.read_state(cfg, script, conn).heads
    if set(after) != set(goal):
        raise MigrationFailed(f"after migrating the database is at {fmt(after)}, expected "
                              f"{fmt(goal)}: check env.py's run_migrations for skipped revisions")
    run.summary.update(to=fmt(after), outcome="downgraded" if downgrade else "migrated")
    _note_other_phase(run, script, dataclasses.replace(state, heads=after), wanted, phase)


def _steps(run: Run, script: ScriptDirectory, state: DbState, wanted: tuple[str, ...], phase: str,
           downgrade: bool) -> tuple[list[tuple[str, str]], phases.Guard | None]:
    """The steps to run and the check before each (post-deploy revisions: no unfinished backfill)."""
    if downgrade:
        return revisions.steps(script, state.heads, wanted, True), None

    def backfills() -> list[dict[str, Any]]:
        with db.connect(run, "inspect") as conn:
            return phases.unfinished_backfills(conn, state.version_schema)

    return phases.plan(script, state.heads, wanted, phase, backfills)


def _note_other_phase(run: Run, script: ScriptDirectory, state: DbState, wanted: tuple[str, ...],
                      phase: str) -> None:
    """Say which revisions this phase left to the other one (pre-deploy: the post-deploy ones)."""
    other, left = phases.left_for_later(script, state.heads, wanted, phase)
    if left:
        when = "after the rollout" if other == phases.POST else "(the Job before the rollout)"
        run.log("migrate.phase", f"{phase}: {len(left)} {other} revision(s) left pending "
                f"({', '.join(left)}): the {other} phase applies them {when}", phase=phase,
                left=",".join(left))


def status(run: Run, args: argparse.Namespace, out: IO[str] | None = None) -> None:
    """Print current revision(s), heads, pending revisions per phase and the backfills; with
    --check, fail when the phase (DEPLOY_PHASE / --phase) has revisions pending."""
    out = out or sys.stdout
    cfg, script = load(run)
    with wait_until_ready(run) as conn:
        state = revisions.read_state(cfg, script, conn)
        try:
            backfills = phases.backfills(conn, state.version_schema)
        except sa.exc.DBAPIError as exc:  # status reports the revisions; the backfills are extra
            from runner.db import db_message

            run.log.warning("status.backfills", f"cannot read the backfills ({db_message(exc)})")
            backfills = []
    heads = tuple(script.get_heads())
    unknown = [h for h in state.heads if h not in revisions.ancestors(script, heads)]
    todo = None if unknown else phases.pending(script, state.heads, heads)
    pending = list(todo.order) if todo else []
    print(f"database: {run.settings.safe_target}", file=out)
    print(f"current:  {fmt(state.heads)}", file=out)
    print(f"head:     {fmt(heads)}", file=out)
    print(f"pending:  {', '.join(pending) if pending else 'none'}", file=out)
    if todo and pending:
        for line in phases.pending_lines(todo):
            print(line, file=out)
    if unknown:
        print(f"unknown:  {', '.join(unknown)} (not in these scripts: the image is older than "
              "the database)", file=out)
    for line in phases.backfill_lines(backfills):
        print(line, file=out)
    ledger.print_last_run(run, state, out)  # "last run: ..." from the ledger, when there is one
    phase = run.settings.deploy_phase
    due = pending if phase == phases.ALL or todo is None else (
        todo.pre if phase == phases.PRE else todo.post)
    run.summary.update({"from": fmt(state.heads), "to": fmt(state.heads), "head": fmt(heads),
                        "pending": pending, "phase": phase})
    if todo:
        run.summary.update(pending_pre_deploy=todo.pre, pending_post_deploy=todo.post)
    if backfills:
        run.summary["backfills"] = {b["name"]: b["state"] for b in backfills}
    behind = set(state.heads) != set(heads)
    if args.check and (due or unknown or (behind and phase == phases.ALL)):
        which = "" if phase == phases.ALL else f"{phase} "
        raise Pending(f"database is at {fmt(state.heads)}, not at head {fmt(heads)}: "
                      f"{len(due)} {which}revision(s) pending")
    run.summary["outcome"] = "at head" if not behind else "behind head"


def wait(run: Run, args: argparse.Namespace) -> None:
    """Wait until the database is ready; with --until-head, until it is at the scripts' head too."""
    if args.until_head:  # init containers: read-only polling, no lock, no migration
        from runner.wait.head import wait_for_head

        cfg, script = load(run)
        return wait_for_head(run, cfg, script)
    wait_until_ready(run).close()
    run.summary["outcome"] = "ready"


def plan(run: Run, args: argparse.Namespace) -> None:
    """Print the SQL that upgrade would run (Alembic offline mode) for the pending range."""
    if args.scratch:
        from runner import verify

        return verify.plan_scratch(run, args.to, sys.stdout)
    cfg, script = load(run)
    state = ready_state(run, cfg, script)
    goal = resolve_target(run, script, state, args.to, downgrade=False)
    if set(state.heads) == set(goal):
        print("-- nothing to do: the database is at the target", file=sys.stdout)
    else:
        sys.stdout.write(revisions.offline_sql(cfg, state.heads, ":".join(goal)))
    run.summary.update(outcome="planned")


def backup(run: Run, args: argparse.Namespace) -> None:
    """Back the database up to BACKUP_S3_URI, under the migration lock (no migration waits on it)."""
    if run.settings.database_url.is_sqlite:  # a consistent copy of the file (SQLite's backup API)
        from runner.sqlite.backup import take
    else:
        from runner.backup.take import take

    cfg, script = load(run)
    with locked(run, cfg, script, ready_state(run, cfg, script)) as state:
        with run.timed("backup"):
            manifest = take(run, state)
    run.summary.update(backup=manifest["key"], revision=fmt(state.heads), outcome="backed up")


def backups(run: Run, args: argparse.Namespace) -> None:
    """List committed backups, newest first: this database's, another's (--from-database) or
    those of every database under the prefix (--all-databases)."""
    from runner.backup import s3
    from runner.backup.manifest import newest

    all_databases, from_database = args.all_databases, args.from_database
    if all_databases and from_database:
        raise ConfigError("--all-databases and --from-database exclude each other: pick one")
    out = sys.stdout
    loc, client = s3.Location.parse(run.settings.backup_s3_uri), s3.client(run.settings, run.cancel)
    names = (s3.databases(run, client, loc) if all_databases
             else [from_database or run.settings.database_url.name or ""])
    found = newest([m for name in names for m in s3.backups(run, client, loc, name)])
    print(f"{'key':<60} {'kind':<6} {'created':<25} {'size':>12} {'revision':<14} {'database':<20} "
          "server", file=out)
    for m in found:  # a restore point: no size; its revision is the one before the migration
        created = m["created"][:19] + m["created"][-6:]
        print(f"{m['key']:<60} {'dump' if 'size' in m else 'point':<6} {created:<25} "
              f"{m.get('size', '-'):>12} {fmt(m['alembic_revision']):<14} {m['database']:<20} "
              f"{m.get('system_identifier') or '-'}", file=out)
    run.summary.update(backups=len(found), outcome="listed")


def restore(run: Run, args: argparse.Namespace) -> None:
    """Replace the database's contents with a backup in one transaction, under the migration lock:
    KEY, or the newest backup of this database (or of --from-database) for 'latest'."""
    from runner.backup import parallel, s3
    from runner.backup.manifest import check_target_format
    from runner.backup.restore import check_compatible, inspect_target, replay, resolve_backup
    from runner.sqlite import restore as sqlite_restore

    which, from_database = args.backup, args.from_database
    sqlite = run.settings.database_url.is_sqlite  # a SQLite file: runner.sqlite.restore
    if sqlite and is_point(which):
        raise ConfigError(f"--backup {which} is a restore point (PostgreSQL's WAL archive): a SQLite "
                          "database has none; pick a backup from 'python -m runner backups'")
    if is_point(which):  # a restore point: print how to recover to it, restore nothing
        from runner.backup.point import show

        return show(run, which, sys.stdout)
    if not args.yes:
        raise ConfigError("restore replaces every schema in the database with the backup's: "
                          "add --yes to confirm")
    if from_database and which != "latest":
        raise ConfigError("--from-database goes with --backup latest: a KEY names its database already")
    cfg, script = load(run)
    client, loc = s3.client(run.settings, run.cancel), s3.Location.parse(run.settings.backup_s3_uri)
    with locked(run, cfg, script, ready_state(run, cfg, script)) as state:
        target = sqlite_restore.target(run) if sqlite else inspect_target(run)
        manifest = resolve_backup(run, client, loc, target, which, from_database,
                                  args.from_other_database)
        check_target_format(manifest, sqlite)  # a pg_dump into SQLite, or the reverse: exit 2
        if sqlite:
            with run.timed("restore"):
                sqlite_restore.restore(run, client, loc, manifest)
            return _restored(run, cfg, script, state, manifest)
        tools = check_compatible(run, client, loc, manifest, target)
        jobs = parallel.jobs_for(run, manifest, target)  # 1: streamed, in one transaction
        run.log("restore.begin", f"restoring {manifest['key']}" + (
                " in one transaction" if jobs == 1 else f" with {jobs} jobs into a new database"),
                source=manifest["database"], server_version=manifest["server_version"],
                revision=fmt(manifest["alembic_revision"]), size=manifest["size"], jobs=jobs)
        with run.timed("restore"):
            if jobs > 1:
                parallel.restore(run, client, loc, manifest, target, tools, jobs)
            else:
                replay(run, client, loc, manifest, target, tools)
        _restored(run, cfg, script, state, manifest)


def _restored(run: Run, cfg: Any, script: ScriptDirectory, state: DbState,
              manifest: dict[str, Any]) -> None:
    """Read the revision the restore left (still under the lock) and report it."""
    with db.connect(run, "verify") as conn:
        after = revisions.read_state(cfg, script, conn).heads
    run.summary.update({"backup": manifest["key"], "from": fmt(state.heads), "to": fmt(after),
                        "outcome": "restored"})


def _backup_before(run: Run, state: DbState) -> None:
    from runner.backup.modes import before_migrating  # a dump, a restore point, both or nothing

    before_migrating(run, state)


def _nothing_to_do(run: Run, script: ScriptDirectory, state: DbState, downgrade: bool) -> None:
    if not downgrade:  # an edited applied revision refuses a no-op too (exit 7), read-only
        ledger.check_noop(run, script, state)
    run.log("migrate.noop", f"database already at {fmt(state.heads)}: nothing to do")
    run.summary.update(to=fmt(state.heads), outcome="nothing to do", applied=[])
