"""What a rerun after a crash repeats: the statements a revision runs before its first online
operation.

An online operation (runner.online) enters Alembic's autocommit_block(): what the revision did
before it is committed first, then each step runs on its own. If the run stops during the
operation (a crash, SIGTERM, RUN_DEADLINE, a lost connection), the version table still names the
previous revision, and the rerun runs the revision again from its first statement: a CREATE TABLE
before the operation fails ("already exists", exit 6), an INSERT or UPDATE runs twice. The
operations themselves are rerunnable; what precedes them must be too, or live in an earlier
revision (docs/online.md, "How an online operation runs").
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from runner.verify.lint import RevisionSql
from runner.verify.report import WARN, Finding

# statements a second run would fail on or apply twice; IF [NOT] EXISTS and OR REPLACE forms
# are rerunnable, SET/SELECT/COMMENT/GRANT change nothing twice
_REPEATS = re.compile(r"^\s*(?:CREATE|ALTER|DROP|INSERT|UPDATE)\b", re.I)
_RERUNNABLE = re.compile(r"\bIF\s+(?:NOT\s+)?EXISTS\b|^\s*CREATE\s+OR\s+REPLACE\b", re.I)
SHOWN = 80


def findings(ran: Sequence[RevisionSql]) -> list[Finding]:
    """A warning for each revision that runs non-rerunnable statements before an online operation."""
    found = []
    for rev in ran:
        first = [s for s in rev.before_online if _REPEATS.match(s) and not _RERUNNABLE.search(s)]
        if not first or not rev.operations:
            continue
        example = " ".join(first[0].split())
        example = example if len(example) <= SHOWN else example[:SHOWN - 3] + "..."
        found.append(Finding(
            "rerun", WARN, f"{len(first)} statement(s) before {rev.operations[0]} ({example}) are "
            "committed before the online operation starts: if the run stops during it, the rerun "
            "runs the revision again from the start and repeats them (a CREATE fails with 'already "
            "exists', an INSERT or UPDATE applies twice)", rev.revision, rev.file, "before-online",
            instead="move them into an earlier revision, or after the online operations, or make "
            "them rerunnable (IF NOT EXISTS)"))
    return found
