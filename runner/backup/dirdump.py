"""Parallel dump (BACKUP_JOBS above 1): pg_dump -Fd -j N, each file shipped to S3 as pg_dump closes it.

pg_dump's directory format writes one file per table (and toc.dat last) into a local directory;
it cannot write to a pipe. An inotify watch sees each file closed; a pool uploads it at once
(through `zstd -1`, or as it is when small or already compressed) under KEY/NAME and deletes it,
counting and sha256-hashing what was stored. So the local disk holds only the files being
written or waiting for their upload: at worst the N largest tables, uncompressed, never the whole
dump. Any failure — pg_dump, zstd, an upload — stops the rest; the objects already stored are
deleted (without a manifest they never were a backup), and nothing is migrated.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any

from s3transfer.manager import TransferConfig, TransferManager

from runner import procs
from runner.backup import s3
from runner.backup.dump import hint
from runner.backup.inotify import IN_CLOSE_WRITE, IN_MOVED_TO, Watch
from runner.backup.layout import Location
from runner.backup.manifest import FILE_NAME, files_digest
from runner.context import Run
from runner.errors import BackupFailed, RunnerError

SMALL = 1 << 20  # files below this are stored as they are: one PUT, no compressor process
MB = 1e6
PROGRESS_EVERY = 5.0


class _Compressed(io.RawIOBase):
    """zstd's output for one file: counted, hashed; raises at EOF when zstd failed."""

    def __init__(self, proc: subprocess.Popen[bytes], err: IO[bytes]) -> None:
        self.proc, self.err = proc, err
        self.sha256, self.size = hashlib.sha256(), 0
        assert proc.stdout is not None
        self._fd = proc.stdout.fileno()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = os.readv(self._fd, [buffer])
        if not n:
            code = self.proc.wait()
            if code:
                raise BackupFailed(f"zstd exited with {procs.describe_exit(code)}: {procs.tail(self.err)}")
            return 0
        self.sha256.update(memoryview(buffer)[:n])
        self.size += n
        return n


class Shipper:
    """Upload the files of one dump directory as they are closed; remember what was stored."""

    def __init__(self, run: Run, client: Any, loc: Location, key: str, compress: bool, part: int,
                 jobs: int) -> None:
        self.run, self.client, self.loc, self.key, self.compress = run, client, loc, key, compress
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs + 1, thread_name_prefix="ship")
        self.manager = TransferManager(client, TransferConfig(
            multipart_threshold=part, multipart_chunksize=part, max_request_concurrency=4,
            max_submission_concurrency=jobs + 1, max_in_memory_upload_chunks=4))
        self.futures: dict[str, concurrent.futures.Future[dict[str, Any]]] = {}
        self.stored: list[str] = []  # object keys, to delete when the dump fails

    def ship(self, path: Path) -> None:
        """Upload path in the background (once per name)."""
        if path.name not in self.futures:
            if not FILE_NAME.fullmatch(path.name):
                raise BackupFailed(f"pg_dump wrote a file the runner does not know ({path.name}): "
                                   "use a pg_dump of a supported release; nothing was migrated")
            self.futures[path.name] = self.pool.submit(self._one, path)

    def _one(self, path: Path) -> dict[str, Any]:
        self.run.cancel.check()
        raw = path.stat().st_size
        compress = self.compress and raw >= SMALL and not path.name.endswith(".gz")
        name = path.name + (".zst" if compress else "")
        key = f"{self.key}/{name}"
        if compress:
            err = tempfile.TemporaryFile()
            proc = procs.spawn(["zstd", "-q", "-c", "-1", "-T1", str(path)], procs.child_env(),
                               subprocess.DEVNULL, err, fix="install zstd or set BACKUP_COMPRESSION=none")
            try:
                stream = _Compressed(proc, err)
                self.stored.append(key)
                self.manager.upload(io.BufferedReader(stream, buffer_size=1 << 20), self.loc.bucket,
                                    key).result()
                size, digest = stream.size, stream.sha256.hexdigest()
            finally:
                procs.reap([proc], [err])
        else:
            body = path.read_bytes()
            self.stored.append(key)
            s3.call(self.run, f"writing {self.loc.uri(key)}", lambda: self.client.put_object(
                Bucket=self.loc.bucket, Key=key, Body=body))
            size, digest = len(body), hashlib.sha256(body).hexdigest()
        path.unlink()
        return {"name": path.name, "object": name, "compression": "zstd" if compress else "none",
                "size": size, "sha256": digest, "archive_size": raw}

    def progress(self) -> tuple[int, int]:
        """(files stored, bytes stored) so far."""
        done = [f.result() for f in self.futures.values() if f.done() and not f.exception()]
        return len(done), sum(d["size"] for d in done)

    def results(self) -> list[dict[str, Any]]:
        """Wait for every upload; raise the first failure."""
        files = []
        for name in sorted(self.futures):
            try:
                files.append(self.futures[name].result())
            except RunnerError:
                raise
            except s3.S3_ERRORS as exc:
                raise BackupFailed(f"upload of {name} failed: {s3.describe(exc, self.key)}; nothing was "
                                   "migrated") from None
        return files

    def abandon(self) -> None:
        """Stop, and delete what was stored: without its manifest it is no backup."""
        for future in self.futures.values():
            future.cancel()
        with contextlib.suppress(Exception):  # first: uploads in flight fail, their threads end
            self.manager.shutdown(cancel=True)
        self.pool.shutdown(wait=True, cancel_futures=True)
        for key in self.stored:
            with contextlib.suppress(Exception):
                self.client.delete_object(Bucket=self.loc.bucket, Key=key)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.manager.shutdown()


def dump(run: Run, client: Any, loc: Location, key: str, args: list[str], jobs: int, part: int,
         workdir: Path) -> dict[str, Any]:
    """Run pg_dump -Fd -j jobs (args: pg_dump and its options) into workdir, shipping each file
    under key/; return the manifest's fields. Raise BackupFailed; nothing is left behind."""
    out = workdir / "dump"
    out.mkdir()
    watch = Watch(str(out))
    ship = Shipper(run, client, loc, key, run.settings.backup_compression == "zstd", part, jobs)
    err = tempfile.TemporaryFile()
    env, conninfo = procs.libpq_env(run, "backup")
    proc = procs.spawn([*args, "--format=directory", f"--jobs={jobs}", "--file", str(out),
                        "--dbname", conninfo], env, subprocess.DEVNULL, err,
                       fix="install it or point PG_DUMP_BIN at it", stdout=subprocess.DEVNULL)
    t0, ok = run.clock(), False
    logged = t0
    try:
        with run.cancel.on_cancel(lambda: procs.terminate([proc])):
            while proc.poll() is None:
                _ship_closed(watch, ship, out, 0.2)
                run.cancel.check()
                if run.clock() - logged >= PROGRESS_EVERY:
                    logged = run.clock()
                    count, stored = ship.progress()
                    run.log("backup.progress", f"{count} file(s), {stored / MB:.0f} MB stored so far",
                            files=count, bytes=stored, elapsed_s=round(logged - t0, 1))
            run.cancel.check()
            if proc.returncode:
                last = procs.tail(err) or procs.describe_exit(proc.returncode)
                raise BackupFailed(f"pg_dump exited with {procs.describe_exit(proc.returncode)}: "
                                   f"{last}{hint(last)}; nothing was migrated")
            _ship_closed(watch, ship, out, 0)
            for path in sorted(out.iterdir()):  # whatever the watch may have missed
                ship.ship(path)
            files = ship.results()
        ok = True
    finally:
        procs.reap([proc], [err])
        watch.close()
        if ok:
            ship.close()
        else:
            ship.abandon()
        shutil.rmtree(out, ignore_errors=True)
    took = run.clock() - t0
    return {"format": "directory", "files": files, "size": sum(f["size"] for f in files),
            "sha256": files_digest(files), "archive_size": sum(f["archive_size"] for f in files),
            "duration_s": round(took, 2), "jobs": jobs}


def _ship_closed(watch: Watch, ship: Shipper, out: Path, timeout: float) -> None:
    for name, mask in watch.events(timeout):
        if name and mask & (IN_CLOSE_WRITE | IN_MOVED_TO):
            ship.ship(out / name)

