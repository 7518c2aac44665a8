"""One GET of a backup object, hashed and counted while it is copied into a pipe or a file.

A thread of its own reads S3 while the caller watches the pipeline; the caller calls tick() at
least every second (progress, a stalled S3, cancellation), then check_digest() and
check_complete(): nothing built from the copy may be kept unless both pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from typing import IO, Any

from runner.backup import s3
from runner.backup.layout import Location
from runner.context import Run
from runner.errors import BackupFailed

CHUNK = 1 << 20
PROGRESS_EVERY = 5.0


class Feeder(threading.Thread):
    """GET the object once; hash and count it while copying it into the pipeline."""

    def __init__(self, run: Run, client: Any, loc: Location, manifest: dict[str, Any],
                 sink: IO[bytes]) -> None:
        super().__init__(name="restore-feeder", daemon=True)
        self.ctx, self.client, self.loc, self.manifest, self.sink = run, client, loc, manifest, sink
        self.digest = hashlib.sha256()
        self.size = 0
        self.done = False
        self.error: str | None = None
        self.write_error: OSError | None = None  # the sink refused a write (a full disk)
        self.t0 = self._logged = self._waited = run.clock()
        self._asking: float | None = None  # since when it waits for S3 (not for the pipeline)

    def run(self) -> None:  # type: ignore[override]
        m, clock = self.manifest, self.ctx.clock
        try:
            self._asking = clock()
            body = self.client.get_object(Bucket=self.loc.bucket, Key=m["key"])["Body"]
            while True:
                self._asking = clock()
                chunk = body.read(CHUNK)
                self._asking = None
                if not chunk:
                    break
                self.digest.update(chunk)
                self.size += len(chunk)
                try:
                    self.sink.write(chunk)
                except BrokenPipeError:
                    raise
                except OSError as exc:
                    self.write_error = exc
                    raise
            self.done = True
        except BrokenPipeError:
            self.error = "the restore pipeline stopped reading"
        except OSError as exc:
            self.error = f"writing the backup failed ({exc.strerror})"
        except Exception as exc:  # noqa: BLE001 - reported by the main thread, which rolls back
            self.error = f"reading backup {m['key']} failed: {s3.describe(exc, m['key'])}"
        finally:
            with contextlib.suppress(OSError):
                self.sink.close()

    def tick(self) -> None:
        """Called by the relay at least every second: progress, a stalled S3, cancellation."""
        run, now = self.ctx, self.ctx.clock()
        run.cancel.check()
        if now - self._logged >= PROGRESS_EVERY:
            self._logged = now
            took = now - self.t0
            run.log("restore.progress", f"{self.size / 1e6:.0f} of {self.manifest['size'] / 1e6:.0f} MB "
                    "read", bytes=self.size, mb_per_s=round(self.size / 1e6 / max(took, 1e-9), 1),
                    elapsed_s=round(took, 1))
        asking, every = self._asking, s3.wait_log_every(run.settings)
        if asking is not None and now - asking >= every and now - self._waited >= every:
            self._waited = now
            run.log.warning("s3.waiting", f"S3 has sent nothing of {self.manifest['key']} for "
                            f"{now - asking:.0f}s; still waiting", s3_timeout_s=run.settings.s3_timeout)

    def check_digest(self) -> None:
        """Raise when the whole object was read and does not match the manifest."""
        m = self.manifest
        if self.done and (self.size != m["size"] or self.digest.hexdigest() != m["sha256"]):
            raise BackupFailed(f"backup {m['key']} does not match its manifest (size {self.size} vs "
                               f"{m['size']}, sha256 {self.digest.hexdigest()[:12]}… vs "
                               f"{m['sha256'][:12]}…): refused; the database was not touched")

    def check_complete(self) -> None:
        """Raise unless the whole object was read."""
        if self.error or not self.done:
            raise BackupFailed(f"{self.error or 'the backup was not read to its end'}: refused; the "
                               "database is unchanged")
