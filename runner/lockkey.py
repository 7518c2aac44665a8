"""Advisory lock keys, without SQLAlchemy (the no-op fast path and the start-up gate use them)."""

from __future__ import annotations

import hashlib


def lock_key(database: str, version_schema: str, version_table: str,
             purpose: str = "alembic-migrate") -> int:
    """Return a stable signed 64-bit key for database + version table (and purpose)."""
    digest = hashlib.sha256(f"{purpose}:{database}:{version_schema}.{version_table}".encode())
    return int.from_bytes(digest.digest()[:8], "big", signed=True)
