"""Where a SQLite database lives: its file, the lock file next to it, and who may create it."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from runner.dburl import DbUrl

LOCK_SUFFIX = "-migration-lock"  # next to app.db-journal / app.db-wal: app.db-migration-lock
CREATES = ("upgrade",)  # the one command that creates a missing file (it migrates it from base)


def path(url: DbUrl) -> Path:
    """Return the database file, absolute (relative paths are relative to the working directory, as in
    SQLAlchemy)."""
    return Path(os.path.abspath(str(url.database)))


def lock_path(url: DbUrl) -> Path:
    """Return the lock file: next to the database's real path, so two spellings of one file (a symlink,
    a relative path) share one lock."""
    real = Path(os.path.realpath(path(url)))
    return real.with_name(real.name + LOCK_SUFFIX)


def uri(file: Path, create: bool = False, read_only: bool = False) -> str:
    """Return an sqlite3 URI filename for file, opened read-write (rwc: created when missing) or read-only."""
    mode = "ro" if read_only else "rwc" if create else "rw"
    return f"file:{quote(str(file))}?mode={mode}"
