"""Findings: one line each (text) or one JSON document (CI annotations), plus a summary."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import IO, Any

from runner.redact import redact

ERROR, WARN, NOTE = "error", "warning", "note"
STATEMENT_CHARS = 240


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem (or note) about the chain.

    check: chain | migration | roundtrip | lint | models | drift; severity: error (fails verify),
    warning (VERIFY_LINT=warn) or note (irreversible, allowed, not linted)."""

    check: str
    severity: str
    message: str
    revision: str | None = None
    file: str | None = None
    rule: str | None = None
    statement: str | None = None
    help: str | None = None

    def line(self) -> str:
        where = f" {self.revision}" if self.revision else ""
        where += f" ({self.file})" if self.file else ""
        rule = f" [{self.rule}]" if self.rule else ""
        text = f"{self.severity.upper()} {self.check}{where}{rule}: {self.message}"
        if self.statement:
            text += f" -- statement: {self.statement}"
        if self.help:
            text += f" -- {self.help}"
        return redact(text)

    def as_dict(self) -> dict[str, Any]:
        return {k: redact(v) if isinstance(v, str) else v for k, v in dataclasses.asdict(self).items()}


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


def write(findings: list[Finding], summary: dict[str, Any], fmt: str, out: IO[str]) -> None:
    if fmt == "json":
        json.dump({"findings": [f.as_dict() for f in findings], "summary": summary}, out, indent=2)
        out.write("\n")
        return
    for f in findings:
        out.write(f.line() + "\n")
    out.write(summary_line(summary) + "\n")
    out.flush()


def summary_line(s: dict[str, Any]) -> str:
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
