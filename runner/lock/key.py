"""Advisory lock keys and who holds them, without SQLAlchemy (the start-up gate uses them too)."""

from __future__ import annotations

import hashlib

# who holds an advisory lock: pid, application_name, since when; parameters from split(key)
HOLDER_SQL = """
SELECT a.pid, a.application_name, a.client_addr::text AS client_addr,
       to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS since,
       round(extract(epoch FROM now() - a.backend_start))::int AS held_for_s
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.database = (
        SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = %(hi)s AND l.objid = %(lo)s AND l.objsubid = 1
"""


def lock_key(database: str, version_schema: str, version_table: str,
             purpose: str = "alembic-migrate") -> int:
    """Return a stable signed 64-bit key for database + version table (and purpose)."""
    digest = hashlib.sha256(f"{purpose}:{database}:{version_schema}.{version_table}".encode())
    return int.from_bytes(digest.digest()[:8], "big", signed=True)


def split(key: int) -> dict[str, int]:
    """Return pg_locks' classid/objid (HOLDER_SQL's parameters) for a bigint advisory key."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return {"hi": unsigned >> 32, "lo": unsigned & 0xFFFFFFFF}
