"""Findings from what the revisions were observed to do to tables that existed before them.

Independent of how the SQL was written (op.alter_column, raw SQL, a DO block, a PL/pgSQL function,
an ORM call): per revision, step and table, the strongest lock taken, whether the table was
rewritten, and whether it was read in full while the transaction held a lock that blocks writes.
Tables the revision created itself are left out: nobody else can be using them yet.

- table-rewrite: a new relfilenode with the rows copied. Error; with --against, an error when
  the estimated hold exceeds VERIFY_MAX_LOCK_HOLD, else a note.
- scan-under-lock: read in full while SHARE or stronger was held (a validation scan, an index
  build, a backfill in the same transaction as an ALTER). As table-rewrite.
- strong-lock: SHARE or stronger, nothing else: a note; with --against an error when the
  transaction's other work makes the estimated hold exceed VERIFY_MAX_LOCK_HOLD.
- full-table-update: read in full by an UPDATE or DELETE without a strong lock: a note; with
  --against a warning when it would run longer than VERIFY_MAX_LOCK_HOLD.

A downgrade's errors are warnings (it runs only to roll back); VERIFY_LOCKS=warn makes every
error a warning; `runner_allow = {"table-rewrite": "reason"}` makes a kind a note; with
--against, revisions the live database already ran are notes. Each finding says what to use
instead, read from how the schema changed (a column's type, a new NOT NULL, a new index...:
runner.verify.instead).

The steps of an online operation (runner.online) are kept apart, one Record per step and table:
each is a short transaction or one CONCURRENTLY statement, and what matters is what each step
held. Their brief strong locks are what docs/online.md says they take: shown, not reported; a
rewrite or a scan under a blocking lock in one of them, or (with --against) an estimated hold
above VERIFY_MAX_LOCK_HOLD, is reported like any other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from runner.verify import instead
from runner.verify.instead import Change
from runner.verify.observe import DML, MODES, STRONG, StepObservation, mode_name, strongest
from runner.verify.report import ERROR, NOTE, WARN, Finding
from runner.verify.units import human_bytes, human_rows, human_seconds
from runner.verify.weigh import Rates, Size, work

KINDS = ("table-rewrite", "scan-under-lock", "strong-lock", "full-table-update")
UPGRADE, DOWNGRADE = "upgrade", "downgrade"


@dataclasses.dataclass
class Record:
    """One table in one step: what was observed, and what it weighs in production."""

    revision: str
    step: str
    relation: str
    mode: str | None = None
    rewritten: bool = False
    scanned_under_lock: bool = False
    full_update: bool = False
    sampled: bool = False  # seen from a second connection (a statement outside a transaction)
    dropped: bool = False
    transactions: set[int] = dataclasses.field(default_factory=set)  # where it held a strong lock or was read
    size: Size | None = None
    in_live: bool | None = None  # None: not weighed (no --against)
    hold: float | None = None  # estimated seconds a blocking lock is held in production
    statement: str | None = None
    operation: str | None = None  # the online operation whose step this is (one transaction)
    scanned: bool = False  # read in full (under whatever lock: for an online step, this one's)

    @property
    def kind(self) -> str | None:
        if self.rewritten:  # (a rewrite takes ACCESS EXCLUSIVE, even where sampling missed it)
            return "table-rewrite"
        if self.scanned_under_lock:
            return "scan-under-lock"
        if self._strong:
            return "strong-lock"
        if self.full_update:
            return "full-table-update"
        return None

    @property
    def _strong(self) -> bool:
        return self.mode is not None and MODES.index(self.mode) >= STRONG

    def row(self) -> dict[str, Any]:
        """The JSON (and text table) form."""
        return {"revision": self.revision, "step": self.step, "relation": self.relation,
                "lock": mode_name(self.mode) if self.mode else None, "rewrite": self.rewritten,
                "scan_under_lock": self.scanned_under_lock, "full_table_update": self.full_update,
                "sampled": self.sampled, "dropped": self.dropped, "kind": self.kind,
                "live_bytes": self.size.total_bytes if self.size and self.size.known else None,
                "live_rows": self.size.rows if self.size and self.size.known else None,
                "in_live": self.in_live,
                "estimated_hold_s": None if self.hold is None else round(self.hold, 3),
                "operation": self.operation, "scan": self.scanned,
                "transaction": min(self.transactions) if self.operation and self.transactions else None}


def records(obs: StepObservation, existing: frozenset[str], skip: set[str]) -> list[Record]:
    """Merge a step's transactions into one Record per existing table, and one per table and
    transaction for the steps of online operations (skip: the runner's own tables)."""
    found: dict[tuple[str, int | None], Record] = {}
    for i, txn in enumerate(obs.transactions):
        for touch in txn.touched:
            if touch.relation not in existing or touch.relation in skip:
                continue
            key = (touch.relation, i if txn.operation else None)
            rec = found.setdefault(key, Record(obs.revision, obs.step, touch.relation,
                                               operation=txn.operation))
            rec.mode = strongest({m for m in (rec.mode, touch.mode) if m})
            rec.rewritten |= touch.rewritten
            # the same transaction held a lock that blocks writes on it: during the read, or from right
            # after it until commit
            rec.scanned_under_lock |= touch.scanned and touch.strong
            rec.full_update |= touch.scanned and DML in touch.modes
            rec.scanned |= touch.scanned
            rec.sampled |= txn.sampled
            rec.dropped |= touch.dropped
            if touch.strong or touch.scanned or touch.rewritten or txn.operation:
                rec.transactions.add(i)
            if txn.statement is not None and rec.statement is None:
                rec.statement = txn.statement
    return [r for r in found.values() if r.mode is not None or r.rewritten or r.full_update or r.scanned]


def estimate(recs: list[Record], obs: StepObservation, sizes: Mapping[str, Size],
             rates: Rates | None) -> None:
    """Fill in live sizes and estimated hold times (every strong lock of a transaction is held for
    all the work the transaction does on existing tables)."""
    cost = [sum(work(t, sizes.get(t.relation), rates) for t in txn.touched) if rates else 0.0
            for txn in obs.transactions]
    for rec in recs:
        rec.size, rec.in_live = sizes.get(rec.relation), rec.relation in sizes
        rec.hold = max((cost[i] for i in rec.transactions), default=0.0)


def finding(rec: Record, file: str | None, *, mode: str, cap: float | None, applied: bool,
            allow: Mapping[str, str], changes: Sequence[Change],
            statements: Sequence[str] = ()) -> Finding | None:
    """The finding a Record makes (None: nothing worth saying). changes and statements: how the
    revision's upgrade changed the schema and the SQL it ran, for what to use instead."""
    kind = rec.kind
    if kind is None or (rec.step == DOWNGRADE and kind == "strong-lock"):
        return None
    severity, weight = _severity(rec, kind, cap, applied)
    if rec.operation is not None and kind == "strong-lock" and severity == NOTE:
        return None  # an online step's brief lock, as docs/online.md says: in the table, not a finding
    if severity == ERROR and (rec.step == DOWNGRADE or mode == "warn"):
        severity = WARN
    step = f"{rec.step}: {rec.operation}" if rec.operation else rec.step
    message = f"{step}: {_what(rec, kind)}; {weight}"
    if kind in allow:
        severity, message = NOTE, f"{message}; allowed by runner_allow: {allow[kind]}"
    better = None if rec.operation or rec.dropped else instead.for_observed(
        kind, rec.relation, downgrade=rec.step == DOWNGRADE, full_update=rec.full_update, found=changes,
        statements=statements)  # an online operation is the replacement already; a dropped table has none
    return Finding("locks", severity, message, rec.revision, file, kind, rec.statement,
                   instead=better, step=rec.step, observed=rec.row())


def _severity(rec: Record, kind: str, cap: float | None, applied: bool) -> tuple[str, str]:
    if applied:
        return NOTE, "the live database already ran this revision"
    blocking = kind in ("table-rewrite", "scan-under-lock")
    if rec.in_live is None:
        return (ERROR if blocking else NOTE), "production size unknown (compare with --against)"
    if not rec.in_live:
        return NOTE, "not in the live database yet (a revision it has not run creates it)"
    assert rec.size is not None and cap is not None and rec.hold is not None
    if not rec.size.known:
        return (ERROR if blocking else NOTE), "live size unknown: never vacuumed nor analyzed"
    live = f"live: {human_bytes(rec.size.total_bytes)}, {human_rows(rec.size.rows)} rows"
    over = rec.hold > cap
    held = (f"estimated {'hold' if kind != 'full-table-update' else 'duration'} "
            f"{human_seconds(rec.hold)} {'>' if over else '<='} VERIFY_MAX_LOCK_HOLD {human_seconds(cap)}")
    if not over:
        return NOTE, f"{live}; {held}"
    return (WARN if kind == "full-table-update" else ERROR), f"{live}; {held}"


def _what(rec: Record, kind: str) -> str:
    lock = mode_name(rec.mode) if rec.mode else "a lock the sampling missed"
    waits = "reads and writes wait" if rec.mode == "AccessExclusiveLock" else "writes wait"
    how = " (sampled: it ran outside a transaction)" if rec.sampled else ""
    if kind == "table-rewrite":
        return f"{rec.relation} rewritten under {lock}{how}: every row copied while {waits}"
    if kind == "scan-under-lock":
        return (f"{rec.relation} read in full under {lock}{how} (a validation scan, index build or "
                f"backfill): {waits} until it commits")
    if kind == "strong-lock":
        gone = ", dropped" if rec.dropped else ""
        return f"{lock} on {rec.relation}{how}{gone}: {waits} while it is held"
    return (f"{rec.relation} read in full by an UPDATE or DELETE in one transaction: its rows stay locked "
            "until it commits")
