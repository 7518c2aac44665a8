"""PostgreSQL names in SQL text, quoted exactly as Alembic and the settings spell them.

No SQLAlchemy: the no-op fast path and the start-up gate use it too.
"""

from __future__ import annotations


def quote(name: str) -> str:
    """Always quote: a schema or table name is used exactly as spelled (case, odd characters)."""
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str | None, name: str) -> str:
    """schema.name, or name alone (then found through the session's search_path, as Alembic does)."""
    return f"{quote(schema)}.{quote(name)}" if schema else quote(name)
