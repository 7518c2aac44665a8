"""A one-shot Alembic migration runner for PostgreSQL: wait, lock, back up, migrate, report."""

__version__ = "0.1.0"
