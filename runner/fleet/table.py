"""`status` over a fleet: one table, a row per target: its revision and at head / behind / unknown."""

from __future__ import annotations

from typing import IO, Any

from runner.exitcodes import ExitCode

REASON_CHARS = 100


def state(result: dict[str, Any]) -> str:
    """Return 'at head', 'behind (N pending[: P pre-deploy, Q post-deploy])' or 'unknown (why)' for
    one target's status result."""
    code = result["exit_code"]
    if code not in (ExitCode.OK, ExitCode.PENDING):
        why = result.get("error") or "not read"
        return f"unknown (exit {code}: {why[:REASON_CHARS]})" if code else f"unknown ({why[:REASON_CHARS]})"
    if result.get("from") == result.get("head"):
        return "at head"
    if result.get("pending"):
        post = result.get("pending_post_deploy") or []
        # with post-deploy revisions pending, say whether the pre-deploy phase is done
        split = f": {len(result.get('pending_pre_deploy') or [])} pre-deploy, {len(post)} post-deploy" \
            if post else ""
        return f"behind ({len(result['pending'])} pending{split})"
    return "unknown (revision not in these scripts: the image is older than the database)"


def render(results: list[dict[str, Any]], out: IO[str]) -> None:
    """Print the table, targets in their listed order."""
    rows = [("target", "revision", "state")]
    rows += [(r["target"], str(r.get("from", "-")), state(r)) for r in results]
    wide = [max(len(row[i]) for row in rows) for i in range(2)]
    for target, revision, what in rows:
        print(f"{target:<{wide[0]}}  {revision:<{wide[1]}}  {what}", file=out)
