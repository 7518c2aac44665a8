"""Back the database up to S3: pg_dump -> zstd -> multipart upload -> manifest (the commit point).

No temp file: the dump streams through a buffered reader into s3transfer, whose memory is
bounded by (parts kept in memory) x (part size). The part size comes from pg_database_size()
so the 10,000-part limit is never reached. Any failure aborts the multipart upload.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from s3transfer.manager import TransferConfig, TransferManager

from runner import db
from runner.backup import dump, s3
from runner.backup.layout import DIR_SUFFIX
from runner.backup.manifest import VERSION
from runner.context import Run
from runner.errors import BackupFailed, RunnerError
from runner.procs import check_client
from runner.revisions import DbState

MiB = 1 << 20
MIN_PART = 8 * MiB
MAX_PART = 5 * 1024 * MiB  # S3's own limit
TARGET_PARTS = 9000  # below S3's 10,000 with room for an underestimate
GROWTH = 4  # a dump can outgrow pg_database_size() (bytea as hex, TOAST-compressed values)
CONCURRENCY = 4  # parts in flight
M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)
IN_MEMORY_PARTS = 4  # parts queued or in flight; buffers peak near (IN_MEMORY_PARTS + 1) x part


def part_size(database_bytes: int) -> int:
    """Return a part size (whole MiB) that keeps a dump of GROWTH x the database under TARGET_PARTS."""
    need = math.ceil(database_bytes * GROWTH / TARGET_PARTS / MiB) * MiB
    return min(MAX_PART, max(MIN_PART, need))


def take(run: Run, state: DbState) -> dict[str, Any]:
    """Dump the database to S3 and write its manifest; return the manifest. Raise BackupFailed."""
    settings = run.settings
    loc = s3.Location.parse(settings.backup_s3_uri)
    pg_dump = check_client(run, settings.pg_dump_bin, "PG_DUMP_BIN")
    with db.connect(run, "backup-info") as conn:
        database, size, server = conn.execute(sa.text(
            "SELECT current_database(), pg_database_size(current_database()), "
            "current_setting('server_version')")).one()
        sysid = system_identifier(conn)
    client = s3.client(settings, run.cancel)
    s3.check_access(run, client, loc, database)
    s3.call(run, "listing incomplete uploads",
            lambda: s3.sweep_stale_uploads(client, loc, database, run.log))
    created = dt.datetime.now(dt.UTC)
    dump_args, filt, suffix = dump.COMPRESSION[settings.backup_compression]
    jobs = settings.backup_jobs
    key = loc.new_key(database, created, run.run_id, suffix if jobs == 1 else DIR_SUFFIX)
    part = part_size(size)
    run.log("backup.start", f"backing up {database} ({size / 1e6:.0f} MB on disk) to {loc.uri(key)}"
            + (f" with {jobs} jobs (directory format)" if jobs > 1 else ""),
            compression=settings.backup_compression, part_mib=part // MiB, jobs=jobs)
    args = [settings.pg_dump_bin, "--no-password",
            f"--lock-wait-timeout={int(settings.backup_lock_wait_timeout * 1000)}"]
    if jobs > 1:  # pg_dump -Fd -j: one file per table, each shipped as it is closed
        fields = _directory(run, client, loc, key, [*args, *dump_args], jobs, part)
    else:
        with dump.pipeline(run, [*args, "--format=custom", *dump_args], filt) as (stream, reader):
            upload(run, client, loc, key, reader, part)
            took = stream.elapsed()
        fields = {"size": stream.size, "sha256": stream.sha256.hexdigest(), "format": "custom",
                  "archive_size": stream.archive_size, "duration_s": round(took, 2)}
    manifest = {
        "manifest_version": VERSION, "key": key, "bucket": loc.bucket, **fields,
        "compression": settings.backup_compression, "pg_dump_version": pg_dump,
        "server_version": server, "system_identifier": sysid, "database": database,
        "database_size": size,
        "alembic_revision": list(state.heads), "version_table": state.version_table,
        "version_schema": state.version_schema, "created": created.isoformat(timespec="seconds"),
        "run_id": run.run_id,
    }
    took = manifest["duration_s"]
    try:
        s3.write_manifest(run, client, loc, manifest)
    except s3.S3_ERRORS as exc:
        raise BackupFailed(f"the dump was uploaded but its manifest was not written "
                           f"({s3.describe(exc, key)}); nothing was migrated") from None
    run.log("backup.done", f"backup {loc.uri(key)} complete", bytes=manifest["size"],
            mb_per_s=round(manifest["size"] / 1e6 / max(took, 1e-9), 1), seconds=round(took, 1),
            sha256=manifest["sha256"])
    return manifest


def _directory(run: Run, client: Any, loc: s3.Location, key: str, args: list[str], jobs: int,
               part: int) -> dict[str, Any]:
    """The parallel dump: check the local disk it needs, then run it (runner.backup.dirdump)."""
    from runner.backup import dirdump

    where = Path(run.settings.backup_workdir or tempfile.gettempdir())
    with db.connect(run, "backup-info") as conn:  # at worst the jobs largest tables at once
        need = int(conn.execute(sa.text(
            "SELECT coalesce(sum(s), 0) FROM (SELECT pg_catalog.pg_table_size(c.oid) AS s "
            "FROM pg_catalog.pg_class c WHERE c.relkind IN ('r', 'm') ORDER BY 1 DESC LIMIT :n) x"),
            {"n": jobs}).scalar_one())
    try:
        free = shutil.disk_usage(where).free
    except OSError as exc:
        raise BackupFailed(f"BACKUP_WORKDIR={where} cannot be used ({exc.strerror}); nothing was "
                           "migrated") from None
    run.log("backup.space", f"the dump's files wait in {where} until shipped: about {need / 1e6:.0f} MB "
            f"at most (the {jobs} largest tables); {free / 1e6:.0f} MB free", bytes_needed=need,
            bytes_free=free)
    if need > free:
        raise BackupFailed(f"BACKUP_JOBS={jobs} needs about {need / 1e6:.0f} MB in {where} "
                           f"(BACKUP_WORKDIR) for the largest tables' files and {free / 1e6:.0f} MB are "
                           "free: free space, point BACKUP_WORKDIR at a larger volume, or set "
                           "BACKUP_JOBS=1 (streams, no local disk); nothing was migrated")
    with tempfile.TemporaryDirectory(prefix=f"runner-dump-{run.run_id}-", dir=where) as work:
        return dirdump.dump(run, client, loc, key, args, jobs, part, Path(work))


def system_identifier(conn: sa.Connection) -> str | None:
    """Return the cluster's system identifier (it tells servers apart), or None when this role
    may not read it (pg_control_system() is executable by PUBLIC unless an administrator revoked it)."""
    try:
        with conn.begin_nested():
            return str(conn.execute(sa.text(
                "SELECT system_identifier FROM pg_catalog.pg_control_system()")).scalar_one())
    except sa.exc.DBAPIError:
        return None


def _mmap_part_buffers() -> None:
    """Have glibc serve part-sized buffers with mmap, so freed parts go back to the OS.

    By default glibc raises its mmap threshold after the first large free and then keeps
    part buffers in per-thread arenas: RSS creeps up with the dump's length.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 1 << 20)


def upload(run: Run, client: Any, loc: s3.Location, key: str, reader: Any, part: int) -> None:
    """Stream reader into one object; on any failure the multipart upload is aborted."""
    _mmap_part_buffers()
    cfg = TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                         max_request_concurrency=CONCURRENCY, max_submission_concurrency=2,
                         max_in_memory_upload_chunks=IN_MEMORY_PARTS)
    requests = s3.Requests(client, run.clock)
    with TransferManager(client, cfg) as manager:
        future = manager.upload(reader, loc.bucket, key, extra_args={
            "ContentType": "application/octet-stream"})
        with run.cancel.on_cancel(future.cancel):
            try:
                _wait(run, future, requests, loc.uri(key))
                future.result()
            except RunnerError:
                raise
            except Exception as exc:  # noqa: BLE001 - S3, network, or cancellation
                run.cancel.check()
                raise BackupFailed(f"upload to {loc.uri(key)} failed: {s3.describe(exc, key)}; "
                                   "nothing was migrated") from None


def _wait(run: Run, future: Any, requests: s3.Requests, where: str) -> None:
    """Return when the upload is done; say so while an S3 request has not been answered; raise
    the run's cancellation at once."""
    every = s3.wait_log_every(run.settings)
    logged = run.clock()
    while not future.done():
        run.cancel.sleep(0.2)
        waited = requests.oldest()
        if waited >= every and run.clock() - logged >= every:
            logged = run.clock()
            run.log.warning("s3.waiting", f"S3 has not answered an upload request for {where} for "
                            f"{waited:.0f}s; still waiting", s3_timeout_s=run.settings.s3_timeout,
                            attempts=s3.ATTEMPTS)
