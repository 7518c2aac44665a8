"""The role the revisions run as: least privilege, owning nothing but the scratch database.

By default a throwaway login role named like the scratch database (`runner_verify_<UTC
time>_<run id>`), NOSUPERUSER NOCREATEDB NOCREATEROLE, with a random password that is sent to
the server already hashed (SCRAM, so not even a server statement log sees it) and never printed;
created and dropped by the VERIFY_DATABASE_URL role. Or an existing role named by VERIFY_ROLE_URL,
checked to be as unprivileged. Either way a revision that tries to drop another database, run a
program on the server or create roles fails on the scratch database instead of doing it.
"""

from __future__ import annotations

import dataclasses
import secrets

import sqlalchemy as sa
from psycopg2.extensions import encrypt_password
from sqlalchemy.engine import Connection

from runner.context import Run
from runner.db import sqlstate
from runner.dburl import DbUrl
from runner.errors import ConfigError
from runner.redact import register_secret
from runner.sqlname import quote
from runner.wait.ready import reason

INSUFFICIENT_PRIVILEGE = "42501"
# roles whose members may read or write server files or run programs (pg_read_server_files, ...)
_SERVER_ACCESS = ("pg_execute_server_program", "pg_read_server_files", "pg_write_server_files")


@dataclasses.dataclass(frozen=True)
class Role:
    name: str
    password: str | None = dataclasses.field(repr=False)
    throwaway: bool  # created by this run, dropped at its end


def for_run(admin: Connection, name: str, url: DbUrl | None, server: DbUrl) -> Role:
    """The revisions' role: the one VERIFY_ROLE_URL names (checked), or a new throwaway one."""
    return existing(admin, url, server) if url is not None else create(admin, name)


def create(admin: Connection, name: str) -> Role:
    """Create a throwaway NOSUPERUSER NOCREATEDB NOCREATEROLE login role; the admin role becomes a
    member of it, so that it may create the scratch database OWNER it (and drop it later)."""
    password = secrets.token_urlsafe(24)
    register_secret(password)
    # hashed here, with the server's password_encryption: the statement never holds the password
    verifier = encrypt_password(password, name, admin.connection.dbapi_connection)
    try:
        admin.execute(sa.text(f"CREATE ROLE {quote(name)} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                              f"NOREPLICATION NOBYPASSRLS PASSWORD :verifier"),
                      {"verifier": verifier})
    except sa.exc.DBAPIError as exc:
        if sqlstate(exc) == INSUFFICIENT_PRIVILEGE:
            raise ConfigError("VERIFY_DATABASE_URL: the role may not create roles "
                              f"({reason(exc)}): verify runs the revisions as a throwaway "
                              "least-privilege role; grant it CREATEROLE, or name an existing "
                              "least-privilege role in VERIFY_ROLE_URL") from None
        raise
    if not admin.execute(sa.text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar():
        admin.execute(sa.text(f"GRANT {quote(name)} TO CURRENT_USER"))
    return Role(name, password, throwaway=True)


def existing(admin: Connection, url: DbUrl, server: DbUrl) -> Role:
    """Check the role VERIFY_ROLE_URL names: on the verify server, and unprivileged."""
    if (url.host, url.port or 5432) != (server.host, server.port or 5432) or not url.username:
        raise ConfigError("VERIFY_ROLE_URL must name a user on VERIFY_DATABASE_URL's server (same "
                          "host and port; its database is replaced by the scratch database)")
    row = admin.execute(sa.text(
        "SELECT r.rolsuper, r.rolcreatedb, r.rolcreaterole, r.rolbypassrls, r.rolreplication, "
        "       ARRAY(SELECT g.rolname FROM pg_roles g WHERE g.rolname = ANY(:server_access) "
        "             AND pg_has_role(r.oid, g.oid, 'MEMBER')) "
        "FROM pg_roles r WHERE r.rolname = :name"),
        {"name": url.username, "server_access": list(_SERVER_ACCESS)}).first()
    if row is None:
        raise ConfigError(f"VERIFY_ROLE_URL: the role {url.username} does not exist on the verify "
                          "server: create it (NOSUPERUSER NOCREATEDB NOCREATEROLE) or unset VERIFY_ROLE_URL")
    granted = [attr for attr, on in zip(("SUPERUSER", "CREATEDB", "CREATEROLE", "BYPASSRLS",
                                         "REPLICATION"), row[:5], strict=True) if on] + list(row[5])
    if granted:
        raise ConfigError(f"VERIFY_ROLE_URL: the role {url.username} has {', '.join(granted)}: "
                          "verify runs the revisions as a least-privilege role; use one that is "
                          "NOSUPERUSER NOCREATEDB NOCREATEROLE (or unset VERIFY_ROLE_URL for a "
                          "throwaway one)")
    return Role(url.username, url.password, throwaway=False)


def drop(admin: Connection, role: Role, server: Run) -> bool:
    """Drop a throwaway role (after its database); end its sessions elsewhere first. A role that
    still owns objects somewhere (a revision wrote outside the scratch database) is kept and
    reported; return whether it was dropped."""
    if not role.throwaway:
        return True
    admin.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :r"),
                  {"r": role.name})
    try:
        admin.execute(sa.text(f"DROP ROLE IF EXISTS {quote(role.name)}"))
    except sa.exc.DBAPIError as exc:
        where = admin.execute(sa.text(
            "SELECT string_agg(DISTINCT d.datname, ', ') FROM pg_shdepend s "
            "JOIN pg_database d ON d.oid = s.dbid JOIN pg_roles r ON r.oid = s.refobjid "
            "WHERE r.rolname = :r"), {"r": role.name}).scalar()
        server.log.warning("verify.role", f"could not drop the throwaway role {role.name} "
                           f"({reason(exc)})" + (f"; it owns objects in {where}: run DROP OWNED BY "
                                                 f"{role.name} there, then DROP ROLE" if where else ""))
        return False
    return True
