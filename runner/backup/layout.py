"""Where backups live: PREFIX/FOLDER/TIMESTAMP-RUNID.SUFFIX, one folder per database.

A restore point (BACKUP_MODE=restore-point) has a key of the same form with the suffix
.restorepoint: only its manifest is stored, the data is in the WAL archive.

FOLDER is the database name percent-encoded with nothing left safe, so a name containing '/'
cannot nest inside another database's folder; ordinary names (letters, digits, _ . -) encode to
themselves, so folders written before the encoding existed are still found. Listings read one
level of a folder, never its subtree: another application whose BACKUP_S3_URI happens to lie
inside ours stays invisible.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from urllib.parse import quote, unquote

MANIFEST_SUFFIX = ".manifest.json"
POINT_SUFFIX = ".restorepoint"  # a restore point's key: no object there, only its manifest
DIR_SUFFIX = ".pgdir"  # a directory-format dump (BACKUP_JOBS): its files are KEY/NAME
# a SQLite database file (format `sqlite`), by BACKUP_COMPRESSION
SQLITE_SUFFIXES = {"zstd": ".sqlite.zst", "gzip": ".sqlite.gz", "none": ".sqlite"}


def is_point(key: str) -> bool:
    """Return whether a --backup KEY (or its manifest's key) names a restore point."""
    return key.removesuffix(MANIFEST_SUFFIX).endswith(POINT_SUFFIX)


def folder(database: str) -> str:
    """Return the one path segment that names a database's folder."""
    return quote(database, safe="")


def database_of_folder(segment: str) -> str | None:
    """Return the database a folder segment names, or None when it is not one we would write."""
    name = unquote(segment)
    return name if segment and folder(name) == segment else None


@dataclasses.dataclass(frozen=True)
class Location:
    bucket: str
    prefix: str  # no leading or trailing slash; may be ''

    @classmethod
    def parse(cls, uri: str) -> Location:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        return cls(bucket, prefix.strip("/"))

    @property
    def root(self) -> str:
        """The prefix every database folder sits under ('' or 'PREFIX/')."""
        return f"{self.prefix}/" if self.prefix else ""

    def database_prefix(self, database: str) -> str:
        """Return the folder of one database's backups: PREFIX/FOLDER/."""
        return f"{self.root}{folder(database)}/"

    def new_key(self, database: str, created: dt.datetime, run_id: str, suffix: str) -> str:
        return f"{self.database_prefix(database)}{created:%Y%m%dT%H%M%SZ}-{run_id}{suffix}"

    def database_of(self, key: str) -> str | None:
        """Return the database whose folder holds key directly (PREFIX/FOLDER/NAME), else None."""
        if not key.startswith(self.root):
            return None
        segment, sep, name = key[len(self.root):].partition("/")
        if not sep or not name or "/" in name:
            return None
        return database_of_folder(segment)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"
