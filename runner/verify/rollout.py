"""What breaks while a release rolls out: the deploy phases (runner.phases), checked in CI.

During a rollout the previous release's code still runs next to the new one. A revision that
drops what the previous release reads belongs in a post-deploy revision (`runner_phase =
"post-deploy"`), which runs once every pod runs the new code:

- a contract operation (rename_column_contract, alter_column_type_contract, drop_column_online)
  in a pre-deploy revision's upgrade is an error (check `phase`);
- so is dropping the old column of an expand any other way (op.drop_column): pre-deploy, the
  previous release still uses it; in any phase, a drop that leaves the expand's sync trigger makes
  every later INSERT and UPDATE of the table fail (the trigger still writes the old column).

And the order runner.phases refuses at run time (exit 7), caught here first: a pre-deploy revision
that descends from a post-deploy one cannot run before the rollout, so the two cannot ship in one
release (a warning: which revisions ship together is not in the scripts). Pending from the live
database's revision with --against, from --from's parents, else from base.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from alembic.script import ScriptDirectory

from runner import phases
from runner.errors import PreflightRefused
from runner.verify.instead import POST_DEPLOY, Change
from runner.verify.lint import RevisionSql
from runner.verify.report import ERROR, WARN, Finding, relative

CONTRACT = ("rename_column_contract", "alter_column_type_contract", "drop_column_online")


def contract_findings(ran: Sequence[RevisionSql], changes: Mapping[str, Sequence[Change]]) -> list[Finding]:
    """Contracts in pre-deploy revisions, and old columns dropped past their sync trigger."""
    found: list[Finding] = []
    for rev in ran:
        contracts = [op for op in rev.operations if op.partition("(")[0] in CONTRACT]
        if not rev.post_deploy:
            found += [Finding("phase", ERROR, f"{op} in a pre-deploy revision: it drops a column that the "
                              "previous release, still running during the rollout, reads and writes",
                              rev.revision, rev.file, "contract-before-rollout",
                              instead=f"the same in {POST_DEPLOY}, after the rollout")
                      for op in contracts]
        for change in changes.get(rev.revision, ()):
            if change.kind == "contract-trigger-left":
                found.append(Finding(
                    "phase", ERROR, f"drops the old column of an expand on {change.table} and leaves its "
                    f"sync trigger {change.name}, which still writes that column: every INSERT and UPDATE "
                    f"of {change.table} fails from then on", rev.revision, rev.file, "contract-trigger-left",
                    instead=f"{change.call} in {POST_DEPLOY} (it drops the trigger, its function and "
                    "the column in one transaction)"))
            elif change.kind == "contract" and not rev.post_deploy and not contracts:
                found.append(Finding(
                    "phase", ERROR, f"drops the old column of an expand on {change.table} (sync trigger "
                    f"{change.name}) in a pre-deploy revision: the previous release, still running during "
                    "the rollout, reads and writes it", rev.revision, rev.file, "contract-before-rollout",
                    instead=f"{change.call} in {POST_DEPLOY}"))
    return found


def order_findings(script: ScriptDirectory, applied: tuple[str, ...], live: bool) -> list[Finding]:
    """Pre-deploy revisions pending after a pending post-deploy one (runner.phases refuses them);
    applied: the heads taken as applied (the live database's, or --from's parents; () for base)."""
    try:
        todo = phases.pending(script, applied, tuple(script.get_heads()))
    except PreflightRefused:  # a malformed runner_phase: a chain error already
        return []
    found = []
    for rev, posts in todo.blocked().items():
        after = ", ".join(posts)
        when = (f"the live database has not run {after}: the next pre-deploy Job refuses {rev} (exit 7) "
                "until the post-deploy phase has run it" if live else
                f"the pre-deploy Job refuses {rev} (exit 7) while {after} has not run, so the two cannot "
                "ship in one release")
        scope = "" if live else (" (verify --against production's database, or --from the release's "
                                 "first revision, checks only what is pending)")
        found.append(Finding(
            "chain", WARN, f"pre-deploy revision {rev} descends from post-deploy revision(s) {after}: "
            f"{when}; re-parent {rev} (its down_revision) onto a pre-deploy revision, mark it post-deploy, "
            f"or ship it in a release after {posts[-1]}'s{scope}",
            rev, relative(getattr(script.get_revision(rev), "path", None)), "phase-order"))
    return found
