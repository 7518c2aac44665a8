"""Deploy phases: pre-deploy revisions run before the rollout, post-deploy ones after it.

A revision is post-deploy when its module sets `runner_phase = "post-deploy"`: the contract half
of expand/contract (drop the old column, remove a sync trigger, validate), which must wait until
every application pod runs the new code. Every other revision is pre-deploy. `upgrade` in phase
`pre-deploy` (the Job before the rollout) applies the pending pre-deploy revisions, `post-deploy`
(the Job after it) the pending post-deploy ones, `all` (development) everything in order.

The order is never broken, and refusals (exit 7) come before anything changes: a pending
pre-deploy revision that descends from a pending post-deploy one cannot run before the rollout;
a post-deploy revision never runs before the pre-deploy revisions it descends from, nor while a
backfill (runner.online.state) is unfinished. Branches and merges follow Alembic's revision map:
"descends from" is the ancestor relation. docs/design.md, "Deploy phases".
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from runner import revisions
from runner.errors import PreflightRefused

ALL, PRE, POST = "all", "pre-deploy", "post-deploy"
ATTRIBUTE = "runner_phase"


def phase_of(script: ScriptDirectory, rev: str) -> str:
    """Return the revision's phase; a value other than the two phases refuses (exit 7)."""
    found = script.get_revision(rev)
    value = getattr(getattr(found, "module", None), ATTRIBUTE, PRE)
    if value not in (PRE, POST):
        where = os.path.relpath(found.path) if found is not None else rev
        raise PreflightRefused(f"revision {rev} ({where}) sets {ATTRIBUTE} = {value!r}: use "
                               f"{POST!r}, or {PRE!r} (the default)")
    return str(value)


@dataclasses.dataclass(frozen=True)
class Pending:
    """The revisions between the database and a target, parents first, with their phases."""

    order: tuple[str, ...]
    phases: dict[str, str]
    below: dict[str, frozenset[str]]  # pending revision -> its pending ancestors

    @property
    def pre(self) -> list[str]:
        return [r for r in self.order if self.phases[r] == PRE]

    @property
    def post(self) -> list[str]:
        return [r for r in self.order if self.phases[r] == POST]

    def blocked(self) -> dict[str, list[str]]:
        """Pending pre-deploy revisions -> the pending post-deploy revisions they descend from."""
        return self._depending(PRE, POST)

    def needs(self) -> dict[str, list[str]]:
        """Pending post-deploy revisions -> the pending pre-deploy revisions they descend from."""
        return self._depending(POST, PRE)

    def _depending(self, phase: str, on: str) -> dict[str, list[str]]:
        found = {r: {a for a in self.below[r] if self.phases[a] == on}
                 for r in self.order if self.phases[r] == phase}
        return {r: [a for a in self.order if a in ancestors] for r, ancestors in found.items() if ancestors}


def pending(script: ScriptDirectory, current: tuple[str, ...], goal: tuple[str, ...]) -> Pending:
    """Return what upgrading from current to goal would apply (revisions the scripts contain)."""
    applied = revisions.ancestors(script, current)
    todo = revisions.ancestors(script, goal) - applied
    order = tuple(r for r in _base_first(script) if r in todo)
    below: dict[str, frozenset[str]] = {}
    for r in order:  # parents first: a revision's pending ancestors are its parents' and theirs
        below[r] = frozenset().union(*(below[p] | {p} for p in _parents(script, r) if p in todo))
    return Pending(order, {r: phase_of(script, r) for r in order}, below)


def select(pending: Pending, phase: str) -> list[str]:
    """Return the revisions the phase applies, parents first; refuse (exit 7) a broken order."""
    if phase == ALL:
        return list(pending.order)
    if phase == PRE:
        blocked = pending.blocked()
        if blocked:
            raise PreflightRefused(_blocked_message(blocked))
        return pending.pre
    needs = pending.needs()
    if needs:
        raise PreflightRefused(_needs_message(needs, [r for r in pending.post if r not in needs]))
    return pending.post


def heads_after(script: ScriptDirectory, current: tuple[str, ...], applied: list[str]) -> tuple[str, ...]:
    """Return the revisions the version table holds once applied ran on top of current."""
    have = revisions.ancestors(script, current) | set(applied)
    below = {p for r in have for p in _parents(script, r)}
    return tuple(sorted(have - below))


def unfinished_backfills(conn: Connection, schema: str | None) -> list[dict[str, Any]]:
    """Backfills started and not done (the state table next to the version table)."""
    from runner.online import state

    return state.unfinished(conn, schema)


def check_backfills(backfills: list[dict[str, Any]], post: list[str], resumed: set[str]) -> None:
    """Refuse (exit 7) to run post-deploy revisions while a backfill is unfinished, unless its
    revision is pending earlier in this same run (rerunning it resumes the backfill; the step
    guard checks again right before each post-deploy revision)."""
    stuck = [b for b in backfills if b.get("revision") not in resumed]
    if post and stuck:
        raise PreflightRefused(backfill_message(post, stuck))


def step_guard(script: ScriptDirectory, read: Callable[[], list[dict[str, Any]]]) -> Callable[[str], None]:
    """Return a check for runner.migrate.apply: right before a post-deploy revision runs, no backfill
    may be unfinished (one a pre-deploy revision of this run left behind, say)."""

    def check(revision: str) -> None:
        if revisions.lookup(script, revision) is None or phase_of(script, revision) != POST:
            return  # a grouped step of a branched chain: checked before the run
        stuck = read()
        if stuck:  # earlier revisions of this run are applied: the database stays at the last one
            raise PreflightRefused(backfill_message([revision], stuck, "the database stays at the "
                                                    "last revision applied"))

    return check


def backfill_message(post: list[str], stuck: list[dict[str, Any]],
                     outcome: str = "nothing was changed") -> str:
    names = "; ".join(f"{b['name']} (revision {b.get('revision') or 'unknown'}, {b['state']}, "
                      f"{b.get('rows_done') or 0} rows done)" for b in stuck)
    return (f"post-deploy revision(s) {', '.join(post)} must not run while a backfill is "
            f"unfinished: {names}. Finish it first: rerun the pre-deploy phase ('upgrade --phase "
            f"pre-deploy'), which resumes a backfill from its checkpoint, then the post-deploy "
            f"phase; {outcome}")


def _blocked_message(blocked: dict[str, list[str]]) -> str:
    pairs = "; ".join(f"{r} descends from {', '.join(p)}" for r, p in blocked.items())
    first = next(iter(blocked.values()))[-1]
    return (f"pre-deploy revision(s) {', '.join(blocked)} cannot run before the rollout: they "
            f"descend from post-deploy revision(s) that have not run ({pairs}). Run the post-deploy "
            f"phase first (the previous release's post-deploy Job, or 'upgrade --phase post-deploy "
            f"--to {first}'), or re-parent the pre-deploy revision (its down_revision) onto a "
            "revision that is not post-deploy; nothing was changed")


def _needs_message(needs: dict[str, list[str]], ready: list[str]) -> str:
    pairs = "; ".join(f"{r} needs {', '.join(p)}" for r, p in needs.items())
    now = (f" ({', '.join(ready)} can run now: 'upgrade --phase post-deploy --to {ready[-1]}')"
           if ready else "")
    return (f"post-deploy revision(s) {', '.join(needs)} depend on pre-deploy revision(s) that have "
            f"not run ({pairs}): run the pre-deploy phase ('upgrade --phase pre-deploy', the Job "
            f"before the rollout) and roll the application out first{now}; nothing was changed")


def pre_deploy_done_at(script: ScriptDirectory, head: str) -> dict[str, list[str]]:
    """The single revisions, other than head, at which every pre-deploy revision of head is
    applied, each with the post-deploy revisions still pending there (parents first): where
    `wait --until-head` lets the application start. Empty unless head itself is post-deploy."""
    if phase_of(script, head) != POST:
        return {}
    post = [r for r in revisions.ancestors(script, (head,)) if phase_of(script, r) == POST]
    # only post-deploy revisions lie between a qualifying revision and head: it is the parent
    # of one of them
    candidates = {p for r in post for p in _parents(script, r)}
    found: dict[str, list[str]] = {}
    for rev in sorted(candidates):
        todo = pending(script, (rev,), (head,))
        if not todo.pre:
            found[rev] = todo.post
    return found


def _base_first(script: ScriptDirectory) -> list[str]:
    """Every revision, each after all of its ancestors (Alembic walks heads to base)."""
    return [s.revision for s in reversed(list(script.walk_revisions()))]


def _parents(script: ScriptDirectory, rev: str) -> tuple[str, ...]:
    found = script.get_revision(rev)
    down = found.down_revision if found is not None else None
    if down is None:
        return ()
    return (down,) if isinstance(down, str) else tuple(down)


def goal(script: ScriptDirectory, current: tuple[str, ...], wanted: tuple[str, ...],
         phase: str) -> tuple[str, ...]:
    """Return where the phase takes the database on the way to wanted (refusing a broken order)."""
    if phase == ALL:
        return wanted
    chosen = select(pending(script, current, wanted), phase)
    return heads_after(script, current, chosen)


Guard = Callable[[str], None]


def plan(script: ScriptDirectory, current: tuple[str, ...], wanted: tuple[str, ...], phase: str,
         read_backfills: Callable[[], list[dict[str, Any]]]) -> tuple[list[tuple[str, str]], Guard | None]:
    """Return the steps of an upgrade in this phase, and the check to run before each step.

    Phase `all` keeps revisions.steps (one per revision on a linear path); the other phases apply
    their revisions one step each, parents first, which Alembic's revision map supports on
    branches too. The unfinished backfills are read only when a post-deploy revision would run.
    """
    todo = pending(script, current, wanted)
    chosen = select(todo, phase)
    post = [r for r in chosen if todo.phases[r] == POST]
    if post:
        check_backfills(read_backfills(), post, set(todo.pre) if phase == ALL else set())
    steps = (revisions.steps(script, current, wanted, False) if phase == ALL
             else [(r, r) for r in chosen])
    return steps, step_guard(script, read_backfills) if post else None


def left_for_later(script: ScriptDirectory, current: tuple[str, ...], wanted: tuple[str, ...],
                   phase: str) -> tuple[str, list[str]]:
    """Return the other phase and its pending revisions, which this phase leaves alone."""
    if phase == ALL:
        return ALL, []
    todo = pending(script, current, wanted)
    return (POST, todo.post) if phase == PRE else (PRE, todo.pre)


def backfills(conn: Connection, schema: str | None) -> list[dict[str, Any]]:
    """Every backfill in the state table next to the version table ([] when none ever ran)."""
    from runner.online import state

    return state.rows(conn, schema)


def pending_lines(todo: Pending) -> list[str]:
    """status: the pending revisions of each phase, a blocked one with what it waits for."""
    blocked = todo.blocked()
    pre = [f"{r} (after post-deploy {', '.join(blocked[r])})" if r in blocked else r
           for r in todo.pre]
    return [f"  {PRE}:  {', '.join(pre) or 'none'}", f"  {POST}: {', '.join(todo.post) or 'none'}"]


def backfill_lines(rows: list[dict[str, Any]]) -> list[str]:
    """status: one line per backfill, unfinished ones first."""
    if not rows:
        return []
    out = ["backfills:"]
    for b in sorted(rows, key=lambda b: b["state"] == "done"):
        estimate = f" of ~{b['rows_estimate']}" if b.get("rows_estimate") else ""
        when = b.get("finished_at") or b.get("updated_at")
        if isinstance(when, str):  # SQLite keeps CURRENT_TIMESTAMP's text, in UTC
            when = f"{when} UTC"
        elif when:
            when = f"{when:%Y-%m-%d %H:%M:%S %Z}"
        out.append(f"  {b['name']}: {b['state']}, {b.get('rows_done') or 0}{estimate} rows, "
                   f"revision {b.get('revision') or '-'}, {b['relation']}"
                   + (f", last change {when}" if when else ""))
    return out
