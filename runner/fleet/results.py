"""Fleet results: a line per target as it finishes, and one bounded summary at the end.

The summary goes into the run's JSON summary and so into the termination message, which
Kubernetes cuts at 4096 bytes: the list of failed targets is shortened to a byte budget (the
count of the rest is kept), so the message stays whole, valid JSON.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from runner.context import Run
from runner.exitcodes import ExitCode

Result = dict[str, Any]
FAILED_BYTES = 2400  # the failed list in the summary; the rest of the message stays well under 4096
ERROR_CHARS = 160  # of each failed target's reason in the summary (its own lines have all of it)
NAMED = 3  # failed targets named in the one-line error
NAME_CHARS = 60


def log_line(run: Run, result: Result, done: int, total: int) -> None:
    """Log one target's result as it arrives (event fleet.target)."""
    r, code = result, result["exit_code"]
    what = r["outcome"]
    if code == ExitCode.OK and r.get("from") != r.get("to") and "to" in r:
        what += f" {r['from']} -> {r['to']}"
    elif what == "behind head" and r.get("pending"):
        what += f" ({len(r['pending'])} pending)"
    elif code:
        what += f" (exit {code}): {r.get('error', '')}"
    fields = {k: r.get(k) for k in ("exit_code", "seconds", "from", "to", "backup", "run_id")}
    level = "info" if code == ExitCode.OK else "warn" if code is None else "error"
    run.log("fleet.target", f"[{done}/{total}] {r['target']}: {what}", level=level,
            target=r["target"], **fields)


def summary(results: list[Result]) -> dict[str, Any]:
    """Return the fleet's part of the run summary: counts by outcome and the failed targets."""
    outcomes = Counter(r["outcome"] for r in results)
    failed, omitted, used = [], 0, 0
    for r in results:
        if not r["exit_code"]:
            continue
        entry = {"target": r["target"], "exit_code": r["exit_code"],
                 "error": (r.get("error") or "")[:ERROR_CHARS]}
        size = len(json.dumps(entry, ensure_ascii=False).encode()) + 2
        if used + size > FAILED_BYTES:
            omitted += 1
            continue
        failed.append(entry)
        used += size
    data: dict[str, Any] = {"targets": len(results), "outcomes": dict(outcomes), "failed": failed,
                            "outcome": ", ".join(f"{n} {o}" for o, n in outcomes.items()) or "no targets"}
    if omitted:
        data["failed_omitted"] = omitted
    return data


def failure(results: list[Result]) -> str | None:
    """Return the one-line error unless every target succeeded (not started is not success)."""
    failed = [r for r in results if r["exit_code"]]
    skipped = sum(1 for r in results if r["exit_code"] is None)
    if not failed and not skipped:
        return None
    named = ", ".join(f"{r['target'][:NAME_CHARS]} (exit {r['exit_code']})" for r in failed[:NAMED])
    more = f" and {len(failed) - NAMED} more" if len(failed) > NAMED else ""
    also = f"; {skipped} not started" if skipped else ""
    return (f"{len(failed)} of {len(results)} targets failed{': ' if failed else ''}{named}{more}{also}; "
            "the others are done. Each reason is in its fleet.target line and the summary's failed "
            "list; run the fleet again to retry them (targets already at the target revision are no-ops)")
