"""The exit-code table: the one contract shared by the code, the README and the manifests.

Codes stay below 126 (shells and the kubelet reserve 126+) except the two signal codes,
which follow the 128+N convention every supervisor already understands.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    INTERNAL = 1
    CONFIG = 2
    DB_NOT_READY = 3
    LOCK_TIMEOUT = 4
    BACKUP_FAILED = 5
    MIGRATION_FAILED = 6
    PREFLIGHT_REFUSED = 7
    LOCK_RETRIES_EXHAUSTED = 8
    RUN_DEADLINE = 9
    PENDING = 10
    CONNECTION_LOST = 11
    AUTH_FAILED = 12
    VERIFY_FAILED = 13
    TARGETS_FAILED = 14
    SIGINT = 130
    SIGTERM = 143


# meaning, retriable (would a new pod of the same Job possibly succeed?)
DESCRIPTIONS: dict[ExitCode, tuple[str, bool]] = {
    ExitCode.OK: ("success, including nothing to do", False),
    ExitCode.INTERNAL: ("unexpected internal error (a bug: please report it)", True),
    ExitCode.CONFIG: ("usage or configuration error; nothing was changed", False),
    ExitCode.DB_NOT_READY: ("database not ready before the wait deadline", True),
    ExitCode.LOCK_TIMEOUT: ("migration lock not acquired before the lock deadline", True),
    ExitCode.BACKUP_FAILED: ("backup failed; nothing was migrated", True),
    ExitCode.MIGRATION_FAILED: (
        "a migration failed and its transaction was rolled back; "
        "the database is at the last good revision",
        False,
    ),
    ExitCode.PREFLIGHT_REFUSED: (
        "preflight refused (heads, unknown revision, bad target, deploy-phase order or an "
        "unfinished backfill, a leftover INVALID index with INVALID_INDEX_POLICY=refuse)",
        False,
    ),
    ExitCode.LOCK_RETRIES_EXHAUSTED: (
        "table-lock (lock_timeout) retries exhausted; the database is at the last good revision",
        True,
    ),
    ExitCode.RUN_DEADLINE: ("run deadline reached; stopped cleanly", True),
    ExitCode.PENDING: ("status --check: migrations are pending", False),
    ExitCode.CONNECTION_LOST: (
        "the connection to the database was lost mid-run (restart, failover); the running "
        "revision rolled back, the database is at the last good revision",
        True,
    ),
    ExitCode.AUTH_FAILED: (
        "authentication failed, or the role or database does not exist: fix DATABASE_URL or the "
        "role; nothing was changed",
        False,
    ),
    ExitCode.VERIFY_FAILED: ("verify found problems in the migrations (see the findings)", False),
    ExitCode.TARGETS_FAILED: (
        "fleet: some targets failed (each with its own code in the summary); the others succeeded",
        True,
    ),
    ExitCode.SIGINT: ("interrupted by SIGINT; the running migration was cancelled", True),
    ExitCode.SIGTERM: ("interrupted by SIGTERM; the running migration was cancelled", True),
}


def non_retriable() -> list[int]:
    """Return the failure codes a Job must not retry (same input, same result)."""
    return [int(c) for c, (_, retry) in DESCRIPTIONS.items() if c != ExitCode.OK and not retry]


def markdown_table() -> str:
    """Render the table for the README."""
    rows = ["| code | meaning | retriable |", "| --- | --- | --- |"]
    for code, (meaning, retry) in DESCRIPTIONS.items():
        rows.append(f"| {int(code)} | {meaning} | {'yes' if retry else 'no'} |")
    return "\n".join(rows)
