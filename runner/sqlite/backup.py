"""Back a SQLite file up to S3: SQLite's online backup API -> a local copy -> [zstd|gzip] -> the
same multipart upload, digest and manifest (format `sqlite`, the commit point) as a pg_dump.

The backup API copies the database page by page and starts over when another connection writes
to it meanwhile, so the copy is one consistent state of the database, also while the application
writes. The copy goes to a temporary file (BACKUP_WORKDIR, or the system's temporary directory):
one file, the size of the database; it is compressed and uploaded as it is read, then removed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from runner import procs
from runner.backup import s3
from runner.backup.layout import SQLITE_SUFFIXES
from runner.backup.manifest import SQLITE, VERSION
from runner.backup.take import part_size, upload
from runner.context import Run
from runner.errors import BackupFailed
from runner.revisions import DbState
from runner.sqlite import files
from runner.sqlite.engine import BUSY_TIMEOUT

PAGES_PER_STEP = 4096  # pages copied per backup step (16 MiB at 4 KiB pages): progress, cancellation
PROGRESS_EVERY = 5.0
COMPRESS = {"zstd": ["zstd", "-q", "-c", "-1", "-T0"], "gzip": ["gzip", "-c", "-1"]}


def take(run: Run, state: DbState) -> dict[str, Any]:
    """Copy the database file consistently, upload it and write its manifest; return the manifest.
    Raise BackupFailed (exit 5): nothing is migrated without a committed backup."""
    settings, url = run.settings, run.settings.database_url
    loc = s3.Location.parse(settings.backup_s3_uri)
    source, database = files.path(url), str(url.name)
    client = s3.client(settings, run.cancel)
    s3.check_access(run, client, loc, database)
    s3.call(run, "listing incomplete uploads",
            lambda: s3.sweep_stale_uploads(client, loc, database, run.log))
    created = dt.datetime.now(dt.UTC)
    compression = settings.backup_compression
    key = loc.new_key(database, created, run.run_id, SQLITE_SUFFIXES[compression])
    where = Path(settings.backup_workdir or tempfile.gettempdir())
    t0 = run.clock()
    with _workdir(run, where) as work:
        copy = work / "copy.sqlite"
        _copy(run, source, copy)
        archive = copy.stat().st_size
        run.log("backup.start", f"backing up {source} ({archive / 1e6:.1f} MB, a consistent copy) to "
                f"{loc.uri(key)}", compression=compression)
        with _stream(run, copy, compression) as stream:
            upload(run, client, loc, key, io.BufferedReader(stream, 1 << 20), part_size(archive))
    took = round(run.clock() - t0, 2)
    manifest = {
        "manifest_version": VERSION, "key": key, "bucket": loc.bucket, "size": stream.size,
        "sha256": stream.sha256.hexdigest(), "format": SQLITE, "archive_size": archive,
        "duration_s": took, "compression": compression, "sqlite_version": sqlite3.sqlite_version,
        "server_version": sqlite3.sqlite_version, "system_identifier": None, "database": database,
        "database_size": archive, "path": str(source), "alembic_revision": list(state.heads),
        "version_table": state.version_table, "version_schema": state.version_schema,
        "created": created.isoformat(timespec="seconds"), "run_id": run.run_id,
    }
    try:
        s3.write_manifest(run, client, loc, manifest)
    except s3.S3_ERRORS as exc:
        raise BackupFailed(f"the copy was uploaded but its manifest was not written "
                           f"({s3.describe(exc, key)}); nothing was migrated") from None
    run.log("backup.done", f"backup {loc.uri(key)} complete", bytes=manifest["size"], seconds=took,
            sha256=manifest["sha256"])
    return manifest


@contextlib.contextmanager
def _workdir(run: Run, where: Path) -> Iterator[Path]:
    try:
        work = tempfile.TemporaryDirectory(prefix=f"runner-backup-{run.run_id}-", dir=where)
    except OSError as exc:
        raise BackupFailed(f"BACKUP_WORKDIR={where} cannot be used for the copy of the database "
                           f"({exc.strerror or exc}): fix it or point BACKUP_WORKDIR elsewhere; "
                           "nothing was migrated") from None
    with work as name:
        yield Path(name)


def _copy(run: Run, source: Path, copy: Path) -> None:
    """Copy source into copy with SQLite's online backup API: one consistent state of source."""
    free = shutil.disk_usage(copy.parent).free
    if source.stat().st_size > free:
        raise BackupFailed(f"the copy of {source} needs {source.stat().st_size / 1e6:.0f} MB in "
                           f"{copy.parent} (BACKUP_WORKDIR) and {free / 1e6:.0f} MB are free: free "
                           "space or point BACKUP_WORKDIR at a larger volume; nothing was migrated")
    logged = [run.clock()]

    def progress(status: int, remaining: int, total: int) -> None:
        run.cancel.check()  # SIGTERM or RUN_DEADLINE: abandon the copy
        if run.clock() - logged[0] >= PROGRESS_EVERY:
            logged[0] = run.clock()
            run.log("backup.progress", f"copied {total - remaining} of {total} pages",
                    pages=total - remaining, of=total)

    src = sqlite3.connect(files.uri(source), uri=True, timeout=BUSY_TIMEOUT)
    dst = sqlite3.connect(copy)
    try:
        src.backup(dst, pages=PAGES_PER_STEP, progress=progress)
    except sqlite3.Error as exc:
        raise BackupFailed(f"copying {source} failed ({exc}); nothing was migrated") from None
    finally:
        dst.close()
        src.close()


class _Stream(io.RawIOBase):
    """The compressor's output (or the copy itself): counted and hashed as the upload reads it;
    at its end, a compressor that failed fails the upload (s3transfer then aborts it)."""

    def __init__(self, run: Run, source: IO[bytes], proc: subprocess.Popen[bytes] | None,
                 err: IO[bytes]) -> None:
        self.run, self.source, self.proc, self.err = run, source, proc, err
        self.sha256 = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.source.readinto(buffer)  # type: ignore[attr-defined]
        if not n:
            self._finish()
            return 0
        self.sha256.update(memoryview(buffer)[:n])
        self.size += n
        return n

    def _finish(self) -> None:
        if self.proc is None:
            return
        code = self.proc.wait()
        self.run.cancel.check()
        if code:
            raise BackupFailed(f"{self.proc.args[0]} exited with {procs.describe_exit(code)}: "  # type: ignore[index]
                               f"{procs.tail(self.err) or 'no message'}; nothing was migrated")


@contextlib.contextmanager
def _stream(run: Run, copy: Path, compression: str) -> Iterator[_Stream]:
    """Yield the stream to upload: the copy through the compressor, or the copy as it is."""
    err = tempfile.TemporaryFile()
    stages: list[subprocess.Popen[bytes]] = []
    with open(copy, "rb", buffering=0) as raw:
        try:
            filt = COMPRESS.get(compression)
            if filt:
                stages.append(procs.spawn(filt, procs.child_env(), raw, err,
                                          fix="install it or pick another BACKUP_COMPRESSION"))
                out = stages[0].stdout
                assert out is not None
                stream = _Stream(run, out, stages[0], err)
            else:
                stream = _Stream(run, raw, None, err)
            with run.cancel.on_cancel(lambda: procs.terminate(stages)):
                yield stream
        finally:
            procs.reap(stages, [err])
