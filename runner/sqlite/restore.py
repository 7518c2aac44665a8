"""Restore a SQLite backup (format `sqlite`) into the database file, under the migration lock.

1. The object is fetched into a local file (BACKUP_WORKDIR, or the system's temporary
   directory), hashed as it streams: size and sha256 must match the manifest, and the file must
   be a SQLite database that passes `PRAGMA quick_check`, before the target is touched.
2. SQLite's backup API then copies it into the target in one step: one write transaction, so
   the file is the backup or unchanged, whatever happens meanwhile (connections of the
   application included; a -wal or -journal file stays consistent with it, which a rename of the
   file would not guarantee).
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from runner.backup import fetch
from runner.backup.layout import Location
from runner.backup.restore import Target
from runner.context import Run
from runner.errors import BackupFailed
from runner.sqlite import files
from runner.sqlite.engine import BUSY_TIMEOUT


def target(run: Run) -> Target:
    """Return what restore's checks need to know about the file it writes to."""
    return Target(str(run.settings.database_url.name), 0, sqlite3.sqlite_version, frozenset(), None)


def restore(run: Run, client: Any, loc: Location, manifest: dict[str, Any]) -> None:
    """Replace the file's contents with the verified backup (see the module's docstring)."""
    blocked = fetch.check_space(run, manifest)
    if blocked:
        raise BackupFailed(f"{blocked}: free space or point BACKUP_WORKDIR at a larger volume; the "
                           "database was not touched")
    file = files.path(run.settings.database_url)
    with tempfile.TemporaryDirectory(prefix=f"runner-restore-{run.run_id}-", dir=fetch.workdir(run)) as d:
        local = Path(d) / "backup.sqlite"
        fetch.to_file(run, client, loc, manifest, local)  # size and sha256 checked, or BackupFailed
        _check_copy(manifest, local)
        run.log("restore.start", f"verified {manifest['key']}; copying it into {file}",
                bytes=manifest["archive_size"])
        t0 = run.clock()
        _replace(run, local, file)
    run.log("restore.done", f"restored {manifest['key']}: committed", seconds=round(run.clock() - t0, 2))


def _check_copy(manifest: dict[str, Any], local: Path) -> None:
    """Refuse a decompressed copy that is not the file backed up: its size, a sound database."""
    if local.stat().st_size != manifest["archive_size"]:
        raise BackupFailed(f"backup {manifest['key']} decompressed to {local.stat().st_size} bytes, not "
                           f"{manifest['archive_size']} as its manifest says: refused; the database "
                           "was not touched")
    try:
        conn = sqlite3.connect(files.uri(local, read_only=True), uri=True)
        try:
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        verdict = str(exc)
    if verdict != "ok":
        raise BackupFailed(f"backup {manifest['key']} is not a sound SQLite database ({verdict}): "
                           "refused; the database was not touched")


def _replace(run: Run, local: Path, file: Path) -> None:
    """Copy local into file in one backup step (one transaction on file); a file busy with
    another connection's write is waited for within LOCK_WAIT_TIMEOUT."""
    limit, capped = run.limit(run.settings.lock_wait_timeout)
    deadline = run.clock() + limit

    def progress(status: int, remaining: int, total: int) -> None:
        run.cancel.check()
        if status in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) and run.clock() > deadline:
            run.stop_if_deadline(capped)
            raise BackupFailed(f"{file} stayed locked by another connection for {limit:g}s (the "
                               "application writing?): stop it or raise LOCK_WAIT_TIMEOUT; the "
                               "database was not touched")

    src = sqlite3.connect(files.uri(local, read_only=True), uri=True)
    dst = sqlite3.connect(files.uri(file), uri=True, timeout=BUSY_TIMEOUT)
    try:
        src.backup(dst, pages=-1, progress=progress)  # all pages in one step: all or nothing
    except sqlite3.Error as exc:
        raise BackupFailed(f"copying the backup into {file} failed ({exc}): it was rolled back, the "
                           "database is unchanged") from None
    finally:
        dst.close()
        src.close()
