"""Restore points (BACKUP_MODE=restore-point or both): mark where the database was before a
migration, for point-in-time recovery from the WAL archive the team already runs.

1. Check that WAL archiving is healthy (runner.backup.archiving); exit 5 otherwise.
2. Mark the point: pg_create_restore_point(name) where the role may (superuser or a GRANT),
   otherwise the exact server time and WAL insert position. Both come with the timeline.
3. pg_switch_wal() where the role may, so the segment holding the point goes to the archive now,
   then wait (ARCHIVE_CONFIRM_TIMEOUT) until the archiver has it: the point is recoverable
   before the first change is made.
4. Record it: the run's ledger row (a step of its own) and, with BACKUP_S3_URI, a small manifest
   beside the dumps that `backups` lists and `restore` turns into recovery settings.

No data is copied: the time this adds does not depend on the database's size.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import IO, Any

import sqlalchemy as sa

from runner import db, ledger
from runner.backup import archiving
from runner.backup.layout import MANIFEST_SUFFIX, POINT_SUFFIX, Location
from runner.backup.manifest import POINT, VERSION
from runner.context import Run
from runner.errors import BackupFailed
from runner.revisions import DbState, fmt

NAME_PREFIX = "migration-runner"
INFO_SQL = sa.text("""
SELECT current_database() AS database, current_setting('server_version') AS server_version,
       pg_catalog.has_function_privilege('pg_catalog.pg_create_restore_point(text)', 'EXECUTE')
         AS may_name,
       pg_catalog.has_function_privilege('pg_catalog.pg_switch_wal()', 'EXECUTE') AS may_switch
""")
NAMED_SQL = sa.text("SELECT p.lsn::text AS lsn, pg_catalog.pg_walfile_name(p.lsn) AS wal_file, "
                    "clock_timestamp() AS at FROM (SELECT pg_catalog.pg_create_restore_point(:name) "
                    "AS lsn) p")
UNNAMED_SQL = sa.text("SELECT p.lsn::text AS lsn, pg_catalog.pg_walfile_name(p.lsn) AS wal_file, "
                      "clock_timestamp() AS at FROM (SELECT pg_catalog.pg_current_wal_insert_lsn() "
                      "AS lsn) p")
SWITCH_SQL = sa.text("SELECT pg_catalog.pg_switch_wal()")
SYSID_SQL = sa.text("SELECT system_identifier::text FROM pg_catalog.pg_control_system()")


def check(run: Run) -> None:
    """Refuse (exit 5) when WAL archiving is unhealthy: before a dump, so `both` fails fast."""
    with db.connect(run, "restore-point", autocommit=True) as conn:
        archiving.check(run, archiving.read(conn))


def take(run: Run, state: DbState) -> dict[str, Any]:
    """Check archiving, mark the point, have it archived, record it; return its record."""
    s = run.settings
    t0 = run.clock()
    # boto3 takes a few hundred ms to import and build a client: done meanwhile, off this thread
    client = _S3Client(run) if s.backup_s3_uri else None
    with db.connect(run, "restore-point", autocommit=True) as conn:
        status = archiving.read(conn)
        archiving.check(run, status)
        info = conn.execute(INFO_SQL).mappings().one()
        sysid = _system_identifier(conn)
        created = dt.datetime.now(dt.UTC)
        name = f"{NAME_PREFIX}-{created:%Y%m%dT%H%M%SZ}-{run.run_id}" if info["may_name"] else None
        mark = _named(conn, name) if name else None
        if mark is None:
            name, mark = None, conn.execute(UNNAMED_SQL).mappings().one()
            run.log("backup.restore_point", "this role may not create a named restore point "
                    "(pg_create_restore_point needs superuser or a GRANT): recording the exact "
                    "server time and WAL position instead")
        switched = bool(info["may_switch"]) and _switch(conn)
        archived = _confirm(run, conn, status, mark["wal_file"], switched)
    record = {
        "manifest_version": VERSION, "kind": POINT, "name": name, "lsn": mark["lsn"],
        "timeline": int(mark["wal_file"][:8], 16), "wal_file": mark["wal_file"],
        "created": mark["at"].astimezone(dt.UTC).isoformat(), "database": info["database"],
        "system_identifier": sysid, "server_version": info["server_version"],
        "alembic_revision": list(state.heads), "target_revision": _target(run),
        "revision_after": None, "version_table": state.version_table,
        "version_schema": state.version_schema, "run_id": run.run_id, "switched": switched,
        "archived": archived, **archiving.describe(status),
    }
    if client is not None:
        _store(run, record, created, client.get())
    took = run.clock() - t0
    ledger.note(run, {"outcome": "restore point", **{k: record[k] for k in (
        "name", "lsn", "timeline", "wal_file", "created", "database", "system_identifier",
        "alembic_revision", "target_revision", "switched", "archived")}, "key": record.get("key"),
        "seconds": round(took, 3)})
    where = f"restore point {name}" if name else "restore position"
    run.log("backup.restore_point", f"{where} at WAL {record['lsn']} (timeline {record['timeline']}, "
            f"file {record['wal_file']}), {record['created']}"
            + ("; archived" if archived else "; not confirmed archived"),
            seconds=round(took, 3), key=record.get("key"))
    run.summary["restore_point"] = {k: record.get(k) for k in (
        "name", "lsn", "timeline", "created", "wal_file", "archived", "key")}
    return record


def _named(conn: sa.Connection, name: str) -> Any:
    """pg_create_restore_point(name), or None when the server refuses it anyway (a managed
    service's own restrictions): the WAL position is recorded instead."""
    try:
        return conn.execute(NAMED_SQL, {"name": name}).mappings().one()
    except sa.exc.DBAPIError:
        return None


def _system_identifier(conn: sa.Connection) -> str | None:
    try:
        return str(conn.execute(SYSID_SQL).scalar_one())
    except sa.exc.DBAPIError:  # revoked by an administrator: the point is still recorded
        return None


def _switch(conn: sa.Connection) -> bool:
    """Force a WAL switch; False when the server refuses (a managed service may)."""
    try:
        conn.execute(SWITCH_SQL)
        return True
    except sa.exc.DBAPIError:
        return False


def _confirm(run: Run, conn: sa.Connection, status: archiving.Status, wal_file: str,
             switched: bool) -> bool | None:
    """Wait for the archive to hold what the point needs; return whether it does (None: unknown).

    After a switch, the point's own segment is waited for. Without one, the point's segment is
    archived when it fills or at archive_timeout: the runner waits for the segments completed
    before it (the archiver keeps up) and says so.
    """
    timeout = run.settings.archive_confirm_timeout
    if status.archiver is None or not timeout:
        return None
    if switched:
        waited = archiving.wait_archived(run, conn, wal_file, status.segment_size, timeout)
        run.log("backup.archived", f"WAL file {wal_file} with the restore point is archived",
                waited_s=round(waited, 3))
        return True
    number = archiving.segment_number(wal_file, status.segment_size)
    per_id = (1 << 32) // status.segment_size
    if number:
        before = number - 1
        previous = f"{wal_file[:8]}{before // per_id:08X}{before % per_id:08X}"
        archiving.wait_archived(run, conn, previous, status.segment_size, timeout)
    run.log.warning("backup.not_switched", f"this role may not force a WAL switch (pg_switch_wal "
                    f"needs superuser or a GRANT): WAL file {wal_file} with the restore point is "
                    f"archived when it fills or after archive_timeout ({status.timeout}); the point "
                    "is recoverable from then on")
    return False


def _target(run: Run) -> list[str] | None:
    return _revisions(run.summary.get("target"))


def _revisions(text: Any) -> list[str] | None:
    """'a,b' -> ['a', 'b']; 'base' -> []; nothing -> None."""
    if not isinstance(text, str) or not text:
        return None
    return [] if text == "base" else text.split(",")


class _S3Client(threading.Thread):
    """Import boto3 and build the S3 client in the background."""

    def __init__(self, run: Run) -> None:
        super().__init__(name="s3-client", daemon=True)
        self.run_ = run
        self.client: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:  # type: ignore[override]
        try:
            from runner.backup import s3

            self.client = s3.client(self.run_.settings, self.run_.cancel)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread by get()
            self.error = exc

    def get(self) -> Any:
        while self.is_alive():
            self.join(0.2)
            self.run_.cancel.check()
        if self.error is not None:
            raise self.error
        return self.client


def _store(run: Run, record: dict[str, Any], created: dt.datetime, client: Any) -> None:
    """Write the point's manifest beside the dumps; refresh it with the outcome at the end."""
    from runner.backup import s3  # imported by the client's thread already

    loc = Location.parse(run.settings.backup_s3_uri)
    record.update(key=loc.new_key(record["database"], created, run.run_id, POINT_SUFFIX),
                  bucket=loc.bucket)
    try:
        s3.write_manifest(run, client, loc, record)
    except s3.S3_ERRORS as exc:
        raise BackupFailed(f"the restore point was created but its manifest was not written "
                           f"({s3.describe(exc, record['key'] + MANIFEST_SUFFIX)}); nothing was "
                           "migrated") from None

    def revision_after(code: int, error: str | None) -> None:
        done = [x["to"] for x in run.steps if x.get("outcome") in ("applied", "downgraded")]
        after = _revisions(run.summary.get("to") or (done[-1].replace(":", ",") if done else None))
        if after is None:
            return
        record.update(revision_after=after, exit_code=code)
        s3.write_manifest(run, client, loc, record)

    run.finishers.append(revision_after)


def describe(record: dict[str, Any]) -> str:
    """Name a point in one line (the ledger's backup_key when there is no S3 manifest)."""
    what = f"restore point {record['name']}" if record.get("name") else "restore position"
    return f"{what} at WAL {record['lsn']} (timeline {record['timeline']}, {record['created']})"


def show(run: Run, which: str, out: IO[str]) -> None:
    """`restore --backup POINT`: print the recovery settings of a restore point; restore nothing."""
    from runner.backup import s3
    from runner.backup.restore import read_key

    loc = Location.parse(run.settings.backup_s3_uri)
    record = read_key(run, s3.client(run.settings, run.cancel), loc, which)
    out.write(render(record))
    run.summary.update(backup=record["key"], outcome="recovery settings printed",
                       recovery=dict(recovery_settings(record)))


# -- recovery --------------------------------------------------------------------------------------

def recovery_settings(point: dict[str, Any]) -> list[tuple[str, str]]:
    """Return the recovery target settings for a checked restore point manifest."""
    if point.get("name"):
        target = [("recovery_target_name", point["name"])]
    else:  # stop right before the first change made after the recorded position
        target = [("recovery_target_lsn", point["lsn"]), ("recovery_target_inclusive", "false")]
    return [*target, ("recovery_target_timeline", str(point["timeline"])),
            ("recovery_target_action", "promote")]


def render(point: dict[str, Any]) -> str:
    """Return what `restore --backup POINT` prints: the point and how to recover to it."""
    when = dt.datetime.fromisoformat(point["created"]).astimezone(dt.UTC)
    after = point.get("revision_after")
    named = (f"named {point['name']}" if point.get("name") else
             "no named point (the role may not create one): recovery stops at the WAL position")
    archived = {True: "archived before the migration started",
                False: "not confirmed archived (no WAL switch allowed: archived once its segment filled)",
                None: "archiving not checked"}[point.get("archived")]
    lines = [
        f"restore point {point['key']}",
        f"  database {point['database']} on server {point.get('system_identifier') or '(unknown)'} "
        f"(PostgreSQL {point['server_version']}), timeline {point['timeline']}",
        f"  taken {when.isoformat()} at WAL {point['lsn']} (file {point['wal_file']}), before "
        f"migrating from {fmt(point['alembic_revision'])}"
        + (f" (to {fmt(after)})" if after is not None else ""),
        f"  {named}; {archived}",
        "",
        "The runner does not restore a point itself: point-in-time recovery rebuilds the whole",
        "server (every database on it) from a base backup taken before the point, replaying the",
        "WAL archive up to it. Restore that base backup into an empty data directory (pgBackRest,",
        "WAL-G and Barman do this and write the settings below from their own options), add to",
        "its postgresql.auto.conf:",
        "",
        "restore_command = '...'  # fetches WAL from your archive, e.g. 'cp /archive/%f %p',",
        "    # 'wal-g wal-fetch %f %p', 'pgbackrest --stanza=NAME archive-get %f \"%p\"'",
    ]
    lines += [f"{key} = '{value}'" for key, value in recovery_settings(point)]
    lines += [
        "",
        "then create recovery.signal in the data directory and start the server; it stops at the",
        "point and opens read-write on a new timeline (recovery_target_action = 'pause' instead",
        "lets you look first). Keep the old server until the result is checked.",
        "",
        f"Managed services (RDS, Aurora, Cloud SQL, Azure) restore by time: restore to "
        f"{when:%Y-%m-%dT%H:%M:%S.%f}Z (UTC), the server's clock when the point was taken, before",
        "the migration's first change.",
    ]
    return "\n".join(lines) + "\n"
