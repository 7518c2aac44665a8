"""Restore a manifested backup into the database in ONE transaction, reading the object once.

1. Resolve the backup (a key, or `latest` of a database) to a manifest that passed its checks
   (runner.backup.manifest), then refuse what cannot work before touching anything: a dump of
   a newer server major than the target's, a pg_restore older than the pg_dump that wrote it, a
   psql that lacks a command that pg_restore writes, an object missing or of the wrong size.
2. psql opens the transaction and resets the database (runner.backup.session), retried on
   lock_timeout; the object is read only after psql confirmed the reset.
3. One GET of the object, hashed as it streams, through [zstd -d |] pg_restore -1 -f - into
   psql, the script's prologue fitted to the server (runner.backup.script).
4. COMMIT is sent only when pg_restore and zstd exited 0 and the size and sha256 matched the
   manifest. Any failure ends psql without it: the database is the backup or unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from runner import db, procs
from runner.backup import fetch, s3, script
from runner.backup.feeder import Feeder
from runner.backup.layout import MANIFEST_SUFFIX, Location
from runner.backup.manifest import DUMP, BadManifest, kind, newest, pick_latest, server_major
from runner.backup.session import Session
from runner.backup.take import system_identifier
from runner.context import Run
from runner.errors import BackupFailed, ConfigError

RESTRICT_SINCE = {13: 22, 14: 19, 15: 14, 16: 10, 17: 6}  # major: first minor with \restrict


@dataclasses.dataclass(frozen=True)
class Target:
    """What the restore needs to know about the server it writes to."""

    database: str
    version_num: int
    version: str
    settings: frozenset[str]
    system_identifier: str | None

    @property
    def major(self) -> int:
        return self.version_num // 10000


def inspect_target(run: Run) -> Target:
    """Ask the target server for its database, version, settings and system identifier."""
    with db.connect(run, "restore-info") as conn:
        database, num, version = conn.execute(sa.text(
            "SELECT current_database(), current_setting('server_version_num')::int, "
            "current_setting('server_version')")).one()
        known = frozenset(conn.execute(sa.text("SELECT name FROM pg_catalog.pg_settings")).scalars())
        return Target(database, num, version, known, system_identifier(conn))


# -- which backup ----------------------------------------------------------------------------------

def resolve_backup(run: Run, client: Any, loc: Location, target: Target, which: str,
                   from_database: str | None = None, other_database: bool = False) -> dict[str, Any]:
    """Return the checked manifest of KEY, or of the newest backup of a database for 'latest'.

    A KEY of another database's backup is refused (exit 2) unless other_database
    (--from-other-database): copying production into staging is legitimate, never by accident.
    """
    if which == "latest":
        source = from_database or target.database
        found = s3.backups(run, client, loc, source)
        chosen = pick_latest(found, source, target.system_identifier)
        later = [m for m in newest(found) if kind(m) != DUMP and newest([m, chosen])[0] is m]
        if later:
            run.log("restore.newer_point", f"restore point {later[0]['key']} is newer than the "
                    "dump being restored: 'restore --backup KEY' prints how to recover to it")
        if chosen.get("system_identifier") not in (None, target.system_identifier):
            run.log("restore.source", f"the backup was taken on another server (system identifier "
                    f"{chosen['system_identifier']}; this one: {target.system_identifier or 'unknown'})")
        return chosen
    manifest = read_key(run, client, loc, which)
    if kind(manifest) != DUMP:
        raise ConfigError(f"--backup {which} is a restore point, not a dump: 'restore --backup "
                          f"{which}' alone prints its recovery settings")
    if manifest["database"] != target.database and not other_database:
        raise ConfigError(f"--backup {which} is a backup of database {manifest['database']!r}, not of "
                          f"{target.database!r} (the target): add --from-other-database to restore "
                          f"{manifest['database']!r}'s data into {target.database!r}; nothing was "
                          "changed")
    return manifest


def read_key(run: Run, client: Any, loc: Location, which: str) -> dict[str, Any]:
    """Return the checked manifest that --backup KEY names (a dump's or a restore point's)."""
    key = _key(loc, which)
    try:
        return s3.read_manifest(run, client, loc, key + MANIFEST_SUFFIX)
    except BadManifest as exc:
        raise BackupFailed(f"--backup {which}: its manifest {key}{MANIFEST_SUFFIX} cannot be trusted "
                           f"({exc}): refusing to use it; the database was not touched") from None
    except s3.S3_ERRORS as exc:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code"))
        if code in ("NoSuchKey", "404"):
            raise ConfigError(f"--backup {which}: no manifest {key}{MANIFEST_SUFFIX}, so no committed "
                              "backup: pick a key from 'python -m runner backups'") from None
        raise BackupFailed(s3.describe(exc, key)) from None


def _key(loc: Location, which: str) -> str:
    """Return the dump's key for --backup KEY (a key, its manifest's key, or an s3:// URI)."""
    key = which
    if which.startswith("s3://"):
        bucket, _, key = which.removeprefix("s3://").partition("/")
        if bucket != loc.bucket:
            raise ConfigError(f"--backup {which} is in bucket {bucket}, not in BACKUP_S3_URI's "
                              f"({loc.bucket}): set BACKUP_S3_URI to the backups' location")
    key = key.removesuffix(MANIFEST_SUFFIX)
    if loc.database_of(key) is None:
        raise ConfigError(f"--backup {which} is not a backup key under {loc.uri(loc.root)} "
                          "(PREFIX/DATABASE/NAME): pick one from 'python -m runner backups'")
    return key


# -- can it work? ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tools:
    pg_restore: str
    psql: str
    major: int = 0  # pg_restore's


def check_compatible(run: Run, client: Any, loc: Location, manifest: dict[str, Any], target: Target) -> Tools:
    """Refuse (exit 5) what cannot restore, before anything is touched."""
    key = manifest["key"]
    source = server_major(manifest)
    if source > target.major:
        raise BackupFailed(f"backup {key} is a dump of PostgreSQL {manifest['server_version']}, newer "
                           f"than this server (PostgreSQL {target.version}): a dump restores into the "
                           f"same or a newer major only; restore it into PostgreSQL {source} or "
                           "newer. The database was not touched")
    restore_bin = run.settings.pg_restore_bin
    procs.check_client(run, restore_bin, "PG_RESTORE_BIN")
    restore_path = shutil.which(restore_bin) or restore_bin
    (r_major, r_minor), r_text = procs.client_version(restore_path)
    dumped = re.search(r"(\d+)(?:\.\d+)?", manifest["pg_dump_version"])
    if dumped and int(dumped.group(1)) > r_major:
        raise BackupFailed(f"PG_RESTORE_BIN is {r_text}, older than the pg_dump that wrote backup "
                           f"{key} ({manifest['pg_dump_version']}): it cannot read the archive; use a "
                           f"PostgreSQL {dumped.group(1)} (or newer) client. The database was not touched")
    psql = _psql_next_to(restore_path)
    p_version, p_text = procs.client_version(psql)
    if _writes_restrict((r_major, r_minor)) and not _writes_restrict(p_version):
        raise BackupFailed(f"psql ({p_text}) is older than PG_RESTORE_BIN ({r_text}), whose scripts "
                           "use a psql command it lacks (\\restrict): put the psql of the same "
                           "release next to PG_RESTORE_BIN. The database was not touched")
    if manifest["format"] == "directory":
        _check_files(run, client, loc, manifest)
        return Tools(restore_path, psql, r_major)
    try:
        head = s3.call(run, f"reading {loc.uri(key)}",
                       lambda: client.head_object(Bucket=loc.bucket, Key=key))
    except s3.S3_ERRORS as exc:
        if str(getattr(exc, "response", {}).get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
            raise BackupFailed(f"backup {key} has a manifest but no dump (deleted?): pick another "
                               "backup; the database was not touched") from None
        raise BackupFailed(f"cannot read backup {key} ({s3.describe(exc, key)}): the database was "
                           "not touched") from None
    if head["ContentLength"] != manifest["size"]:
        raise BackupFailed(f"backup {key} does not match its manifest (size {head['ContentLength']} "
                           f"vs {manifest['size']}): refusing to restore; the database was not touched")
    return Tools(restore_path, psql, r_major)


def _check_files(run: Run, client: Any, loc: Location, manifest: dict[str, Any]) -> None:
    """Every file a directory-format dump lists must be there, of the size it lists."""
    key = manifest["key"]
    try:
        stored = s3.sizes(run, client, loc, key + "/")
    except s3.S3_ERRORS as exc:
        raise BackupFailed(f"cannot read backup {key} ({s3.describe(exc, key)}): the database was "
                           "not touched") from None
    wrong = [f["object"] for f in manifest["files"] if stored.get(f["object"]) != f["size"]]
    if wrong:
        raise BackupFailed(f"backup {key} does not match its manifest ({len(wrong)} file(s) missing or "
                           f"of another size: {', '.join(wrong[:5])}): refusing to restore; the "
                           "database was not touched")


def _writes_restrict(version: tuple[int, int]) -> bool:
    """pg_restore writes (and psql knows) \\restrict since the August 2025 minor releases."""
    major, minor = version
    return major >= 18 or minor >= RESTRICT_SINCE.get(major, 1000)


def _psql_next_to(restore_bin: str) -> str:
    candidate = os.path.join(os.path.dirname(restore_bin), "psql")
    found = candidate if os.access(candidate, os.X_OK) else shutil.which("psql")
    if not found:
        raise BackupFailed("psql not found next to PG_RESTORE_BIN or on PATH: install the "
                           "PostgreSQL client tools")
    return found


# -- the restore -----------------------------------------------------------------------------------

def replay(run: Run, client: Any, loc: Location, manifest: dict[str, Any], target: Target,
            tools: Tools) -> None:
    """Replace the database's contents with the backup in one transaction (see the docstring).

    A directory-format dump (BACKUP_JOBS) is fetched and verified into a local directory first:
    pg_restore reads directories only from disk."""
    if manifest["format"] != "directory":
        return _replay(run, client, loc, manifest, target, tools, None)
    blocked = fetch.check_space(run, manifest)
    if blocked:
        raise BackupFailed(f"{blocked}: a directory-format backup is restored from a local copy; free "
                           "space or point BACKUP_WORKDIR at a larger volume; the database was not "
                           "touched")
    with tempfile.TemporaryDirectory(prefix=f"runner-restore-{run.run_id}-", dir=fetch.workdir(run)) as d:
        local = Path(d) / "dump"
        fetch.to_dir(run, client, loc, manifest, local)
        _replay(run, client, loc, manifest, target, tools, local)


def _replay(run: Run, client: Any, loc: Location, manifest: dict[str, Any], target: Target,
            tools: Tools, local: Path | None) -> None:
    session = Session(run, tools.psql, set(target.settings))
    try:
        with run.cancel.on_cancel(session.kill):
            session.reset()
            run.log("restore.start", f"database reset inside the transaction; streaming {manifest['key']}",
                    database=run.settings.safe_target)
            t0 = run.clock()
            tail = _stream(run, client, loc, manifest, tools, session, target, local)
            session.commit(tail)
            took = run.clock() - t0
        run.log("restore.done", f"restored {manifest['key']}: committed", bytes=manifest["size"],
                seconds=round(took, 1), mb_per_s=round(manifest["size"] / 1e6 / max(took, 1e-9), 1))
    finally:
        session.dispose()


def _stream(run: Run, client: Any, loc: Location, manifest: dict[str, Any], tools: Tools,
            session: Session, target: Target, local: Path | None) -> bytes:
    """Feed the object through [zstd -d |] pg_restore into psql (or pg_restore reads the verified
    local directory); return the script's tail without its COMMIT once everything checked out;
    raise otherwise (psql is then closed by the caller)."""
    zstd = manifest["compression"] == "zstd" and local is None
    names = ["zstd", "pg_restore"] if zstd else ["pg_restore"]
    errs = [tempfile.TemporaryFile() for _ in names]
    stages: list[subprocess.Popen[bytes]] = []
    prologue = script.Prologue(set(target.settings))
    try:
        if zstd:  # the filters get no password: only psql connects
            stages.append(procs.spawn(["zstd", "-q", "-d", "-c"], procs.child_env(), subprocess.PIPE,
                                      errs[0], fix="install zstd"))
        source = [str(local)] if local else []
        stages.append(procs.spawn([tools.pg_restore, "--single-transaction", "-f", "-", *source],
                                  procs.child_env(), stages[0].stdout if zstd else
                                  subprocess.DEVNULL if local else subprocess.PIPE,
                                  errs[-1], fix="install it"))
        if zstd:
            stages[0].stdout.close()  # type: ignore[union-attr] # only pg_restore reads it
        out = stages[-1].stdout
        assert out is not None
        for fd in (out.fileno(), session.stdin):
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)  # fewer, larger writes (Linux)
        feeder = _Verified(run) if local else Feeder(run, client, loc, manifest, stages[0].stdin)
        with run.cancel.on_cancel(lambda: procs.terminate(stages)):
            feeder.start()
            try:
                tail = script.relay(out.fileno(), session.stdin, prologue, feeder.tick)
            except OSError:  # psql stopped at an error (ON_ERROR_STOP), or was stopped
                procs.terminate(stages)
                run.cancel.check()
                raise BackupFailed(f"the restore failed in psql ({session.error()}): it was rolled "
                                   "back, the database is unchanged") from None
            while feeder.is_alive():  # pg_restore is done; the feeder ends with it (or times out)
                feeder.join(0.5)
                feeder.tick()
            codes = [p.wait() for p in stages]
        run.cancel.check()
        for name in prologue.dropped:
            run.log("restore.adapt", f"left out SET {name}: PostgreSQL {target.major} has no such "
                    "setting (the backup's pg_restore writes it for newer servers)")
        feeder.check_digest()
        failed = [f"{name}: {procs.tail(err) or procs.describe_exit(code)}"
                  for name, code, err in zip(names, codes, errs, strict=True) if code]
        if failed:
            raise BackupFailed(f"the backup could not be read ({' / '.join(failed)}): the restore "
                               "was rolled back, the database is unchanged")
        feeder.check_complete()
        return script.without_final_commit(tail)
    finally:
        procs.reap(stages, errs)


class _Verified:
    """Stands in for the Feeder when pg_restore reads a local copy fetched and verified before."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def start(self) -> None:
        pass

    def is_alive(self) -> bool:
        return False

    def join(self, timeout: float) -> None:
        pass

    def tick(self) -> None:
        self.run.cancel.check()

    def check_digest(self) -> None:
        pass

    def check_complete(self) -> None:
        pass
