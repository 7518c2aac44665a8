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
instead, read from how the schema changed (a column's type, a new NOT NULL, a new index...).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from runner.verify.fingerprint import Fingerprint
from runner.verify.observe import DML, MODES, STRONG, StepObservation, mode_name, strongest
from runner.verify.report import ERROR, NOTE, WARN, Finding
from runner.verify.units import human_bytes, human_rows, human_seconds
from runner.verify.weigh import Rates, Size, work

KINDS = ("table-rewrite", "scan-under-lock", "strong-lock", "full-table-update")
UPGRADE, DOWNGRADE = "upgrade", "downgrade"

_COLUMN_TAIL = re.compile(r" (?:not null|generated |default |collate |comment )")


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
                "estimated_hold_s": None if self.hold is None else round(self.hold, 3)}


def records(obs: StepObservation, existing: frozenset[str], skip: set[str]) -> list[Record]:
    """Merge a step's transactions into one Record per existing table (skip: the version and
    ledger tables)."""
    found: dict[str, Record] = {}
    for i, txn in enumerate(obs.transactions):
        for touch in txn.touched:
            if touch.relation not in existing or touch.relation in skip:
                continue
            rec = found.setdefault(touch.relation, Record(obs.revision, obs.step, touch.relation))
            rec.mode = strongest({m for m in (rec.mode, touch.mode) if m})
            rec.rewritten |= touch.rewritten
            # the same transaction held a lock that blocks writes on it: during the read, or from right
            # after it until commit
            rec.scanned_under_lock |= touch.scanned and touch.strong
            rec.full_update |= touch.scanned and DML in touch.modes
            rec.sampled |= txn.statement is not None
            rec.dropped |= touch.dropped
            if touch.strong or touch.scanned or touch.rewritten:
                rec.transactions.add(i)
            if txn.statement is not None and rec.statement is None:
                rec.statement = txn.statement
    return [r for r in found.values() if r.mode is not None or r.rewritten or r.full_update]


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
            allow: Mapping[str, str], changes: list[str]) -> Finding | None:
    """The finding a Record makes (None: nothing worth saying)."""
    kind = rec.kind
    if kind is None or (rec.step == DOWNGRADE and kind == "strong-lock"):
        return None
    severity, weight = _severity(rec, kind, cap, applied)
    if severity == ERROR and (rec.step == DOWNGRADE or mode == "warn"):
        severity = WARN
    message = f"{rec.step}: {_what(rec, kind)}; {weight}"
    if kind in allow:
        severity, message = NOTE, f"{message}; allowed by runner_allow: {allow[kind]}"
    return Finding("locks", severity, message, rec.revision, file, kind, rec.statement,
                   instead=instead(kind, rec, changes), step=rec.step, observed=rec.row())


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


# -- "use instead" --------------------------------------------------------------------------------------
def changes(before: Fingerprint | None, after: Fingerprint | None) -> list[str]:
    """How the schema changed, as tags per table: 'public.t:type', ':not-null', ':add-column',
    ':rename-column', ':index', ':drop-index', ':unique', ':foreign-key', ':check'."""
    if before is None or after is None:
        return []
    tags: set[str] = set()
    old, new = before.get("column", {}), after.get("column", {})
    for key in set(old) | set(new):
        table = key.rsplit(".", 1)[0]
        if key in old and key in new and old[key] != new[key]:
            if _type(old[key]) != _type(new[key]):
                tags.add(f"{table}:type")
            if " not null" in new[key] and " not null" not in old[key]:
                tags.add(f"{table}:not-null")
        elif key in new and key not in old:
            if " not null" in new[key] or " default " in new[key]:  # a nullable column is instant
                tags.add(f"{table}:add-column")
            if any(k.rsplit(".", 1)[0] == table and k not in new and _type(old[k]) == _type(new[key])
                   for k in old):
                tags.add(f"{table}:rename-column")
    for section, added, gone in (("index", "index", "drop-index"), ("constraint", None, None)):
        old_s, new_s = before.get(section, {}), after.get(section, {})
        for key in set(new_s) - set(old_s):
            definition = new_s[key]
            if section == "index":
                m = re.search(r" ON (?:ONLY )?(\S+) USING ", definition)
                if m:
                    tags.add(f"{m.group(1)}:{'unique' if definition.startswith('CREATE UNIQUE') else added}")
            else:
                table = key.rsplit(".", 1)[0]
                for prefix, tag in (("FOREIGN KEY", "foreign-key"), ("CHECK", "check"), ("UNIQUE", "unique"),
                                    ("PRIMARY KEY", "unique")):
                    if definition.startswith(prefix):
                        tags.add(f"{table}:{tag}")
        if gone:
            for key in set(old_s) - set(new_s):
                m = re.search(r" ON (?:ONLY )?(\S+) USING ", old_s[key])
                if m:
                    tags.add(f"{m.group(1)}:{gone}")
    return sorted(tags)


def _type(column: str) -> str:
    return _COLUMN_TAIL.split(column, 1)[0]


_INSTEAD = {  # tag -> the online operation that replaces the blocking statement
    "type": "op.alter_column_type_expand / op.alter_column_type_contract",
    "not-null": "op.set_not_null_online",
    "add-column": "op.add_column_online",
    "rename-column": "op.rename_column_expand / op.rename_column_contract",
    "index": "op.create_index_online",
    "drop-index": "op.drop_index_online",
    "unique": "op.create_unique_constraint_online",
    "foreign-key": "op.create_foreign_key_online",
    "check": "op.create_check_constraint_online",
}
# which schema changes can explain each kind, most specific first
_EXPLAINS = {
    "table-rewrite": ("type", "add-column"),
    "scan-under-lock": ("not-null", "foreign-key", "check", "unique", "index", "type"),
    "strong-lock": ("rename-column", "drop-index", "foreign-key", "check", "unique", "not-null"),
}


def instead(kind: str, rec: Record, tags: list[str]) -> str | None:
    """The online operation that does what this revision did without the blocking lock."""
    if rec.dropped:
        return None  # dropping a table: no online form of that
    mine = {t.rsplit(":", 1)[1] for t in tags if t.rsplit(":", 1)[0] == rec.relation}
    if rec.step == DOWNGRADE:  # undoing an index is dropping it, and the other way round
        mine = {{"index": "drop-index", "drop-index": "index"}.get(t, t) for t in mine}
    hints = [_INSTEAD[t] for t in _EXPLAINS.get(kind, ()) if t in mine]
    if kind in ("scan-under-lock", "full-table-update") and rec.full_update:
        hints.append("op.backfill")
    return " or ".join(dict.fromkeys(hints)) or None
