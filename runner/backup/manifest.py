"""Manifests: the commit point of a backup, and input to check before anything trusts it.

A manifest says where the dump is and what it must hash to. Anyone who can write to the bucket
can edit one, so a manifest is checked against where it was found — its own key, the bucket,
the folder of the database it claims — and for the fields and types the restore relies on,
before any object it names is read.

Two kinds share the layout: a dump's (no `kind`, or `dump`) and a restore point's
(`restore-point`: where in the WAL the database was before a migration). A restore point's
values end up in an operator's recovery configuration, so each must match a strict pattern.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from typing import Any

from runner.backup.layout import DIR_SUFFIX, MANIFEST_SUFFIX, POINT_SUFFIX, SQLITE_SUFFIXES, Location
from runner.errors import ConfigError

VERSION = 1
DUMP, POINT = "dump", "restore-point"
SQLITE = "sqlite"  # a dump's format: a copy of a SQLite database file (runner.sqlite.backup)
COMPRESSIONS = ("zstd", "gzip", "none")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SERVER_VERSION = re.compile(r"(\d+)(?:\.(\d+))?")
_LSN = re.compile(r"[0-9A-F]{1,8}/[0-9A-F]{1,8}")
_WAL_FILE = re.compile(r"[0-9A-F]{24}")
POINT_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,63}")  # what the runner names its points
FILE_NAME = re.compile(r"toc\.dat|\d+\.dat(\.gz)?|blobs(_\d+)?\.toc|blob_\d+\.dat(\.gz)?")  # pg_dump -Fd
_COMMON: dict[str, type | tuple[type, ...]] = {
    "manifest_version": int, "key": str, "bucket": str, "database": str, "created": str,
    "alembic_revision": list, "server_version": str,
}
_TYPES: dict[str, dict[str, type | tuple[type, ...]]] = {
    DUMP: {**_COMMON, "size": int, "sha256": str, "format": str, "compression": str,
           "pg_dump_version": str},
    POINT: {**_COMMON, "kind": str, "lsn": str, "timeline": int, "wal_file": str, "run_id": str},
}
_SQLITE_TYPES: dict[str, type | tuple[type, ...]] = {
    **_COMMON, "size": int, "sha256": str, "format": str, "compression": str, "archive_size": int,
    "sqlite_version": str}


class BadManifest(ValueError):
    """The manifest cannot be trusted; the message says why (it never quotes field values)."""


def kind(manifest: dict[str, Any]) -> str:
    """Return what a checked manifest describes: DUMP or POINT."""
    return str(manifest.get("kind") or DUMP)


def parse(body: bytes, found_at: str, loc: Location, database: str | None = None) -> dict[str, Any]:
    """Return the manifest stored at key found_at, checked; raise BadManifest.

    database, when given, is the database the caller is looking for (a listing or `latest`).
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadManifest("not valid JSON") from None
    if not isinstance(data, dict):
        raise BadManifest("not a JSON object")
    what = data.get("kind", DUMP)
    if what not in _TYPES:
        raise BadManifest("its kind is not one this runner writes")
    types = _SQLITE_TYPES if what == DUMP and data.get("format") == SQLITE else _TYPES[what]
    for name, expected in types.items():
        value = data.get(name)
        if value is None:
            raise BadManifest(f"field {name!r} is missing")
        if not isinstance(value, expected) or isinstance(value, bool):
            raise BadManifest(f"field {name!r} is not a {expected.__name__}")  # type: ignore[union-attr]
    _check_common(data)
    if what == DUMP:
        _check_dump(data)
    else:
        _check_point(data)
    _check_place(data, found_at, loc, database)
    return data


def _check_common(data: dict[str, Any]) -> None:
    if data["manifest_version"] != VERSION:
        raise BadManifest(f"manifest_version {data['manifest_version']} is not {VERSION}")
    if not all(isinstance(r, str) for r in data["alembic_revision"]):
        raise BadManifest("alembic_revision is not a list of revision ids")
    if not _SERVER_VERSION.match(data["server_version"]):
        raise BadManifest("server_version is not a PostgreSQL version")
    sysid = data.get("system_identifier")
    if sysid is not None and not (isinstance(sysid, str) and sysid.isdigit()):
        raise BadManifest("system_identifier is not a number in a string")
    try:
        created = dt.datetime.fromisoformat(data["created"])
    except ValueError:
        raise BadManifest("created is not an ISO 8601 time") from None
    if created.tzinfo is None:
        raise BadManifest("created has no time zone")


def _check_dump(data: dict[str, Any]) -> None:
    if data["size"] < 0 or not _SHA256.fullmatch(data["sha256"]):
        raise BadManifest("size or sha256 is malformed")
    archive = data.get("archive_size")  # the archive before compression (since parallel restore)
    if archive is not None and not _is_size(archive):
        raise BadManifest("archive_size is not a size")
    if data["format"] not in ("custom", "directory", SQLITE) or data["compression"] not in COMPRESSIONS:
        raise BadManifest("format or compression is not one this runner writes")
    sqlite_key = data["key"].endswith(tuple(SQLITE_SUFFIXES.values()))
    if (data["format"] == SQLITE) != sqlite_key or (sqlite_key and not data["key"].endswith(
            SQLITE_SUFFIXES[data["compression"]])):
        raise BadManifest("a SQLite backup's key ends with .sqlite (and its compression's suffix), "
                          "and only its")
    if data["key"].endswith(POINT_SUFFIX):
        raise BadManifest("a dump's key ends like a restore point's")
    if (data["format"] == "directory") != data["key"].endswith(DIR_SUFFIX):
        raise BadManifest(f"a directory-format dump's key ends with {DIR_SUFFIX}, and only its")
    if data["format"] == "directory":
        _check_files(data)


def _check_files(data: dict[str, Any]) -> None:
    """A directory-format dump lists its files; the restore reads exactly those, each checked."""
    files = data.get("files")
    if not isinstance(files, list) or not files:
        raise BadManifest("a directory-format dump has no list of files")
    for f in files:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or \
                not FILE_NAME.fullmatch(f["name"]):
            raise BadManifest("a file name is not one pg_dump writes")
        if f.get("compression") not in ("zstd", "none") or \
                f.get("object") != f["name"] + (".zst" if f["compression"] == "zstd" else ""):
            raise BadManifest(f"file {f['name']}: its object or compression is malformed")
        if not (_is_size(f.get("size")) and _is_size(f.get("archive_size"))
                and isinstance(f.get("sha256"), str) and _SHA256.fullmatch(f["sha256"])):
            raise BadManifest(f"file {f['name']}: size or sha256 is malformed")
    names = [f["name"] for f in files]
    if len(set(names)) != len(names) or "toc.dat" not in names:
        raise BadManifest("the list of files repeats a name or has no toc.dat")
    if data["size"] != sum(f["size"] for f in files) or data["sha256"] != files_digest(files):
        raise BadManifest("size or sha256 does not sum up its files")


def files_digest(files: list[dict[str, Any]]) -> str:
    """The digest of a directory-format dump: sha256 over each stored object's name, size, sha256."""
    return hashlib.sha256("".join(f"{f['object']} {f['size']} {f['sha256']}\n"
                                  for f in files).encode()).hexdigest()


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_point(data: dict[str, Any]) -> None:
    """A restore point's values are pasted into a recovery configuration: strict patterns only."""
    if not data["key"].endswith(POINT_SUFFIX):
        raise BadManifest(f"a restore point's key must end with {POINT_SUFFIX}")
    if not _LSN.fullmatch(data["lsn"]):
        raise BadManifest("lsn is not a WAL position (X/Y in hexadecimal)")
    if not 1 <= data["timeline"] < 1 << 32 or not _WAL_FILE.fullmatch(data["wal_file"]):
        raise BadManifest("timeline or wal_file is malformed")
    if int(data["wal_file"][:8], 16) != data["timeline"]:
        raise BadManifest("wal_file is not on the point's timeline")
    name = data.get("name")
    if name is not None and not (isinstance(name, str) and POINT_NAME.fullmatch(name)):
        raise BadManifest("name is not a restore point name this runner writes")
    for field in ("target_revision", "revision_after"):
        value = data.get(field)
        if value is not None and not (isinstance(value, list) and all(isinstance(r, str) for r in value)):
            raise BadManifest(f"{field} is not a list of revision ids")


def _check_place(data: dict[str, Any], found_at: str, loc: Location, database: str | None) -> None:
    """The manifest must describe the dump next to it, in this bucket, in its database's folder."""
    if found_at != data["key"] + MANIFEST_SUFFIX:
        raise BadManifest("its key does not name the dump next to it (a manifest copied or "
                          "edited to point elsewhere)")
    if data["bucket"] != loc.bucket:
        raise BadManifest("its bucket is not BACKUP_S3_URI's bucket")
    if loc.database_of(data["key"]) != data["database"]:
        raise BadManifest("the database it claims is not the folder it is stored in")
    if database is not None and data["database"] != database:
        raise BadManifest(f"it belongs to another database, not {database}")


def check_target_format(manifest: dict[str, Any], target_is_sqlite: bool) -> None:
    """Refuse (exit 2) a pg_dump archive for a SQLite file, or a SQLite file for PostgreSQL."""
    stored = manifest["format"]
    if (stored == SQLITE) == target_is_sqlite:
        return
    have = f"a SQLite database file (format {SQLITE})" if stored == SQLITE else \
        f"a PostgreSQL dump (format {stored}, pg_dump)"
    want = "a SQLite file (sqlite:/// DATABASE_URL)" if target_is_sqlite else "a PostgreSQL database"
    raise ConfigError(f"backup {manifest['key']} is {have} and the target is {want}: a backup "
                      "restores into the same kind of database only; pick another backup or another "
                      "DATABASE_URL. Nothing was changed")


def server_major(manifest: dict[str, Any]) -> int:
    m = _SERVER_VERSION.match(manifest["server_version"])
    assert m  # checked by parse()
    return int(m.group(1))


def newest(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sort manifests newest first (creation time, then key)."""
    return sorted(found, key=lambda m: (dt.datetime.fromisoformat(m["created"]), m["key"]),
                  reverse=True)


def pick_latest(found: list[dict[str, Any]], database: str, target_sysid: str | None) -> dict[str, Any]:
    """Return the dump `latest` means, or refuse (exit 2) rather than guess.

    Restore points are not candidates: the runner does not restore them. A backup taken on
    another server is fine (restoring into a new server after a disaster is the restore that
    matters most). Backups of one database name from several servers are ambiguous: the
    target's own server wins when it is one of them; otherwise refuse.
    """
    found = [m for m in found if kind(m) == DUMP]
    if not found:
        raise ConfigError(f"no backups of {database} under BACKUP_S3_URI: nothing to restore; check "
                          "BACKUP_S3_URI (and --from-database)")
    servers = {m["system_identifier"] for m in found if m.get("system_identifier")}
    if len(servers) > 1:
        if target_sysid not in servers:
            keys = ", ".join(next(m["key"] for m in newest(found) if m.get("system_identifier") == s)
                             for s in sorted(servers))
            raise ConfigError(f"backups of {database} come from {len(servers)} different servers "
                              f"(system identifiers {', '.join(sorted(servers))}); 'latest' would "
                              f"have to guess: pick one with --backup KEY (newest of each: {keys})")
        found = [m for m in found if m.get("system_identifier") == target_sysid]
    return newest(found)[0]
