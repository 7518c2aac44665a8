"""Lint the SQL each revision executed with Squawk (PostgreSQL's grammar, not our regexes).

Rule set: Squawk's defaults minus EXCLUDED (each with its reason, documented in docs/verify.md).
On top of Squawk, a finding about an object the revision itself created is not a hazard (no
other session can be using it yet), and a revision may allow a rule with a reason:

    runner_allow = {"ban-drop-column": "contract step: no release reads orders.note since 2.3"}

A post-deploy revision (runner_phase = "post-deploy") runs once the previous release is gone: what
only breaks that release (dropping a column, a table, a NOT NULL...) is a note there. The
statements of online operations are not linted: they are the safe form of what the rules flag,
and verify observes what each of their steps does instead. Each finding names the online
operation to use instead, with its arguments (runner.verify.instead).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from runner.cancellation import unblock_in_child
from runner.errors import ConfigError
from runner.verify import instead
from runner.verify.report import ERROR, NOTE, WARN, Finding, short

# rule -> why it is not checked
EXCLUDED: dict[str, str] = {
    "require-timeout-settings": "the runner sets lock_timeout (MIGRATION_LOCK_TIMEOUT) on every "
    "migration statement, and statement_timeout from MIGRATION_STATEMENT_TIMEOUT",
    "prefer-robust-stmts": "each revision runs in its own transaction, and the runner drops the "
    "INVALID index an interrupted CREATE INDEX CONCURRENTLY leaves before retrying it",
    "ban-concurrent-index-creation-in-transaction": "PostgreSQL itself refuses it: such a "
    "revision fails on the scratch database before it is linted",
    "prefer-bigint-over-int": "style, not a migration hazard",
    "prefer-bigint-over-smallint": "style, not a migration hazard",
    "prefer-identity": "style, not a migration hazard",
    "prefer-text-field": "style, not a migration hazard (changing a varchar's length is "
    "changing-column-type)",
    "prefer-timestamp-tz": "style, not a migration hazard",
    "ban-char-field": "style, not a migration hazard",
    "require-enum-value-ordering": "style, not a migration hazard",
}
NOT_PARSED = "syntax-error"  # Squawk's parser lags PostgreSQL's: the server ran it, so it is valid

_NAME = r'(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*)'
_QNAME = rf"{_NAME}(?:\s*\.\s*{_NAME})*"
# the object a statement works on: findings about an object the same revision created are dropped
_TARGETS = [re.compile(p, re.I | re.S) for p in (
    rf"^ALTER\s+(?:TABLE|INDEX|VIEW|MATERIALIZED\s+VIEW|SEQUENCE|TYPE|DOMAIN|FOREIGN\s+TABLE)\s+"
    rf"(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?(?P<name>{_QNAME})",
    rf"^CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:CONCURRENTLY\s+)?(?:(?:IF\s+NOT\s+EXISTS\s+)?{_NAME}\s+)?"
    rf"ON\s+(?:ONLY\s+)?(?P<name>{_QNAME})",
    rf"^DROP\s+(?:TABLE|INDEX|VIEW|MATERIALIZED\s+VIEW|SEQUENCE|TYPE|DOMAIN|FUNCTION|PROCEDURE|"
    rf"SCHEMA)\s+(?:CONCURRENTLY\s+)?(?:IF\s+EXISTS\s+)?(?P<name>{_QNAME})",
    rf"^TRUNCATE\s+(?:TABLE\s+)?(?:ONLY\s+)?(?P<name>{_QNAME})",
    rf"^REINDEX\s+(?:\([^)]*\)\s*)?(?:TABLE|INDEX)\s+(?:CONCURRENTLY\s+)?(?P<name>{_QNAME})",
)]
_LEADING_COMMENTS = re.compile(r"^(?:\s+|--[^\n]*\n?|/\*.*?\*/)*", re.S)


@dataclasses.dataclass
class RevisionSql:
    """What one revision executed, and what existed before it ran. The statements of its online
    operations are not linted (they are the safe form; verify observes what they do instead):
    `operations` names the calls, `online_statements` counts their statements."""

    revision: str
    file: str | None
    statements: list[str]
    existing: set[str]  # object names before the revision (fingerprint.relation_names)
    allow: Mapping[str, str]  # rule -> reason (runner_allow)
    operations: list[str] = dataclasses.field(default_factory=list)  # "create_index_online(ix, t)"
    online_statements: int = 0
    post_deploy: bool = False  # runner_phase = "post-deploy": the previous release no longer runs
    # what it ran before its first online operation's first statement (runner.verify.rerun)
    before_online: list[str] = dataclasses.field(default_factory=list)


def squawk_binary() -> Path:
    """Find squawk: next to this Python (a virtualenv's bin), then on PATH; else exit 2."""
    beside = Path(sys.executable).parent / "squawk"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("squawk")
    if found:
        return Path(found)
    raise ConfigError("VERIFY_LINT needs the squawk binary (PyPI package squawk-cli), which is not "
                      "installed: pip install 'squawk-cli>=2.70,<3' (or the image's verify target: "
                      "docker build --target verify), or set VERIFY_LINT=off")


def version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30,
                         env=_child_env(), preexec_fn=unblock_in_child)
    return out.stdout.strip().removeprefix("squawk ").strip() or "unknown"


def lint(binary: Path, revisions: Sequence[RevisionSql], pg_version: str, mode: str) -> list[Finding]:
    """Run Squawk once over every revision's statements; return the findings that matter."""
    todo = [r for r in revisions if r.statements]
    if not todo:
        return []
    with tempfile.TemporaryDirectory(prefix="runner-verify-") as tmp:
        starts: dict[str, list[int]] = {}
        paths: dict[str, RevisionSql] = {}
        for i, rev in enumerate(todo):
            path = os.path.join(tmp, f"{i:05d}.sql")
            starts[path], lines = [], 0
            with open(path, "w") as f:
                for stmt in rev.statements:
                    starts[path].append(lines)
                    text = stmt.strip().rstrip(";").strip() + ";\n\n"
                    f.write(text)
                    lines += text.count("\n")
            paths[path] = rev
        raw = _run(binary, list(paths), pg_version)
    findings: list[Finding] = []
    for item in raw:
        rev = paths.get(item.get("file", ""))
        if rev is None:
            continue
        index = _statement_at(starts[item["file"]], int(item.get("line", 0)))
        found = _finding(rev, rev.statements[index], item, mode)
        if found is not None:
            findings.append(found)
    return _unique(findings)


def target(statement: str) -> str | None:
    """The name of the object a DDL statement works on ('public.orders', 'orders'), lower case
    unless quoted; None when it is not one of the recognised forms."""
    text = _LEADING_COMMENTS.sub("", statement, count=1)
    for pattern in _TARGETS:
        m = pattern.match(text)
        if m:
            parts = re.findall(_NAME, m.group("name"))
            return ".".join(p[1:-1].replace('""', '"') if p.startswith('"') else p.lower()
                            for p in parts)
    return None


def _finding(rev: RevisionSql, statement: str, item: dict, mode: str) -> Finding | None:
    rule = item.get("rule_name") or "unknown"
    name = target(statement)
    if name is not None and name.lower() not in rev.existing:
        return None  # created by this same revision: nobody else can be using it yet
    message = str(item.get("message") or "").strip()
    helptext = str(item.get("help") or "").strip() or None
    if rule == NOT_PARSED:
        return Finding("lint", NOTE, "not linted: Squawk cannot parse this statement (PostgreSQL "
                       f"ran it): {message}", rev.revision, rev.file, rule, short(statement))
    if rule in rev.allow:
        return Finding("lint", NOTE, f"allowed by runner_allow: {rev.allow[rule]}", rev.revision,
                       rev.file, rule, short(statement), message)
    if rev.post_deploy and rule in instead.BREAKS_THE_PREVIOUS_RELEASE:
        return Finding("lint", NOTE, "post-deploy revision (runner_phase): the release that used it no "
                       f"longer runs: {message}", rev.revision, rev.file, rule, short(statement))
    return Finding("lint", ERROR if mode == "error" else WARN, message, rev.revision, rev.file, rule,
                   short(statement), helptext, instead=instead.for_rule(rule, statement))


def _run(binary: Path, files: list[str], pg_version: str) -> list[dict]:
    args = [str(binary), "--reporter", "json", "--assume-in-transaction", f"--pg-version={pg_version}",
            f"--exclude={','.join(sorted(EXCLUDED))}", *files]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=_child_env(),
                          preexec_fn=unblock_in_child)  # the runner blocks SIGTERM; squawk need not
    if proc.returncode not in (0, 1):
        first = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[0]
        raise ConfigError(f"squawk failed ({first}): check the squawk-cli version (>=2.70,<3), or "
                          "set VERIFY_LINT=off")
    try:
        data = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        raise ConfigError("squawk printed no JSON report: check the squawk-cli version (>=2.70,<3), "
                          "or set VERIFY_LINT=off") from None
    return data if isinstance(data, list) else []


def _statement_at(starts: list[int], line: int) -> int:
    index = 0
    for i, first in enumerate(starts):
        if first <= line:
            index = i
    return index


def _unique(findings: list[Finding]) -> list[Finding]:
    seen, out = set(), []
    for f in findings:
        key = (f.revision, f.rule, f.statement, f.severity)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _child_env() -> dict[str, str]:
    """Squawk needs no secrets: hand it none of the URLs."""
    return {k: v for k, v in os.environ.items() if "DATABASE_URL" not in k and not k.startswith("PG")}
