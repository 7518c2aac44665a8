"""Fetch a backup into a local file that pg_restore can seek in, verified before anything uses it.

One GET, sha256-hashed and counted as it streams, through `zstd -d` (for zstd backups) into a new
file readable only by the runner. The space it needs is checked first and logged; running out
anyway (a wrong estimate, a shared disk filling up) is a clean failure: the database has not
been touched at that point.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from runner import procs
from runner.backup.feeder import Feeder
from runner.backup.layout import Location
from runner.context import Run
from runner.errors import BackupFailed

MARGIN = 64 << 20  # bytes kept free beyond the archive: the disk is shared with others
MB = 1e6


def space_needed(manifest: dict[str, Any]) -> tuple[int, bool]:
    """Return (bytes the local copy takes, exact?). Manifests written before archive_size
    existed give an estimate: the database's size when it was backed up (a -Z0 archive has no
    indexes and no free space, but text and decompressed TOAST values can outgrow it)."""
    if manifest["compression"] != "zstd":
        return manifest["size"], True
    if isinstance(manifest.get("archive_size"), int):
        return manifest["archive_size"], True
    return max(int(manifest.get("database_size") or 0), manifest["size"] * 4), False


def workdir(run: Run) -> Path:
    """The directory local copies go to (BACKUP_WORKDIR, or the system's temporary directory)."""
    return Path(run.settings.backup_workdir or tempfile.gettempdir())


def check_space(run: Run, manifest: dict[str, Any]) -> str | None:
    """Return why the local copy cannot fit (None when it can); log what it needs."""
    need, exact = space_needed(manifest)
    where = workdir(run)
    try:
        free = shutil.disk_usage(where).free
    except OSError as exc:
        return f"BACKUP_WORKDIR={where} cannot be used ({exc.strerror})"
    about = "" if exact else "about "
    run.log("restore.space", f"the verified local copy of the backup needs {about}{need / MB:.0f} MB "
            f"in {where}; {free / MB:.0f} MB free", bytes_needed=need, bytes_free=free, exact=exact)
    if need + MARGIN > free:
        return (f"the local copy needs {about}{need / MB:.0f} MB in {where} (BACKUP_WORKDIR) and only "
                f"{free / MB:.0f} MB are free")
    return None


def to_file(run: Run, client: Any, loc: Location, manifest: dict[str, Any], path: Path) -> None:
    """Write the backup's archive to path; raise BackupFailed unless its object matched the manifest."""
    zstd = manifest["compression"] == "zstd"
    err = tempfile.TemporaryFile()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    stages: list[subprocess.Popen[bytes]] = []
    try:
        if zstd:  # the decompressor gets no password and writes the file itself
            stages.append(procs.spawn(["zstd", "-q", "-d", "-c"], procs.child_env(), subprocess.PIPE,
                                      err, fix="install zstd", stdout=fd))
            sink = stages[0].stdin
        else:
            sink = os.fdopen(os.dup(fd), "wb", buffering=0)
        assert sink is not None
        feeder = Feeder(run, client, loc, manifest, sink)
        with run.cancel.on_cancel(lambda: procs.terminate(stages)):
            feeder.start()
            while feeder.is_alive():
                feeder.join(0.5)
                feeder.tick()
            codes = [p.wait() for p in stages]
        run.cancel.check()
        feeder.check_digest()
        if codes and codes[0]:
            raise BackupFailed(_failed(procs.tail(err) or procs.describe_exit(codes[0]), path))
        if feeder.write_error is not None:
            exc = feeder.write_error
            raise BackupFailed(_failed(exc.strerror or str(exc), path, exc.errno))
        feeder.check_complete()
    except OSError as exc:
        raise BackupFailed(_failed(exc.strerror or str(exc), path, exc.errno)) from None
    finally:
        procs.reap(stages, [err])
        os.close(fd)


def _failed(why: str, path: Path, code: int | None = None) -> str:
    full = code == errno.ENOSPC or "No space left" in why
    what = ("the disk filled up: free space, point BACKUP_WORKDIR at a larger volume, or set "
            "RESTORE_JOBS=1 (streams the backup, no local copy)") if full else why
    return (f"could not write the local copy of the backup to {path.parent} ({what}); the database "
            "was not touched")
