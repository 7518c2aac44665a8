"""Wait until the database is at the image's head: the init-container mode (`wait --until-head`).

"At head" means every pre-deploy revision is applied: post-deploy revisions (runner.phases) run
after the rollout of the very pods that wait here, so they are never waited for.

Init containers run in every replica on every restart, so this mode only reads: it polls the
revision env.py reports (like `alembic current`), never migrates and never takes the migration
lock. A database stamped with a revision this image does not contain is taken as newer than the
image (a later release has migrated it; with expand/contract migrations older code still works
against it), so an older pod restarting during a rollout or a rollback is not held back.
"""

from __future__ import annotations

from typing import NoReturn

import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory

from runner import db, phases, revisions
from runner.context import Run
from runner.errors import Pending
from runner.wait.ready import reason, wait_until_ready


def wait_for_head(run: Run, cfg: Config, script: ScriptDirectory) -> None:
    """Poll until the database is at the scripts' head (post-deploy revisions aside) or ahead of
    it; exit 10 at the deadline."""
    head = revisions.single_head(script)
    limit, capped = run.limit(run.settings.head_wait_timeout)
    deadline = run.clock() + limit
    run.summary["head"] = head
    with run.timed("head_wait"):
        with wait_until_ready(run) as conn:  # the first look waits for the server (exit 3)
            current: tuple[str, ...] | None = revisions.read_state(cfg, script, conn).heads
        polls = 1
        while current is None or not _arrived(run, script, head, current, polls):
            left = deadline - run.clock()
            if left <= 0:
                _give_up(run, capped, limit, head, current)
            run.cancel.sleep(min(run.settings.head_poll_interval, left))
            current, polls = _look(run, cfg, script), polls + 1


def _give_up(run: Run, capped: bool, limit: float, head: str, current: tuple[str, ...] | None) -> NoReturn:
    """Raise at the deadline: exit 10 (not at head), or 9 when RUN_DEADLINE came first."""
    run.stop_if_deadline(capped)
    raise Pending(f"database {run.settings.safe_target} is still at {_fmt(current)} after "
                  f"{limit:g}s, not at this image's head {head}: check that the migration Job "
                  "(python -m runner upgrade) ran and succeeded, or raise HEAD_WAIT_TIMEOUT")


def _look(run: Run, cfg: Config, script: ScriptDirectory) -> tuple[str, ...] | None:
    """Read the stamped revisions once; None (logged) when the server does not answer."""
    try:
        with db.connect(run, "wait") as conn:
            return revisions.read_state(cfg, script, conn).heads
    except sa.exc.DBAPIError as exc:  # a restart or failover mid-wait: keep polling to the deadline
        run.log.warning("head.unreachable", f"cannot read the revision: {reason(exc)}")
        return None


def _arrived(run: Run, script: ScriptDirectory, head: str, current: tuple[str, ...],
             polls: int) -> bool:
    """Log where the database stands against head; return True when the app may start: at head,
    ahead of it, or with every pre-deploy revision applied (post-deploy ones run after the
    rollout, which this pod is part of: waiting for them would wait forever)."""
    run.summary.update(current=_fmt(current), polls=polls)
    below_head = revisions.ancestors(script, (head,))
    if current == (head,):
        run.log("head.reached", f"database is at head {head}", current=head, head=head, polls=polls)
        run.summary["outcome"] = "at head"
        return True
    if any(rev not in below_head for rev in current):
        run.log.warning("head.ahead", f"database is at {_fmt(current)}, which this image does not "
                        f"contain: taking it as newer than head {head} and going on",
                        current=_fmt(current), head=head, polls=polls)
        run.summary["outcome"] = "ahead of head"
        return True
    todo = phases.pending(script, current, (head,))
    later = f" (and {len(todo.post)} post-deploy, which run after the rollout)" if todo.post else ""
    if not todo.pre:
        run.log("head.pre_deploy", f"database at {_fmt(current)} has every pre-deploy revision of "
                f"head {head}{later}: the application may start", current=_fmt(current), head=head,
                post_deploy=",".join(todo.post), polls=polls)
        run.summary["outcome"] = "pre-deploy applied"
        return True
    run.log("head.wait", f"database at {_fmt(current)}, image head {head}: {len(todo.pre)} revision(s) "
            f"pending{later}; checking again in {run.settings.head_poll_interval:g}s",
            current=_fmt(current), head=head, pending=len(todo.pre), poll=polls)
    run.summary["outcome"] = "behind head"
    return False


def _fmt(revs: tuple[str, ...] | None) -> str:
    return "unknown (database unreachable)" if revs is None else revisions.fmt(revs)
