"""A ledger that exists but cannot be trusted: its revisions table changed shape, or rows are gone.

"Cannot be read or written" (privileges, no table yet, a table locked) is a warning: the run goes
on without the ledger (runner.ledger.recording). "Read, but inconsistent" fails closed: a
checksum column dropped or retyped means no edit can be detected, and an applied revision whose
row was deleted while rows of later revisions remain would otherwise be baselined again from the
edited script, silently. Both refuse with exit 7 and say how `repair` fixes them.
"""

from __future__ import annotations

from alembic.script import ScriptDirectory

from runner import revisions
from runner.errors import PreflightRefused

_TEXT = ("text", "character varying")
# what runner.ledger.store.REVISIONS_DDL creates, as format_type() spells it (compatible types too)
COLUMNS = {"revision": _TEXT, "checksum": _TEXT, "kind": _TEXT, "script": _TEXT,
           "recorded_at": ("timestamp with time zone", "timestamp without time zone"),
           "run_id": _TEXT}
COLUMNS_SQL = ("SELECT a.attname, format_type(a.atttypid, NULL) FROM pg_attribute a "
               "WHERE a.attrelid = to_regclass(:t) AND a.attnum > 0 AND NOT a.attisdropped")
REPAIRABLE = ("checksum",)  # `repair` rebuilds these; any other damage is fixed by hand
REPAIR = "python -m runner repair"


class LedgerDamaged(PreflightRefused):
    """The ledger exists but cannot be trusted (exit 7); the message says what and how to repair."""


def shape_problems(columns: dict[str, str]) -> dict[str, str]:
    """{column: what is wrong with it} for the revisions table's columns {name: type}."""
    problems = {}
    for name, types in COLUMNS.items():
        found = columns.get(name)
        if found is None:
            problems[name] = "is missing"
        elif found not in types:
            problems[name] = f"is {found}, not {types[0]}"
    return problems


def damaged_table(where: str, problems: dict[str, str]) -> LedgerDamaged:
    """The refusal for a revisions table whose columns changed."""
    what = "; ".join(f"its {name} column {why}" for name, why in problems.items())
    if set(problems) <= set(REPAIRABLE):
        fix = (f"check the applied revisions' scripts are the ones that ran, then run '{REPAIR}', "
               "which rebuilds the column and records every applied revision's checksum again")
    else:
        fix = ("restore the columns as docs/history.md shows (or drop the table: the next run "
               "records a baseline), then run again")
    return LedgerDamaged(f"the ledger {where} is damaged ({what}; changed by hand?): edited revisions "
                         f"cannot be detected with it: {fix}")


def deleted(script: ScriptDirectory, missing: set[str], recorded: set[str]) -> dict[str, list[str]]:
    """{applied revision without a row: the recorded revisions applied after it}.

    Rows are written in the order revisions are applied (a first run records every revision
    already applied as a baseline), so a missing row below a recorded one was deleted. A missing
    row above every recorded one is the newest work of a run killed before it recorded, or of
    plain `alembic`: that is baselined, as it always was.
    """
    known = {r for r in recorded if revisions.lookup(script, r) is not None}
    gone = sorted(missing & revisions.ancestors(script, tuple(sorted(known))))
    return {rev: _recorded_after(script, rev, known) for rev in gone}


def _recorded_after(script: ScriptDirectory, rev: str, recorded: set[str]) -> list[str]:
    """The nearest recorded revisions above rev (for the message)."""
    found, seen, todo = set(), set(), [rev]
    while todo:
        for child in revisions.lookup(script, todo.pop()).nextrev:  # type: ignore[union-attr]
            if child in recorded:
                found.add(child)
            elif child not in seen:
                seen.add(child)
                todo.append(child)
    return sorted(found)


def deleted_rows(where: str, gone: dict[str, list[str]]) -> LedgerDamaged:
    """The refusal for applied revisions whose rows were deleted."""
    revs = " ".join(gone)
    later = sorted({r for laters in gone.values() for r in laters})
    shown = ", ".join(later[:3]) + (f" and {len(later) - 3} more" if len(later) > 3 else "")
    which = f"revision {revs} has" if len(gone) == 1 else f"revisions {revs.replace(' ', ', ')} have"
    return LedgerDamaged(f"applied {which} no checksum in the ledger {where}, although revisions "
                         f"applied after it have ({shown}): the rows were deleted, so an edit would go "
                         f"unnoticed: check the scripts are the ones that ran, then run '{REPAIR} "
                         f"{revs}' to record their checksums again")
