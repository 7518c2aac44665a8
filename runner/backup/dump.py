"""pg_dump (piped through zstd) as a readable stream that counts, hashes and fails loudly.

The stream raises at EOF when pg_dump or the compressor exited non-zero: s3transfer then aborts
the multipart upload. Without that, a dump cut short is completed and stored as a good backup.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import IO, Any

from runner.context import Run
from runner.errors import BackupFailed
from runner.procs import child_env, describe_exit, libpq_env, reap, spawn, tail, terminate

PROGRESS_EVERY = 5.0  # seconds between backup.progress events
READ_BUFFER = 1 << 20  # the BufferedReader's buffer: s3transfer's read(part) then fills a whole part

# what each BACKUP_COMPRESSION adds to pg_dump's arguments, the filter after it, and the suffix
COMPRESSION: dict[str, tuple[list[str], list[str] | None, str]] = {
    # -vv --no-progress: zstd's last words give the exact bytes it read (the archive's size,
    # which a parallel restore needs on local disk); no progress lines
    "zstd": (["-Z0"], ["zstd", "-vv", "--no-progress", "-c", "-1", "-T0"], ".pgdump.zst"),
    "gzip": ([], None, ".pgdump"),
    "none": (["-Z0"], None, ".pgdump"),
}


class DumpStream(io.RawIOBase):
    """Read a pipeline's output; count bytes, sha256 them, log progress, raise on a failed exit."""

    def __init__(self, run: Run, procs: list[subprocess.Popen[bytes]], names: list[str],
                 stderr_files: list[IO[bytes]], clock: Callable[[], float] = time.monotonic) -> None:
        self.run, self.procs, self.names, self.stderr_files = run, procs, names, stderr_files
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.archive_size: int | None = None  # what pg_dump wrote, before the compressor
        self.clock = clock
        self.t0 = self._last = clock()
        out = procs[-1].stdout
        assert out is not None
        # the raw descriptor: a read returns what the pipe holds now (a buffered file object
        # would block until the whole part is there, and progress would lag by a part)
        self._fd = out.fileno()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, 1 << 20)  # fewer, larger reads (Linux)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = os.readv(self._fd, [buffer])
        if not n:
            self._finish()
            return 0
        self.sha256.update(memoryview(buffer)[:n])
        self.size += n
        now = self.clock()
        if now - self._last >= PROGRESS_EVERY:
            self._last = now
            took = now - self.t0
            self.run.log("backup.progress", f"{self.size / 1e6:.0f} MB streamed so far",
                         bytes=self.size, mb_per_s=round(self.size / 1e6 / max(took, 1e-9), 1),
                         elapsed_s=round(took, 1))
        return n

    def _finish(self) -> None:
        """At EOF: every process must have exited 0, else the upload must fail."""
        codes = [p.wait() for p in self.procs]
        self.run.cancel.check()  # SIGTERM or deadline: say so, not "pg_dump failed"
        for name, code, err in zip(self.names, codes, self.stderr_files, strict=True):
            if code != 0:
                last = tail(err) or "no message"
                raise BackupFailed(f"{name} exited with {describe_exit(code)}: {last}{hint(last)}; "
                                   "nothing was migrated")
        self.archive_size = self.size if len(self.procs) == 1 else read_size(self.stderr_files[-1])

    def elapsed(self) -> float:
        return self.clock() - self.t0


def read_size(err: IO[bytes]) -> int | None:
    """The bytes zstd -vv read ("(123 B => 45 B"), or None when its output says otherwise."""
    err.seek(0)
    found = re.findall(rb"\(\s*(\d+) B =>", err.read())
    return int(found[-1]) if found else None


def hint(message: str) -> str:
    """Say what a pg_dump failure means. pg_dump's first query on each table is LOCK TABLE, so
    both a missing privilege and a lock wait name it: the privilege is checked first."""
    if "permission denied" in message:
        return ("; the role lacks a privilege pg_dump needs (it reads every table, sequence and "
                "large object in the database): grant SELECT on what is named and USAGE on its "
                "schema, or pg_read_all_data (PostgreSQL 14+), or back up as the owner")
    if "lock timeout" in message or "LOCK TABLE" in message:
        return ("; another session holds a conflicting table lock: find it in pg_locks, or raise "
                "BACKUP_LOCK_WAIT_TIMEOUT")
    return ""


@contextlib.contextmanager
def pipeline(run: Run, dump_args: list[str], filt: list[str] | None) -> Any:
    """Start pg_dump [| filter]; yield a buffered reader over the output; always clean up.

    The processes get their own process group (so a wrapper's children die with them) and
    the signals the runner blocks; a cancel terminates them, which ends the stream.
    """
    env, conninfo = libpq_env(run, "backup")
    procs: list[subprocess.Popen[bytes]] = []
    errs = [tempfile.TemporaryFile() for _ in range(2 if filt else 1)]
    names = [os.path.basename(dump_args[0])] + ([filt[0]] if filt else [])
    try:
        procs.append(spawn([*dump_args, "--dbname", conninfo], env, subprocess.DEVNULL, errs[0],
                           fix="install it or point PG_DUMP_BIN at it"))
        if filt:  # the compressor gets no password
            procs.append(spawn(filt, child_env(), procs[0].stdout, errs[1],
                               fix="install it or pick another BACKUP_COMPRESSION"))
            procs[0].stdout.close()  # type: ignore[union-attr] # only the filter reads it now
        stream = DumpStream(run, procs, names, errs)
        with run.cancel.on_cancel(lambda: terminate(procs)):
            run.cancel.check()  # a signal that came before the callback was registered
            yield stream, io.BufferedReader(stream, buffer_size=READ_BUFFER)
    finally:
        reap(procs, errs)


