"""WAL archiving health, as the server reports it: is point-in-time recovery possible right now?

Read from `archive_mode`, `archive_command`/`archive_library` and `pg_stat_archiver` (readable by
every role on stock PostgreSQL; some managed services hide it), plus the WAL position. Healthy
means: archiving is on and configured, the last attempt did not fail, and less completed WAL
than ARCHIVE_MAX_LAG waits to be archived. `wait_archived` then proves it for the restore point
itself: the segment that holds it reaches the archive (the archiver archives in order and
retries a failing segment, so a later or equal segment archived means ours is too).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import sqlalchemy as sa

from runner.context import Run
from runner.errors import BackupFailed

STATUS_SQL = sa.text("""
SELECT current_setting('archive_mode') AS mode,
       current_setting('archive_command', true) AS command,
       current_setting('archive_library', true) AS library,
       current_setting('archive_timeout') AS timeout,
       pg_catalog.pg_size_bytes(current_setting('wal_segment_size')) AS segment_size,
       pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn()) AS current_wal,
       clock_timestamp() AS now,
       pg_catalog.has_function_privilege('pg_catalog.pg_ls_archive_statusdir()', 'EXECUTE')
         AS may_list_status
""")
ARCHIVER_SQL = sa.text("""
SELECT archived_count, last_archived_wal, last_archived_time, failed_count, last_failed_wal,
       last_failed_time FROM pg_catalog.pg_stat_archiver
""")
READY_SQL = sa.text("SELECT count(*) FROM pg_catalog.pg_ls_archive_statusdir() "
                    "WHERE name LIKE '%.ready'")
INSUFFICIENT_PRIVILEGE = "42501"
POLL = (0.01, 0.2)  # seconds between two looks at pg_stat_archiver: first, and at most


@dataclasses.dataclass(frozen=True)
class Archiver:
    """pg_stat_archiver's row."""

    archived_count: int
    last_archived_wal: str | None
    last_archived_time: dt.datetime | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: dt.datetime | None

    @property
    def failing(self) -> bool:
        """The last attempt failed: no success since the newest failure."""
        return self.last_failed_time is not None and (
            self.last_archived_time is None or self.last_failed_time > self.last_archived_time)


@dataclasses.dataclass(frozen=True)
class Status:
    """What the server says about archiving; archiver is None when the role may not see it."""

    mode: str
    command: str | None  # None: not readable by this role (or no such setting)
    library: str | None
    timeout: str
    segment_size: int
    current_wal: str
    now: dt.datetime
    archiver: Archiver | None
    waiting: int | None  # completed segments not archived yet (None: unknown)

    def lag_bytes(self) -> int | None:
        return None if self.waiting is None else self.waiting * self.segment_size


def read(conn: sa.Connection) -> Status:
    """Read the archiving status; pg_stat_archiver hidden from the role gives archiver=None.

    conn must be AUTOCOMMIT: statistics views are cached for the length of a transaction.
    """
    row = conn.execute(STATUS_SQL).mappings().one()
    archiver = None
    try:
        found = conn.execute(ARCHIVER_SQL).mappings().one_or_none()
        archiver = Archiver(**found) if found else None
    except sa.exc.DBAPIError as exc:
        if getattr(exc.orig, "pgcode", None) != INSUFFICIENT_PRIVILEGE:
            raise
    waiting = None
    if row["may_list_status"]:  # exact: the .ready files the archiver has still to do
        waiting = conn.execute(READY_SQL).scalar_one()
    elif archiver is not None and archiver.last_archived_wal:
        waiting = segments_between(archiver.last_archived_wal, row["current_wal"], row["segment_size"])
    return Status(row["mode"], row["command"], row["library"], row["timeout"], row["segment_size"],
                  row["current_wal"], row["now"], archiver, waiting)


def segment_number(wal_file: str, segment_size: int) -> int | None:
    """Return a WAL file's segment number (a history file has none)."""
    head = wal_file[:24]
    if len(head) != 24 or any(c not in "0123456789ABCDEF" for c in head):
        return None
    per_id = (1 << 32) // segment_size
    return int(head[8:16], 16) * per_id + int(head[16:24], 16)


def segments_between(archived: str, current: str, segment_size: int) -> int | None:
    """Completed segments after the last archived one and before the one being written."""
    last, now = segment_number(archived, segment_size), segment_number(current, segment_size)
    if last is None or now is None:
        return None
    return max(0, now - last - 1)


def problems(status: Status, max_lag: int) -> list[str]:
    """Return what makes point-in-time recovery unsafe right now, one sentence each."""
    found = []
    if status.mode not in ("on", "always"):
        return [f"archive_mode is {status.mode}: WAL is not archived, so there is nothing to recover "
                "to (turn archive_mode on, which needs a restart, with an archive_command or "
                "archive_library; or take dumps: BACKUP_MODE=required)"]
    if status.command is not None and not status.command.strip() and not (status.library or "").strip():
        found.append("archive_mode is on but neither archive_command nor archive_library is set: "
                     "WAL is kept, not archived")
    a = status.archiver
    if a is not None and a.failing:
        since = f"last success {_ago(a.last_archived_time, status.now)}" if a.last_archived_time \
            else "nothing archived successfully since the statistics were reset"
        found.append(f"archiving is failing: the archiver could not archive WAL file "
                     f"{a.last_failed_wal} ({a.failed_count} failure(s), the newest "
                     f"{_ago(a.last_failed_time, status.now)}; {since}): see the server log for "
                     "archive_command's error")
    lag = status.lag_bytes()
    if lag is not None and lag > max_lag:
        last = a.last_archived_wal if a else None
        found.append(f"the archiver is falling behind: {status.waiting} WAL segment(s) "
                     f"({lag / 1e6:.0f} MB) wait to be archived, more than ARCHIVE_MAX_LAG "
                     f"({max_lag / 1e6:.0f} MB); the last archived is {last or 'unknown'}"
                     + (f", {_ago(a.last_archived_time, status.now)}" if a and a.last_archived_time
                        else ""))
    return found


def check(run: Run, status: Status) -> None:
    """Raise BackupFailed (exit 5) when archiving is unhealthy; follow ARCHIVE_UNVERIFIABLE when
    the role may not see it."""
    found = problems(status, run.settings.archive_max_lag)
    if found:
        raise BackupFailed(f"WAL archiving is not healthy, so a restore point would not be "
                           f"recoverable: {'; '.join(found)}; nothing was migrated")
    if status.archiver is None:
        hidden = ("this role may not read pg_stat_archiver (managed services hide it), so the "
                  "runner cannot tell whether WAL archiving works")
        if run.settings.archive_unverifiable == "refuse":
            raise BackupFailed(f"{hidden}: grant pg_monitor (or SELECT on pg_stat_archiver) to the "
                               "role, or set ARCHIVE_UNVERIFIABLE=warn to migrate with the time and "
                               "WAL position recorded but unchecked; nothing was migrated")
        run.log.warning("backup.archive_unverified", f"{hidden}; ARCHIVE_UNVERIFIABLE=warn: going on "
                        "with the time and WAL position recorded, unchecked")
        return
    a = status.archiver
    run.log("backup.archiving", "WAL archiving is healthy", archive_mode=status.mode,
            last_archived_wal=a.last_archived_wal, waiting_segments=status.waiting,
            last_archived=a.last_archived_time.isoformat() if a.last_archived_time else None)


def wait_archived(run: Run, conn: sa.Connection, wal_file: str, segment_size: int,
                  timeout: float) -> float:
    """Wait until wal_file (or a later segment) is archived; return the seconds waited (conn:
    AUTOCOMMIT, so that each look reads fresh statistics).

    Raise BackupFailed when the archiver fails on it, or at timeout: the restore point would not
    be recoverable yet, and nothing was migrated.
    """
    want = segment_number(wal_file, segment_size)
    assert want is not None
    t0, pause = run.clock(), POLL[0]
    while True:
        row = conn.execute(ARCHIVER_SQL).mappings().one()
        a = Archiver(**row)
        done = segment_number(a.last_archived_wal or "", segment_size)
        if done is not None and done >= want:
            return run.clock() - t0
        if a.failing and a.last_failed_wal and segment_number(a.last_failed_wal, segment_size) == want:
            raise BackupFailed(f"the archiver failed to archive WAL file {wal_file}, which holds the "
                               f"restore point ({a.failed_count} failure(s)): see the server log for "
                               "archive_command's error; nothing was migrated")
        waited = run.clock() - t0
        if waited >= timeout:
            raise BackupFailed(
                f"WAL file {wal_file}, which holds the restore point, was not archived within "
                f"ARCHIVE_CONFIRM_TIMEOUT ({timeout:g}s); the last archived is "
                f"{a.last_archived_wal or 'none'}"
                + (f" ({_ago(a.last_archived_time, None)})" if a.last_archived_time else "")
                + ": the archiver is stuck or far behind (a hung archive_command?); nothing was "
                  "migrated")
        run.cancel.sleep(pause)  # archiving one segment takes milliseconds when all is well
        pause = min(POLL[1], pause * 2)


def _ago(when: dt.datetime | None, now: dt.datetime | None) -> str:
    if when is None:
        return "never"
    now = now or dt.datetime.now(dt.UTC)
    seconds = max(0.0, (now - when).total_seconds())
    took = f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 \
        else f"{seconds / 3600:.1f} h"
    return f"at {when.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%SZ}, {took} ago"


def describe(status: Status) -> dict[str, Any]:
    """The status as recorded with a restore point."""
    a = status.archiver
    return {"archive_mode": status.mode, "archiver_visible": a is not None,
            "last_archived_wal": a.last_archived_wal if a else None,
            "waiting_segments": status.waiting}
