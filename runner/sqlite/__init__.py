"""SQLite for local development, as the Alembic guides teach: the same chain, `sqlite:///path.db`.

What differs from PostgreSQL lives here, behind small switch points in the shared flow
(docs/sqlite.md): files (the path, readiness, the engine and its transactions), the lock (a
kernel lock on a file next to the database), backup and restore (SQLite's online backup API),
the online operations' plain forms, and which settings cannot apply (refusals).
"""
