"""Fetch a backup into a local file that pg_restore can seek in, verified before anything uses it.

One GET, sha256-hashed and counted as it streams, through `zstd -d` (for zstd backups) into a new
file readable only by the runner. The space it needs is checked first and logged; running out
anyway (a wrong estimate, a shared disk filling up) is a clean failure: the database has not
been touched at that point.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from runner import procs
from runner.backup import s3
from runner.backup.feeder import Feeder
from runner.backup.layout import Location
from runner.context import Run
from runner.errors import BackupFailed

MARGIN = 64 << 20  # bytes kept free beyond the archive: the disk is shared with others
MB = 1e6
CHUNK = 1 << 20
FETCH_JOBS = 4  # files of a directory-format dump fetched at a time
PROGRESS_EVERY = 5.0
DECOMPRESS = {"zstd": ["zstd", "-q", "-d", "-c"], "gzip": ["gzip", "-q", "-d", "-c"]}


def space_needed(manifest: dict[str, Any]) -> tuple[int, bool]:
    """Return (bytes the local copy takes, exact?). Manifests written before archive_size
    existed give an estimate: the database's size when it was backed up (a -Z0 archive has no
    indexes and no free space, but text and decompressed TOAST values can outgrow it)."""
    if manifest["format"] in ("directory", "sqlite"):
        return manifest["archive_size"], True
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
    filt = decompressor(manifest)
    err = tempfile.TemporaryFile()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    stages: list[subprocess.Popen[bytes]] = []
    try:
        if filt:  # the decompressor gets no password and writes the file itself
            stages.append(procs.spawn(filt, procs.child_env(), subprocess.PIPE,
                                      err, fix=f"install {filt[0]}", stdout=fd))
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


def decompressor(manifest: dict[str, Any]) -> list[str] | None:
    """The filter that turns the stored object back into the archive (pg_dump's own gzip
    compression stays in the archive; a SQLite file's gzip does not)."""
    compression = manifest["compression"]
    if compression == "zstd" or (compression == "gzip" and manifest["format"] == "sqlite"):
        return DECOMPRESS[compression]
    return None


def _failed(why: str, path: Path, code: int | None = None) -> str:
    full = code == errno.ENOSPC or "No space left" in why
    what = ("the disk filled up: free space, point BACKUP_WORKDIR at a larger volume, or set "
            "RESTORE_JOBS=1 (streams the backup, no local copy)") if full else why
    return (f"could not write the local copy of the backup to {path.parent} ({what}); the database "
            "was not touched")


def to_dir(run: Run, client: Any, loc: Location, manifest: dict[str, Any], dest: Path) -> None:
    """Fetch a directory-format dump's files into dest (FETCH_JOBS at a time), each checked
    against its size and sha256; raise BackupFailed on the first that does not match."""
    dest.mkdir(mode=0o700)
    stop = threading.Event()
    done = [0]
    files = manifest["files"]
    with concurrent.futures.ThreadPoolExecutor(FETCH_JOBS, thread_name_prefix="fetch") as pool:
        futures = [pool.submit(_file, run, client, loc, manifest["key"], f, dest, stop, done)
                   for f in files]
        try:
            t0 = logged = run.clock()
            pending = set(futures)
            while pending:
                finished, pending = concurrent.futures.wait(pending, timeout=0.5,
                                                            return_when=concurrent.futures.FIRST_EXCEPTION)
                for future in finished:
                    future.result()  # the first failure raises; the finally stops the rest
                run.cancel.check()
                if run.clock() - logged >= PROGRESS_EVERY:
                    logged = run.clock()
                    run.log("restore.progress", f"{done[0] / MB:.0f} of {manifest['size'] / MB:.0f} MB "
                            "fetched", bytes=done[0], elapsed_s=round(logged - t0, 1))
        finally:
            stop.set()


def _file(run: Run, client: Any, loc: Location, key: str, f: dict[str, Any], dest: Path,
          stop: threading.Event, done: list[int]) -> None:
    """GET one file of a directory-format dump, hash it, [zstd -d] it into dest/NAME."""
    where = f"{key}/{f['object']}"
    digest, size = hashlib.sha256(), 0
    err = tempfile.TemporaryFile()
    fd = os.open(dest / f["name"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    stages: list[subprocess.Popen[bytes]] = []
    try:
        if f["compression"] == "zstd":
            stages.append(procs.spawn(["zstd", "-q", "-d", "-c"], procs.child_env(), subprocess.PIPE,
                                      err, fix="install zstd", stdout=fd))
        sink = stages[0].stdin if stages else os.fdopen(os.dup(fd), "wb", buffering=0)
        assert sink is not None
        broken = False  # zstd stopped reading (not zstd data?): read on, so the digest can say
        try:
            body = client.get_object(Bucket=loc.bucket, Key=where)["Body"]
            while chunk := body.read(CHUNK):
                if stop.is_set() or run.cancel.is_set:
                    return
                digest.update(chunk)
                size += len(chunk)
                done[0] += len(chunk)
                if not broken:
                    try:
                        sink.write(chunk)
                    except BrokenPipeError:
                        broken = True
        except OSError as exc:
            raise BackupFailed(_failed(exc.strerror or str(exc), dest, exc.errno)) from None
        except s3.S3_ERRORS as exc:
            raise BackupFailed(f"reading backup file {where} failed: {s3.describe(exc, where)}; the "
                               "database was not touched") from None
        finally:
            with contextlib.suppress(OSError):
                sink.close()
        if size != f["size"] or digest.hexdigest() != f["sha256"]:
            raise BackupFailed(f"backup file {where} does not match its manifest (size {size} vs "
                               f"{f['size']}, sha256 {digest.hexdigest()[:12]}… vs {f['sha256'][:12]}…): "
                               "refused; the database was not touched")
        if stages and stages[0].wait():
            raise BackupFailed(_failed(procs.tail(err) or procs.describe_exit(stages[0].returncode), dest))
    finally:
        procs.reap(stages, [err])
        os.close(fd)
