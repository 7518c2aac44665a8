"""How the ledger reads in a terminal (`history`, the last-run line of `status`) and as JSON."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

HEADER = ("started (UTC)", "run", "command", "from -> to", "outcome", "exit", "took", "image", "host")
STEP_VERBS = ("applied", "downgraded", "failed", "repaired")


def iso(value: dt.datetime | None) -> str | None:
    """A timestamp as UTC ISO 8601 with a Z, whatever the session's TimeZone."""
    if value is None:
        return None
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def as_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps([record(r) for r in rows], indent=2, ensure_ascii=False)


def record(row: dict[str, Any]) -> dict[str, Any]:
    """A row with JSON-friendly names and values."""
    return {"run_id": row["run_id"], "command": row["command"], "outcome": row["outcome"],
            "exit_code": row["exit_code"], "from": row["from_revision"], "to": row["to_revision"],
            "target": row["target"], "steps": row["steps"], "error": row["error"],
            "backup": row["backup_key"], "started": iso(row["started_at"]),
            "finished": iso(row["finished_at"]), "seconds": _round(row.get("seconds")),
            "runner_version": row["runner_version"], "image_version": row["image_version"],
            "image_revision": row["image_revision"], "host": row["host"], "job": row["job_name"],
            "db_user": row["db_user"], "id": str(row["id"])}


def as_text(rows: list[dict[str, Any]]) -> str:
    """One line per run, newest first, then indented lines for its steps, backup and error."""
    table = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    out: list[str] = []
    for i, cells in enumerate(table):
        out.append("  ".join(c.rjust(w) if h in ("exit", "took") else c.ljust(w)
                             for c, w, h in zip(cells, widths, HEADER, strict=True)).rstrip())
        if i:
            out += [f"    {label:<10} {text}" for label, text in _details(rows[i - 1])]
    return "\n".join(out)


def last_run(row: dict[str, Any] | None) -> str:
    """status's one line about the newest run."""
    if row is None:
        return "last run: none recorded"
    took = f", {row['seconds']:.1f}s" if row.get("seconds") is not None else ""
    exit_code = "" if row["exit_code"] is None else f" (exit {row['exit_code']}{took})"
    return (f"last run: {iso(row['started_at'])} {row['command']} {row['from_revision']} -> "
            f"{row['to_revision'] or '?'}: {row['outcome']}{exit_code}, run {row['run_id']} on "
            f"{row['host'] or '?'}{_image(row, ', image ')}")


def _cells(row: dict[str, Any]) -> tuple[str, ...]:
    started = iso(row["started_at"]) or ""
    return (started.replace("T", " ").rstrip("Z"), row["run_id"], row["command"],
            f"{row['from_revision'] or 'base'} -> {row['to_revision'] or '?'}", row["outcome"],
            "" if row["exit_code"] is None else str(row["exit_code"]),
            "" if row.get("seconds") is None else f"{row['seconds']:.1f}s",
            _image(row) or "-", row["host"] or "-")


def _details(row: dict[str, Any]) -> list[tuple[str, str]]:
    lines = []
    for verb in STEP_VERBS:
        steps = [s for s in row["steps"] or [] if s.get("outcome") == verb]
        if steps:
            lines.append((verb, ", ".join(_step(s) for s in steps)))
    if row["backup_key"]:
        lines.append(("backup", row["backup_key"]))
    if row["error"]:
        lines.append(("error", row["error"]))
    return lines


def _step(step: dict[str, Any]) -> str:
    if "old" in step:  # repair: which checksum replaced which (none: its row had been deleted)
        return f"{step['revision']} ({(step['old'] or 'none')[:12]} -> {step['new'][:12]})"
    took = f" ({step['seconds']:.2f}s)" if step.get("seconds") is not None else ""
    return f"{step['revision']}{took}"


def _image(row: dict[str, Any], prefix: str = "") -> str:
    version, revision = row["image_version"], row["image_revision"]
    if not version and not revision:
        return ""
    return prefix + (version or "?") + (f"@{revision[:12]}" if revision else "")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
