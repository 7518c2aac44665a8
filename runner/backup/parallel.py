"""Parallel restore (RESTORE_JOBS above 1): a verified local copy, N jobs into a new database,
swapped in by renames. Every guarantee of the one-transaction restore holds:

- the digest is verified before the database is touched: the object is fetched whole into a
  local file (size and sha256 checked as it streams, runner.backup.fetch) before anything else;
- the database ends as the backup or unchanged: pg_restore -j (which cannot run in one
  transaction) fills a new database (runner.backup.staging); the target changes only in the
  swap's one transaction, and any failure before it drops the new database;
- never another database's data: the manifest checks are the same, the new database is the
  run's own (by name and OID), and the backup restored is the one verified;
- the same exit codes: a bad backup 5, sessions that cannot be ended 8 (nothing changed).

What it needs beyond a streamed restore, checked before anything is fetched (RESTORE_JOBS=auto
falls back to one transaction when it is missing, an explicit RESTORE_JOBS refuses): CREATEDB,
ownership of the database, a maintenance database to connect to, the right to end the other
sessions on it, and local disk for the archive.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any

from runner import db, ledger, procs
from runner.backup import fetch
from runner.backup.layout import Location
from runner.backup.restore import Target, Tools
from runner.backup.staging import Staging, why_not
from runner.context import Run
from runner.errors import BackupFailed, ConfigError

PROGRESS_EVERY = 5.0
MB = 1e6
# RESTORE_JOBS=auto restores smaller archives in one transaction: fetching before restoring, a
# new database and the swap cost seconds that parallel jobs do not win back below this size
AUTO_MIN = 1_000_000_000


def available_cpus() -> int:
    """CPUs this process may use: its affinity, bounded by a cgroup v2 CPU quota (containers)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def jobs_for(run: Run, manifest: dict[str, Any], target: Target) -> int:
    """Return how many jobs this restore uses: 1 means one streamed transaction.

    RESTORE_JOBS=auto uses the CPUs available for an archive of AUTO_MIN or more when a parallel
    restore can run here, and says why not when it cannot; an explicit RESTORE_JOBS above 1 that
    cannot run is refused. (A directory-format dump is copied locally either way.)"""
    wanted = run.settings.restore_jobs
    jobs = wanted or available_cpus()
    if jobs == 1:
        return 1
    with db.connect(run, "restore-info") as conn:
        blocked = why_not(run, conn)
    if blocked and wanted:
        raise ConfigError(f"RESTORE_JOBS={wanted}: {blocked}; set RESTORE_JOBS=1 to restore in place, "
                          "in one transaction; nothing was changed")
    space = None if blocked else fetch.check_space(run, manifest)
    if space and wanted:
        raise BackupFailed(f"RESTORE_JOBS={wanted}: {space}: free space, point BACKUP_WORKDIR at a "
                           "larger volume, or set RESTORE_JOBS=1 (streams the backup, no local copy); "
                           "the database was not touched")
    if blocked or space:
        run.log("restore.one_transaction", f"restoring in one transaction, not with {jobs} jobs: "
                f"{blocked or space}")
        return 1
    need, _ = fetch.space_needed(manifest)
    if not wanted and need < AUTO_MIN and manifest["format"] != "directory":
        run.log("restore.one_transaction", f"restoring in one transaction: the archive "
                f"({need / MB:.0f} MB) is under {AUTO_MIN / MB:.0f} MB, where a new database and the "
                "swap cost more than parallel jobs save (RESTORE_JOBS=N forces them)")
        return 1
    return jobs


_ERROR = re.compile(rb"^pg_restore: error: (.*)$", re.MULTILINE)
_IGNORED = re.compile(rb"errors ignored on restore: (\d+)")
_COMMAND = re.compile(rb"^Command was: (.*)$", re.MULTILINE)
_TIMEOUT = b'unrecognized configuration parameter "transaction_timeout"'


def only_transaction_timeout(err: IO[bytes]) -> bool:
    """Whether every error pg_restore reported is the SET transaction_timeout an older server
    refuses, each for that one command (its count of ignored errors covers the leader's
    connection only, so it may be lower than the messages)."""
    err.seek(0)
    text = err.read()
    errors = _ERROR.findall(text)
    commands = _COMMAND.findall(text)
    counted = [int(n) for n in _IGNORED.findall(text)]
    return (bool(errors) and all(_TIMEOUT in e for e in errors)
            and all(c.strip() == b"SET transaction_timeout = 0;" for c in commands)
            and len(counted) == 1 and 0 < counted[0] <= len(errors))


def restore(run: Run, client: Any, loc: Location, manifest: dict[str, Any], target: Target,
            tools: Tools, jobs: int) -> None:
    """Fetch and verify, restore with jobs into a new database, swap it in (see the docstring)."""
    where = Path(tempfile.mkdtemp(prefix=f"runner-restore-{run.run_id}-", dir=fetch.workdir(run)))
    staging = Staging(run, target.database)
    try:
        # the new database is created while the backup is fetched (it does not touch the target)
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="staging") as pool:
            created = pool.submit(_prepare, staging)
            try:
                t0 = run.clock()
                archive = _fetch(run, client, loc, manifest, where)
                fetched = run.clock() - t0
                run.log("restore.fetched", f"{manifest['key']} verified (size and sha256) into a "
                        "local copy", seconds=round(fetched, 1))
                created.result()
                _pg_restore(run, tools, staging, archive, jobs, target)
                staging.copy_properties()
                ledger.detach(run)  # its session on the target ends in the swap; it reconnects by name
                staging.swap()
            except BaseException:
                with contextlib.suppress(BaseException):
                    created.result()  # over either way before it is dropped
                if not staging.swapped:
                    staging.drop()
                raise
        staging.drop_prev()
        took = run.clock() - t0
        run.log("restore.done", f"restored {manifest['key']} with {jobs} jobs into a new database, "
                "swapped in", jobs=jobs, seconds=round(took, 1), fetch_s=round(fetched, 1))
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _prepare(staging: Staging) -> None:
    staging.sweep()
    staging.create()


def _fetch(run: Run, client: Any, loc: Location, manifest: dict[str, Any], where: Path) -> Path:
    """Fetch and verify the backup into where; return what pg_restore reads."""
    if manifest["format"] == "directory":  # one file per table: fetched several at a time
        archive = where / "dump"
        fetch.to_dir(run, client, loc, manifest, archive)
    else:
        archive = where / "backup.pgdump"
        fetch.to_file(run, client, loc, manifest, archive)
    return archive


def _pg_restore(run: Run, tools: Tools, staging: Staging, archive: Path, jobs: int,
                target: Target) -> None:
    """pg_restore -j into the new database; raise BackupFailed (it is then dropped) on failure.

    pg_restore 17+ sends `SET transaction_timeout = 0` on every connection, also to servers
    that lack the setting (15, 16): there it runs without --exit-on-error, and every error it
    reports must be that one, or the restore fails."""
    env, conninfo = procs.libpq_env(run, "restore", staging.url())
    # synchronous_commit off: nothing in the new database counts until the swap's commit, which
    # is synchronous and flushes the WAL before it (a crash before it loses only the copy)
    env["PGOPTIONS"] = db.session_options(run, migrating=False) + " -c synchronous_commit=off"
    err = tempfile.TemporaryFile()
    lenient = tools.major >= 17 > target.major
    run.log("restore.start", f"pg_restore with {jobs} jobs into {staging.name}", jobs=jobs)
    proc = procs.spawn([tools.pg_restore, f"--jobs={jobs}", *([] if lenient else ["--exit-on-error"]),
                        "--no-password", "--dbname", conninfo, str(archive)], env, subprocess.DEVNULL,
                       err, fix="install it", stdout=subprocess.DEVNULL)
    try:
        with run.cancel.on_cancel(lambda: procs.terminate([proc])):
            logged = run.clock()
            while proc.poll() is None:
                run.cancel.sleep(0.2)
                if run.clock() - logged >= PROGRESS_EVERY:
                    logged = run.clock()
                    size = staging.size()
                    if size is not None:
                        run.log("restore.progress", f"{staging.name} holds {size / MB:.0f} MB so far",
                                bytes=size)
        run.cancel.check()
        if proc.returncode and lenient and only_transaction_timeout(err):
            run.log("restore.adapt", f"ignored pg_restore's SET transaction_timeout: PostgreSQL "
                    f"{target.major} has no such setting (pg_restore {tools.major} sends it on each "
                    "connection); no other error was reported")
        elif proc.returncode:
            why = procs.tail(err) or procs.describe_exit(proc.returncode)
            raise BackupFailed(f"pg_restore failed ({why}): the new database was dropped; the "
                               "database is unchanged")
    finally:
        procs.reap([proc], [err])
