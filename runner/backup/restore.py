"""Restore a manifested backup: verify first, then replace the database in ONE transaction.

Strategy (single transaction into the same database):
1. Read the object once, counting and hashing it: size and sha256 must match the manifest
   before the database is touched. Nothing is written to disk.
2. Read it again, pinned to the verified version with If-Match on its ETag, through
   [zstd -d |] pg_restore -f - (SQL) into psql. Our own stream to psql starts with BEGIN, drops
   every user schema (and large objects) and recreates `public` as initdb does; then the
   dump's SQL; COMMIT is sent only after pg_restore exited 0 and the second read's digest
   matched again. Any failure closes psql without COMMIT: the database is unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from typing import IO, Any

import botocore.exceptions

from runner import procs
from runner.backup import s3
from runner.context import Run
from runner.errors import BackupFailed, ConfigError

CHUNK = 1 << 20

RESET_SQL = r"""
BEGIN;
SET LOCAL client_min_messages = warning;
SELECT pg_catalog.lo_unlink(oid) FROM pg_catalog.pg_largeobject_metadata;
DO $reset$
DECLARE s name;
BEGIN
  FOR s IN SELECT nspname FROM pg_catalog.pg_namespace
           WHERE nspname <> 'information_schema' AND nspname !~ '^pg_' LOOP
    EXECUTE format('DROP SCHEMA %I CASCADE', s);
  END LOOP;
  CREATE SCHEMA public;  -- pg_dump never creates it: "initdb creates it"
  IF current_setting('server_version_num')::int >= 150000 THEN
    ALTER SCHEMA public OWNER TO pg_database_owner;
    GRANT USAGE ON SCHEMA public TO PUBLIC;
  ELSE
    GRANT ALL ON SCHEMA public TO PUBLIC;
  END IF;
  COMMENT ON SCHEMA public IS 'standard public schema';
END
$reset$;
"""


def resolve(run: Run, client: Any, loc: s3.Location, database: str, which: str) -> dict[str, Any]:
    """Return the manifest for KEY or 'latest'; only manifested (committed) backups count."""
    if which == "latest":
        found = s3.manifests(client, loc, database)
        if not found:
            raise ConfigError(f"no backups of {database} under {loc.uri(loc.database_prefix(database))}: "
                              "nothing to restore; check BACKUP_S3_URI")
        return found[0]
    key = which.removeprefix(f"s3://{loc.bucket}/").removesuffix(s3.MANIFEST_SUFFIX)
    try:
        return s3.read_manifest(client, loc.bucket, key + s3.MANIFEST_SUFFIX)
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            raise ConfigError(f"--backup {which}: no manifest {key}{s3.MANIFEST_SUFFIX}, so no committed "
                              "backup: pick a key from 'python -m runner backups'") from None
        raise BackupFailed(s3.describe(exc, key)) from None


def verify(run: Run, client: Any, manifest: dict[str, Any]) -> str:
    """Read the whole object; raise unless size and sha256 match the manifest. Return its ETag."""
    key = manifest["key"]
    try:
        obj = client.get_object(Bucket=manifest["bucket"], Key=key)
        digest, size = hashlib.sha256(), 0
        for chunk in obj["Body"].iter_chunks(CHUNK):
            run.cancel.check()
            digest.update(chunk)
            size += len(chunk)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise BackupFailed(f"cannot read backup {key} ({s3.describe(exc, key)}): the database was "
                           "not touched") from None
    if size != manifest["size"] or digest.hexdigest() != manifest["sha256"]:
        raise BackupFailed(f"backup {key} does not match its manifest (size {size} vs "
                           f"{manifest['size']}, sha256 {digest.hexdigest()[:12]}… vs "
                           f"{manifest['sha256'][:12]}…): refusing to restore; the database was "
                           "not touched")
    return obj["ETag"]


def restore(run: Run, client: Any, manifest: dict[str, Any], etag: str) -> None:
    """Replay the verified backup into the database in one transaction (see module docstring)."""
    restore_bin = run.settings.pg_restore_bin
    procs.check_client(run, restore_bin, "PG_RESTORE_BIN")
    psql = _psql_next_to(restore_bin)
    env, conninfo = procs.libpq_env(run, "restore")
    errs = [tempfile.TemporaryFile() for _ in range(3)]
    decompress = manifest["compression"] == "zstd"
    stages: list[subprocess.Popen[bytes]] = []
    try:
        # psql first: it holds the transaction; the others feed it
        stages.append(procs.spawn([psql, "-X", "-q", "--no-password", "-v", "ON_ERROR_STOP=1",
                                 "-d", conninfo], env, subprocess.PIPE, errs[0], fix="install it",
                                stdout=subprocess.DEVNULL))
        restore_in = subprocess.PIPE
        if decompress:
            stages.append(procs.spawn(["zstd", "-q", "-d", "-c"], env, subprocess.PIPE, errs[2],
                                    fix="install it"))
            restore_in = stages[-1].stdout
        stages.append(procs.spawn([restore_bin, "-f", "-"], env, restore_in, errs[1], fix="install it"))
        if decompress:
            stages[1].stdout.close()  # type: ignore[union-attr] # only pg_restore reads it
        feeder = _Feeder(client, manifest, etag, (stages[1] if decompress else stages[-1]).stdin)
        with run.cancel.on_cancel(lambda: procs.terminate(stages)):
            feeder.start()
            _replay(run, stages, feeder, errs)
    finally:
        procs.reap(stages, errs)


def _replay(run: Run, stages: list[subprocess.Popen[bytes]], feeder: _Feeder, errs: list[IO[bytes]]) -> None:
    psql, pg_restore = stages[0], stages[-1]
    assert psql.stdin and pg_restore.stdout
    try:
        psql.stdin.write(RESET_SQL.encode())
        while chunk := pg_restore.stdout.read(CHUNK):
            psql.stdin.write(chunk)
        feeder.join()
        codes = [p.wait() for p in stages[1:]]
        run.cancel.check()
        if feeder.error:
            raise BackupFailed(f"{feeder.error}: the restore was rolled back, the database is unchanged")
        if any(codes):
            raise BackupFailed(f"pg_restore failed ({procs.tail(errs[1]) or procs.tail(errs[2])}): "
                               "the restore was rolled back, the database is unchanged")
        psql.stdin.write(b"COMMIT;\n")  # the only place the restore becomes real
        psql.stdin.close()
    except BrokenPipeError:
        pass  # psql stopped at an error (ON_ERROR_STOP): reported below
    finally:
        with contextlib.suppress(OSError):
            psql.stdin.close()
    if psql.wait() != 0:
        run.cancel.check()
        raise BackupFailed(f"the restore failed in psql ({procs.tail(errs[0])}): it was rolled back, "
                           "the database is unchanged")


class _Feeder(threading.Thread):
    """Copy the object (pinned by ETag) into the pipeline, hashing it again on the way."""

    def __init__(self, client: Any, manifest: dict[str, Any], etag: str, sink: IO[bytes] | None) -> None:
        super().__init__(name="restore-feeder", daemon=True)
        self.client, self.manifest, self.etag, self.sink = client, manifest, etag, sink
        self.error: str | None = None

    def run(self) -> None:
        assert self.sink is not None
        digest, size, m = hashlib.sha256(), 0, self.manifest
        try:
            obj = self.client.get_object(Bucket=m["bucket"], Key=m["key"], IfMatch=self.etag)
            for chunk in obj["Body"].iter_chunks(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                self.sink.write(chunk)
            if size != m["size"] or digest.hexdigest() != m["sha256"]:
                self.error = f"backup {m['key']} changed while it was being restored"
        except BrokenPipeError:
            self.error = "the restore pipeline stopped reading"
        except Exception as exc:  # noqa: BLE001 - reported by the main thread, which rolls back
            self.error = s3.describe(exc, m["key"])
        finally:
            with contextlib.suppress(OSError):
                self.sink.close()


def _psql_next_to(restore_bin: str) -> str:
    path = shutil.which(restore_bin) or restore_bin
    candidate = os.path.join(os.path.dirname(path), "psql")
    found = candidate if os.access(candidate, os.X_OK) else shutil.which("psql")
    if not found:
        raise BackupFailed("psql not found next to PG_RESTORE_BIN or on PATH: install the "
                           "PostgreSQL client tools")
    return found

