"""BACKUP_MODE=restore-point: archiving checks, restore points, and a real point-in-time recovery.

A PostgreSQL 18 cluster of this module's own archives WAL to a local directory (archive_command
`cp`); a base backup (pg_basebackup) taken before the runner migrates is recovered to the points
the runner recorded, with the settings `restore --backup POINT` printed, and compared with the
database as it was before each migration (catalog + data fingerprint). Restore points do not
differ between majors: how the server archives does not either, so 18 only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Database, run_runner, runner_env
from tests.pgcluster import APP_PASSWORD, Cluster
from tests.result import Result
from tests.s3_fixtures import S3Server
from tests.test_restore import fingerprint


@dataclasses.dataclass
class Archiving:
    cluster: Cluster
    archive: Path

    def database(self, owner: str | None = None) -> Database:
        name = f"p_{uuid.uuid4().hex[:8]}"
        self.cluster.psql(f"CREATE DATABASE {name}" + (f" OWNER {owner}" if owner else ""))
        return Database(self.cluster, name)

    def archiver(self) -> dict[str, Any]:
        row = self.cluster.psql("SELECT row_to_json(a) FROM pg_stat_archiver a")
        return json.loads(row)

    def set_command(self, command: str | None) -> None:
        """Set archive_command (None: back to postgresql.conf's) and wait until the archiver
        runs it: switch WAL until an attempt newer than the change shows in pg_stat_archiver."""
        value = "RESET archive_command" if command is None else f"SET archive_command = '{command}'"
        self.cluster.psql(f"ALTER SYSTEM {value}")
        self.cluster.psql("SELECT pg_reload_conf()")

    def switch(self) -> None:
        """Complete a WAL segment (writing something first: an empty switch is a no-op)."""
        self.cluster.psql("CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (1); SELECT pg_switch_wal()")

    def wait(self, healthy: bool, timeout: float = 60.0) -> None:
        """Switch segments until the archiver's last attempt succeeded (or failed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.switch()
            for _ in range(20):
                a = self.archiver()
                failing = a["last_failed_time"] is not None and (
                    a["last_archived_time"] is None or a["last_failed_time"] > a["last_archived_time"])
                done = a["last_archived_wal"] and a["last_archived_wal"] >= self.current_wal()
                if (not failing and done) if healthy else failing:
                    return
                time.sleep(0.1)
        raise AssertionError(f"the archiver did not become {'healthy' if healthy else 'failing'}")

    def current_wal(self) -> str:
        """The last completed segment's name (the one before the segment being written)."""
        return self.cluster.psql("SELECT pg_walfile_name(pg_current_wal_lsn() - 1)")


@pytest.fixture(scope="module")
def archiving() -> Iterator[Archiving]:
    cluster = Cluster("18").init()
    archive = cluster.root / "archive"
    archive.mkdir()
    cluster.give(archive)
    cluster.configure(f"""
        archive_mode = on
        archive_command = 'test ! -f {archive}/%f && cp %p {archive}/%f'
        wal_level = replica
        checkpoint_timeout = 30min
    """.replace("\n        ", "\n"))
    cluster.start()
    cluster.psql(f"CREATE ROLE app_pitr LOGIN PASSWORD '{APP_PASSWORD}'")
    yield Archiving(cluster, archive)
    cluster.destroy()


def point_env(url: str, s3: S3Server | None = None, bucket: str | None = None,
              **extra: str) -> dict[str, str]:
    uri = {"BACKUP_S3_URI": f"s3://{bucket}/pitr", **s3.env()} if s3 and bucket else {}
    return runner_env(url, **{"BACKUP_MODE": "restore-point", "LOG_FORMAT": "json", **uri, **extra})


def app_url(db: Database) -> str:
    return db.cluster.url(db.name, user="app_pitr", password=APP_PASSWORD)


def ok(r: Result) -> Result:
    assert r.code == 0, r.err
    return r


def base_backup(archiving: Archiving) -> Path:
    base = archiving.cluster.root / f"base-{uuid.uuid4().hex[:6]}"
    c = archiving.cluster
    c._run(c.bin / "pg_basebackup", "-D", base, "-h", c.sock, "-p", str(c.port), "-U", "admin",
           "--checkpoint=fast", "-X", "stream", "--no-sync")
    return base


def recover(archiving: Archiving, base: Path, printed: str) -> Cluster:
    """Start a copy of the base backup that recovers from the archive with the printed settings."""
    settings = [line for line in printed.splitlines() if re.match(r"recovery_target\w* = '[^']*'$", line)]
    assert settings, printed
    copy = Cluster("18")
    copy.root.mkdir(parents=True, exist_ok=True)
    copy.sock.mkdir()
    for path in (copy.root, copy.sock):
        copy.give(path)
    copy._run("cp", "-a", base, copy.data)
    copy.configure(f"port = {copy.port}\nunix_socket_directories = '{copy.sock}'\narchive_mode = off\n"
                   f"restore_command = 'cp {archiving.archive}/%f %p'\n" + "\n".join(settings))
    copy._run("touch", copy.data / "recovery.signal")
    copy.start()
    deadline = time.monotonic() + 60
    while copy.psql("SELECT pg_is_in_recovery()", check=False) != "f":
        if time.monotonic() > deadline:
            raise AssertionError((copy.root / "server.log").read_text()[-3000:])
        time.sleep(0.1)
    return copy


def comparable(found: list[str]) -> list[str]:
    """A fingerprint without sequence values: PostgreSQL WAL-logs sequences 32 values ahead, so
    after a point-in-time recovery a sequence may be ahead of where it was (never behind: no
    value is handed out twice). Everything else must be equal."""
    return [re.sub(r"^(sequence \S+) \d+", r"\1 N", line) for line in found]


def test_pitr_to_the_recorded_points(archiving: Archiving, s3_server: S3Server, bucket: str) -> None:
    """Two migrations after a base backup: one by a role without privileges (the exact time and
    WAL position are recorded), one by a superuser (a named restore point, a forced WAL switch,
    archived before migrating). Recovering the base backup with the settings `restore` prints
    for each point gives the database exactly as it was before that migration."""
    db = archiving.database(owner="app_pitr")
    ok(run_runner(["upgrade", "--to", "0001"], runner_env(app_url(db))))
    db.sql("INSERT INTO customers (email, name) SELECT 'a' || g || '@x.org', 'before base' "
           "FROM generate_series(1, 50) g")
    base = base_backup(archiving)
    db.sql("INSERT INTO customers (email, name) VALUES ('after-base@x.org', 'only in the WAL')")
    before_first = fingerprint(db)

    first = ok(run_runner(["upgrade", "--to", "0002"], point_env(app_url(db), s3_server, bucket)))
    unnamed = first.summary()["restore_point"]
    assert unnamed["name"] is None and unnamed["archived"] is False, unnamed
    assert "backup.not_switched" in first.err and "pg_create_restore_point needs superuser" in first.err
    db.sql("INSERT INTO customers (email, name) VALUES ('between@x.org', 'after the first migration')")
    before_second = fingerprint(db)

    second = ok(run_runner(["upgrade"], point_env(db.url, s3_server, bucket)))
    named = second.summary()["restore_point"]
    assert named["name"].startswith("migration-runner-") and named["archived"] is True, named
    assert second.summary()["backup"] == named["key"] and db.version() == "0005"
    assert fingerprint(db) not in (before_first, before_second)

    listed = ok(run_runner(["backups"], point_env(db.url, s3_server, bucket)))
    assert [line.split()[1] for line in listed.out.splitlines()[1:]] == ["point", "point"]
    ledger = db.sql("SELECT string_agg(backup_key, ' ' ORDER BY started_at) FROM runner_history "
                    "WHERE steps @> '[{\"outcome\": \"restore point\"}]'")
    assert ledger == f"{unnamed['key']} {named['key']}"

    for point, expected in ((unnamed, before_first), (named, before_second)):
        printed = ok(run_runner(["restore", "--backup", point["key"]], point_env(db.url, s3_server, bucket)))
        if point["name"]:
            assert f"recovery_target_name = '{point['name']}'" in printed.out
        else:
            assert f"recovery_target_lsn = '{point['lsn']}'" in printed.out
            assert "recovery_target_inclusive = 'false'" in printed.out
        copy = recover(archiving, base, printed.out)
        try:
            assert comparable(fingerprint(Database(copy, db.name))) == comparable(expected)
        finally:
            copy.destroy()
    shutil.rmtree(base, ignore_errors=True)


def test_archiving_off_refuses_before_migrating(database: Database) -> None:
    """The suite's shared cluster does not archive: exit 5 naming archive_mode, nothing migrated."""
    r = run_runner(["upgrade"], point_env(database.url))
    assert r.code == 5, r.err
    assert "archive_mode is off: WAL is not archived" in r.summary()["msg"]
    assert database.version() == "" and "migrate.step" not in r.err


def test_both_takes_the_dump_then_the_point(archiving: Archiving, s3_server: S3Server,
                                           bucket: str) -> None:
    db = archiving.database()
    r = ok(run_runner(["upgrade", "--to", "0002"], point_env(db.url, s3_server, bucket, BACKUP_MODE="both",
                                                              PG_DUMP_BIN=str(db.cluster.bin / "pg_dump"))))
    summary = r.summary()
    assert summary["backup"].endswith(".pgdump.zst") and summary["restore_point"]["archived"] is True
    assert r.err.index("backup.done") < r.err.index("backup.restore_point") < r.err.index("migrate.step")
    kinds = [line.split()[1] for line in ok(run_runner(["backups"], point_env(
        db.url, s3_server, bucket))).out.splitlines()[1:]]
    assert kinds == ["point", "dump"]


def test_failing_archive_command_refuses(archiving: Archiving, s3_server: S3Server, bucket: str) -> None:
    """With `both`, a failing archive is found before the dump: no object is written."""
    db = archiving.database()
    archiving.set_command("false")
    try:
        archiving.wait(healthy=False)
        r = run_runner(["upgrade"], point_env(db.url, s3_server, bucket, BACKUP_MODE="both"))
        assert r.code == 5, r.err
        assert s3_server.keys(bucket) == [] and "backup.start" not in r.err
        error = r.summary()["msg"]
        assert "archiving is failing: the archiver could not archive WAL file 0000000" in error, error
        assert "see the server log for archive_command's error; nothing was migrated" in error
        assert db.version() == "" and "migrate.step" not in r.err
    finally:
        archiving.set_command(None)
        archiving.wait(healthy=True)


def test_stuck_archiver_is_caught_before_migrating(archiving: Archiving) -> None:
    """An archive_command that hangs never fails: the segment holding the point is not archived
    within ARCHIVE_CONFIRM_TIMEOUT, and the run stops before the first revision."""
    db = archiving.database()
    archiving.set_command(f"sleep 1 && cp %p {archiving.archive}/%f")
    try:
        time.sleep(1.0)  # SIGHUP reaches the idle archiver at once; nothing shows when it has
        r = run_runner(["upgrade"], point_env(db.url, ARCHIVE_CONFIRM_TIMEOUT="300ms"))
        assert r.code == 5, r.err
        assert re.search(r"WAL file [0-9A-F]{24}, which holds the restore point, was not archived "
                         r"within ARCHIVE_CONFIRM_TIMEOUT \(0.3s\)", r.summary()["msg"]), r.err
        assert db.version() == ""
    finally:
        archiving.set_command(None)
        archiving.wait(healthy=True)


def test_archiving_the_role_may_not_see(archiving: Archiving) -> None:
    """pg_stat_archiver hidden from the role (as managed services do): ARCHIVE_UNVERIFIABLE=refuse
    stops (exit 5, naming the setting); warn migrates with the time and WAL position recorded."""
    db = archiving.database(owner="app_pitr")
    db.sql("REVOKE SELECT ON pg_catalog.pg_stat_archiver FROM PUBLIC")
    refused = run_runner(["upgrade"], point_env(app_url(db)))
    assert refused.code == 5 and "ARCHIVE_UNVERIFIABLE=warn" in refused.summary()["msg"], refused.err
    assert db.version() == ""
    r = ok(run_runner(["upgrade"], point_env(app_url(db), ARCHIVE_UNVERIFIABLE="warn")))
    assert "backup.archive_unverified" in r.err and db.version() == "0005"
    point = r.summary()["restore_point"]
    assert point["name"] is None and point["archived"] is None
    assert re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", point["lsn"])
    assert r.summary()["backup"].startswith(f"restore position at WAL {point['lsn']} (timeline 1")


# -- pure logic ----------------------------------------------------------------------------------

def status(**changes: Any) -> Any:
    from runner.backup.archiving import Archiver, Status

    now = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
    archiver = Archiver(10, "000000010000000000000009", now - dt.timedelta(minutes=5), 0, None, None)
    fields = {"mode": "on", "command": "cp %p /a/%f", "library": "", "timeout": "0",
              "segment_size": 16 << 20, "current_wal": "00000001000000000000000B", "now": now,
              "archiver": archiver, "waiting": 1, **changes}
    return Status(**fields)


def test_archiving_problems() -> None:
    from runner.backup.archiving import Archiver, problems, segments_between

    now = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
    assert problems(status(), 1 << 30) == []
    assert "archive_mode is off" in problems(status(mode="off"), 1 << 30)[0]
    assert "neither archive_command nor archive_library" in problems(status(command=" "), 1 << 30)[0]
    assert problems(status(command=None), 1 << 30) == []  # not readable: not a finding
    assert problems(status(command="", library="basic_archive"), 1 << 30) == []
    failing = Archiver(10, "000000010000000000000009", now - dt.timedelta(hours=3), 4,
                       "00000001000000000000000A", now - dt.timedelta(seconds=30))
    found = problems(status(archiver=failing), 1 << 30)
    assert len(found) == 1 and "could not archive WAL file 00000001000000000000000A (4 failure(s)" in found[0]
    assert "last success at 2026-01-01T09:00:00Z, 3.0 h ago" in found[0]
    recovered = dataclasses.replace(failing, last_archived_time=now)
    assert problems(status(archiver=recovered), 1 << 30) == []
    behind = problems(status(waiting=100), 1 << 30)
    assert len(behind) == 1 and "100 WAL segment(s) (1678 MB) wait to be archived" in behind[0]
    assert segments_between("000000010000000000000009", "00000001000000010000000A", 16 << 20) == 256
    assert segments_between("00000002.history", "00000002000000000000000A", 16 << 20) is None


@pytest.mark.parametrize("changes,problem", [
    ({}, None),
    ({"name": None}, None),  # the role could not name it: the WAL position is the target
    ({"lsn": "0/1'; DROP"}, "lsn is not a WAL position"),
    ({"name": "x'; restore_command='rm"}, "name is not a restore point name"),
    ({"wal_file": "000000020000000000000003"}, "not on the point's timeline"),
    ({"timeline": 0}, "timeline or wal_file is malformed"),
    ({"key": "team/app/shop/20260101T000000Z-abcdef12.pgdump.zst"}, "must end with .restorepoint"),
    ({"kind": "snapshot"}, "kind is not one this runner writes"),
    ({"revision_after": "0005"}, "revision_after is not a list"),
])
def test_restore_point_manifest_checks(changes: dict[str, Any], problem: str | None) -> None:
    from runner.backup.layout import Location
    from runner.backup.manifest import BadManifest, parse
    from runner.backup.point import recovery_settings

    m = {"manifest_version": 1, "kind": "restore-point",
         "key": "team/app/shop/20260101T000000Z-abcdef12.restorepoint", "bucket": "bkt",
         "database": "shop", "created": "2026-01-01T00:00:00.123456+00:00", "name": "migration-runner-x",
         "lsn": "0/2432C38", "timeline": 1, "wal_file": "000000010000000000000002",
         "server_version": "18.6", "alembic_revision": ["0002"], "run_id": "abcdef12", **changes}
    body, loc = json.dumps(m).encode(), Location.parse("s3://bkt/team/app")
    where = "team/app/shop/20260101T000000Z-abcdef12.restorepoint.manifest.json"
    if problem is None:
        settings = dict(recovery_settings(parse(body, where, loc)))
        assert settings["recovery_target_timeline"] == "1"
        target = settings.get("recovery_target_name", settings.get("recovery_target_lsn"))
        assert target in (m["name"], m["lsn"])
        return
    with pytest.raises(BadManifest, match=re.escape(problem)):
        parse(body, where, loc)


def test_sizes_parse() -> None:
    from runner.config import size

    assert size()("1GB") == 1 << 30 and size()("512mb") == 512 << 20 and size()("4096") == 4096
    for bad in ("lots", "-1GB", "1 PB"):
        with pytest.raises(ValueError):
            size()(bad)
