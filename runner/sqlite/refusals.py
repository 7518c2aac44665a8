"""Settings that cannot work on a SQLite file: each refused with exit 2 and one line, before
anything is touched. Settings that only tune PostgreSQL (the lock_timeout schedule, pg_dump's
options, replication lag...) are ignored instead, as docs/sqlite.md lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

WHY = "a SQLite file is for local development (docs/sqlite.md)"
VERIFY_SERVER_ONLY = (("verify_role_url", "VERIFY_ROLE_URL"), ("verify_template", "VERIFY_TEMPLATE"),
                      ("verify_extensions", "VERIFY_EXTENSIONS"))


def problems(values: Mapping[str, Any], command: str, template: str = "") -> list[str]:
    """Return one line per setting that cannot apply to a SQLite DATABASE_URL (values: config.load's)."""
    url = values.get("database_url")
    found = []
    verify_url = values.get("verify_database_url")
    if verify_url is not None and verify_url.is_sqlite:
        found.append("VERIFY_DATABASE_URL is a SQLite URL: verify needs none for SQLite (with a "
                     "sqlite:/// DATABASE_URL it migrates a temporary file); unset it, or point it "
                     "at a PostgreSQL server")
    if template.lstrip().startswith("sqlite"):
        found.append("DATABASE_URL_TEMPLATE is a SQLite URL: fleets of databases are PostgreSQL-only "
                     f"({WHY}); migrate one file with DATABASE_URL")
    if url is None or not url.is_sqlite:
        return found
    if values.get("targets_file") or values.get("target_schemas"):
        found.append("TARGETS_FILE / TARGET_SCHEMAS with a SQLite DATABASE_URL: fleets of databases "
                     f"or schemas are PostgreSQL-only ({WHY}); unset them")
    mode = values.get("backup_mode", "required")
    if mode in ("restore-point", "both"):
        found.append(f"BACKUP_MODE={mode} needs PostgreSQL's WAL archive: with a SQLite DATABASE_URL "
                     "use BACKUP_MODE=required (a copy of the file to S3) or off")
    if command in ("verify", "plan") and verify_url is None:
        for field, name in VERIFY_SERVER_ONLY:
            if values.get(field):
                found.append(f"{name} is for a PostgreSQL verify server: verify on SQLite migrates a "
                             f"temporary file; unset {name}, or set VERIFY_DATABASE_URL")
    return found
