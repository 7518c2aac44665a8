"""Findings: a report a person can read at any scale (text), or one JSON document with every detail.

Text: findings grouped by revision, most severe revision first (then chain order); inside a
revision by check with counts, most severe first, at most GROUP_LINES lines per check (JSON has
them all); failures that only follow from another finding are folded under it; the tables a
revision was observed to lock, where that matters; what each step of its online operations held,
one line per operation; and a one-screen summary at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import IO, Any

from runner.redact import redact, redact_data
from runner.verify.units import human_bytes, human_rows, human_seconds

ERROR, WARN, NOTE = "error", "warning", "note"
SEVERITIES = (ERROR, WARN, NOTE)
STATEMENT_CHARS = 240
GROUP_LINES = 5  # findings shown per revision and check in the text report
SUMMARY_REVISIONS = 12  # revisions named in the summary


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem (or note) about the chain.

    check: chain | migration | roundtrip | lint | locks | phase | models | drift; severity: error (fails
    verify), warning or note. instead: the online operation that does the same without the
    blocking lock; step: the walk's step (upgrade, downgrade, upgrade again); observed: the
    table, lock, rewrite and live size behind a `locks` finding; folded_into: the check of the
    finding this one only follows from (an upgrade again failing because the downgrade did not
    undo)."""

    check: str
    severity: str
    message: str
    revision: str | None = None
    file: str | None = None
    rule: str | None = None
    statement: str | None = None
    help: str | None = None
    instead: str | None = None
    step: str | None = None
    observed: dict[str, Any] | None = None
    folded_into: str | None = None

    def line(self, with_revision: bool = True) -> str:
        where = f" {self.revision}" if self.revision and with_revision else ""
        where += f" ({self.file})" if self.file and with_revision else ""
        rule = f" [{self.rule}]" if self.rule else ""
        text = f"{self.severity.upper()} {self.check}{where}{rule}: {self.message}"
        if self.statement:
            text += f" -- statement: {self.statement}"
        if self.help:
            text += f" -- {self.help}"
        if self.instead:
            text += f" -- use instead: {self.instead}"
        return redact(text)

    def as_dict(self) -> dict[str, Any]:
        return redact_data(dataclasses.asdict(self))


def short(statement: str) -> str:
    """A statement on one line, cut to a readable length."""
    flat = " ".join(statement.split())
    return flat if len(flat) <= STATEMENT_CHARS else flat[:STATEMENT_CHARS - 3] + "..."


def relative(path: str | None) -> str | None:
    """A revision file's path relative to the working directory (how CI annotates files)."""
    if not path:
        return None
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def fold(findings: list[Finding]) -> list[Finding]:
    """Mark failures that only follow from another finding: an upgrade that fails again after
    a downgrade that did not undo it (the same revision's round-trip finding is the cause)."""
    roots = {f.revision for f in findings if f.check == "roundtrip" and f.severity != NOTE}
    return [dataclasses.replace(f, folded_into="roundtrip")
            if f.check == "migration" and f.step == "upgrade again" and f.revision in roots else f
            for f in findings]


def write(findings: list[Finding], summary: dict[str, Any], fmt: str, out: IO[str],
          observed: Sequence[dict[str, Any]] = (), order: Sequence[str] = (),
          files: Mapping[str, str | None] | None = None,
          operations: Mapping[str, Sequence[str]] | None = None) -> None:
    if fmt == "json":
        json.dump({"findings": [f.as_dict() for f in findings], "summary": summary,
                   "observed": redact_data(list(observed)),
                   "online_operations": redact_data(dict(operations or {}))}, out, indent=2)
        out.write("\n")
        return
    out.write(text(findings, summary, observed, order, files, operations))
    out.flush()


def text(findings: list[Finding], summary: dict[str, Any], observed: Sequence[dict[str, Any]],
         order: Sequence[str], files: Mapping[str, str | None] | None = None,
         operations: Mapping[str, Sequence[str]] | None = None) -> str:
    """The text report: groups by revision, tables of observed locks, then the summary (files:
    revision -> its file; operations: revision -> the online operations its upgrade ran)."""
    rank = {rev: i for i, rev in enumerate(order)}
    groups: dict[str | None, list[Finding]] = {}
    for f in findings:
        groups.setdefault(f.revision, []).append(f)
    rows: dict[str, list[dict[str, Any]]] = {}
    online: dict[str, list[dict[str, Any]]] = {}
    for row in observed:
        if row.get("operation") and row["step"] == "upgrade":
            online.setdefault(row["revision"], []).append(row)
        elif _shown(row):
            rows.setdefault(row["revision"], []).append(row)
    calls = {rev: list(ops) for rev, ops in (operations or {}).items() if ops}
    for rev in (*rows, *online, *calls):
        groups.setdefault(rev, [])

    def key(rev: str | None) -> tuple[int, int, str]:
        live = [f for f in groups[rev] if not f.folded_into]
        worst = min((SEVERITIES.index(f.severity) for f in live), default=len(SEVERITIES))
        return worst, rank.get(rev or "", len(rank)), rev or ""

    lines: list[str] = []
    for rev in sorted(groups, key=key):
        file = (files or {}).get(rev or "")
        lines += _group(rev, groups[rev], rows.get(rev or "", []), online.get(rev or "", []), file,
                        calls.get(rev or "", []))
    lines += summary_block(findings, summary, [r for r in sorted(groups, key=key) if r])
    return "".join(line + "\n" for line in lines)


def _shown(row: dict[str, Any]) -> bool:
    """Rows of the text tables: what the upgrade did that matters (CONCURRENTLY's SHARE UPDATE
    EXCLUSIVE included, to show it was seen), and a downgrade's rewrites and scans."""
    if row["step"] == "upgrade":
        return bool(row.get("kind")) or row.get("lock") == "SHARE UPDATE EXCLUSIVE"
    return row["step"] == "downgrade" and row.get("kind") in ("table-rewrite", "scan-under-lock")


def _group(rev: str | None, found: list[Finding], rows: list[dict[str, Any]],
           online: list[dict[str, Any]], file: str | None, calls: list[str]) -> list[str]:
    live = [f for f in found if not f.folded_into]
    file = next((f.file for f in found if f.file), file)
    title = f"{rev} ({file})" if rev and file else rev or "the chain as a whole"
    quiet = "online operations, no finding" if calls and not rows else "observed locks only"
    lines = [f"{title}: {_counts(live) or quiet}"]
    by_check: dict[str, list[Finding]] = {}
    for f in live:
        by_check.setdefault(f.check, []).append(f)
    folded = [f for f in found if f.folded_into]
    for check in sorted(by_check, key=lambda c: (min(SEVERITIES.index(f.severity) for f in by_check[c]), c)):
        items = sorted(by_check[check], key=lambda f: SEVERITIES.index(f.severity))
        if len(by_check) > 1 or len(items) > 1:
            lines.append(f"  {check}: {_counts(items)}")
        for f in items[:GROUP_LINES]:
            lines.append(f"    {f.line(with_revision=False)}")
        if len(items) > GROUP_LINES:
            lines.append(f"    ... and {len(items) - GROUP_LINES} more {check} finding(s) of "
                         f"{rev or 'the chain'} (--format json lists them all)")
        for f in folded:
            if f.folded_into == check:
                lines.append(f"      which also makes: {f.line(with_revision=False)}")
    # the table where the locks matter: a locks error or warning, a rewrite or a scan (a revision
    # with brief locks only has its notes; the JSON has every row)
    if rows and (any(f.check == "locks" and f.severity != NOTE for f in live)
                 or any(r["rewrite"] or r["scan_under_lock"] for r in rows)):
        lines += _table(rows)
    elif not live and not calls:
        return []  # weak or brief locks only: the JSON has them
    return lines + _online(calls, online)


def _online(calls: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """One line per online operation the upgrade ran: what each of its steps held, in order (->
    between steps; consecutive identical steps, like backfill batches, counted)."""
    if not calls:
        return []
    steps: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for r in sorted(rows, key=lambda r: r.get("transaction") or 0):
        steps.setdefault(r["operation"], {}).setdefault(r.get("transaction") or 0, []).append(r)
    lines = [f"  online: {len(calls)} operation(s), the locks of each step in order (docs/online.md)"]
    for operation in calls[:GROUP_LINES]:
        parts: list[list[Any]] = []
        for step in steps.get(operation, {}).values():
            what = _step(step)
            if what and parts and parts[-1][0] == what:
                parts[-1][1] += 1
            elif what:
                parts.append([what, 1])
        held = " -> ".join(w + (f" (x{n})" if n > 1 else "") for w, n in parts) or (
            "no table lock seen (a statement outside a transaction can end between two samples)")
        lines.append(f"    {operation}: {held}")
    if len(calls) > GROUP_LINES:
        lines.append(f"    ... and {len(calls) - GROUP_LINES} more online operation(s) (--format json "
                     "has every step)")
    return lines


def _step(rows: list[dict[str, Any]]) -> str:
    """One step of an online operation: 'SHARE UPDATE EXCLUSIVE on public.t, read in full'."""
    kinds: dict[tuple[str, bool, bool, bool], list[str]] = {}
    for r in rows:
        if r["lock"] in (None, "ACCESS SHARE") and not (r["scan"] or r["rewrite"]):
            continue
        kinds.setdefault((r["lock"] or "?", r["scan"], r["rewrite"], r["sampled"]), []).append(r["relation"])
    return "; ".join(f"{lock} on {', '.join(sorted(tables))}" + (", rewritten" if rewrite else "")
                     + (", read in full" if scan and not rewrite else "") + (" (sampled)" if sampled else "")
                     for (lock, scan, rewrite, sampled), tables in kinds.items())


def _table(rows: list[dict[str, Any]]) -> list[str]:
    head = ("step", "table", "lock", "rewrite", "live size", "est. hold")
    body = []
    for r in rows:
        live, hold = "-", "-"
        if r["in_live"] is False:
            live = "not there"
        elif r["in_live"]:
            live = "unknown" if r["live_bytes"] is None else \
                f"{human_bytes(r['live_bytes'])}, {human_rows(r['live_rows'])} rows"
            hold = human_seconds(r["estimated_hold_s"] or 0.0)
        lock = (r["lock"] or "?") + (" (sampled)" if r["sampled"] else "")
        rewrite = "yes" if r["rewrite"] else "scan" if r["scan_under_lock"] else "no"
        body.append((r["step"], r["relation"], lock, rewrite, live, hold))
    widths = [max(len(str(x[i])) for x in (head, *body)) for i in range(len(head))]
    return ["    " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in (head, *body)]


def _counts(found: Sequence[Finding]) -> str:
    c = Counter(f.severity for f in found)
    return ", ".join(f"{c[s]} {s}{'s' if c[s] != 1 else ''}" for s in SEVERITIES if c[s])


def summary_block(findings: list[Finding], s: dict[str, Any], revisions: list[str]) -> list[str]:
    """A few lines that fit on one screen: what was checked, what failed where, the verdict."""
    live = [f for f in findings if not f.folded_into]
    lines = ["", "summary:"]
    checks = Counter((f.check, f.severity) for f in live)
    for severity in (ERROR, WARN):
        per = [f"{check} {n}" for (check, sev), n in sorted(checks.items()) if sev == severity]
        if per:
            lines.append(f"  {severity}s by check: {', '.join(per)}")
    folded = sum(1 for f in findings if f.folded_into)
    if folded:
        lines.append(f"  {folded} failure(s) folded into the finding they follow from")
    failing = [r for r in revisions if any(f.revision == r and f.severity == ERROR for f in live)]
    if failing:
        named = ", ".join(f"{r} ({sum(1 for f in live if f.revision == r and f.severity == ERROR)})"
                          for r in failing[:SUMMARY_REVISIONS])
        more = f" and {len(failing) - SUMMARY_REVISIONS} more" if len(failing) > SUMMARY_REVISIONS else ""
        lines.append(f"  revisions with errors: {named}{more}")
    if s.get("locks") not in (None, "off"):
        lines.append(f"  observed: {s.get('observed_tables', 0)} existing table(s) locked, "
                     f"{s.get('rewrites', 0)} rewrite(s), {s.get('scans_under_lock', 0)} scan(s) under a "
                     f"blocking lock{_rates(s)}")
    if s.get("online_operations"):
        lines.append(f"  online operations: {s['online_operations']}, {s.get('online_steps', 0)} step(s) "
                     f"observed; {s.get('online_statements', 0)} statement(s) of theirs not linted (each "
                     "revision shows what its steps held)")
    lines.append(summary_line(s))
    return lines


def _rates(s: dict[str, Any]) -> str:
    rates = s.get("rates_mb_s")
    if not rates:
        return "" if s.get("against") else " (sizes: compare with --against)"
    return (f"; estimates at this server's measured MB/s: rewrite {rates['rewrite']}, index build "
            f"{rates['build']}, scan {rates['scan']}")


def summary_line(s: dict[str, Any]) -> str:
    if s.get("roundtrip") == "off":
        parts = [f"{s.get('upgraded', 0)} revision(s) upgraded (round trips off)"]
    else:
        parts = [f"{s['revisions']} revision(s) round-tripped"]
    if s.get("irreversible"):
        parts.append(f"{s['irreversible']} irreversible")
    parts.append(f"{s['statements_linted']} statement(s) linted" if s["lint"] != "off" else "lint off")
    parts.append({"match": "models match", "differ": "models differ", "none": "no models (env.py sets "
                  "no target_metadata)"}.get(s["models"], "models not compared"))
    if s.get("drift") is not None:
        parts.append("no drift" if s["drift"] == 0 else f"{s['drift']} drift difference(s)")
    counts = f"{s['errors']} error(s), {s['warnings']} warning(s), {s['notes']} note(s)"
    return f"verify: {'; '.join(parts)} -- {counts}"
