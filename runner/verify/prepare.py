"""Bring a fresh scratch database to where the chain starts, before its first revision.

In order: the extensions VERIFY_EXTENSIONS lists are created by the VERIFY_DATABASE_URL role (the
revisions' role may not create untrusted ones); everything the template brought along (schemas,
tables, views, sequences, types, functions, not extension members) is handed to the revisions'
role, so revisions may alter it; then VERIFY_SETUP runs as the revisions' role: a `.sql` file in
one transaction, or a `.py` file's `setup(connection)` (e.g. `Base.metadata.create_all(connection)`
for applications that create their first tables before Alembic runs).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner.errors import ConfigError
from runner.sqlname import quote
from runner.verify.steps import describe
from runner.wait.ready import reason

# pg_dump (17.6+, 18) brackets a script with these psql meta-commands, a guard for psql alone
_PSQL_GUARD = re.compile(r"^\\(?:un)?restrict\b")

# ALTER ... OWNER TO statements for every object of the database that a role other than `role`
# owns, outside the system schemas and extensions. Indexes, owned sequences and row types
# follow their table; pg_database_owner's schemas (public, PG 15+) follow the database's owner.
_ADOPT = r"""
WITH ext AS (SELECT classid, objid FROM pg_depend WHERE deptype = 'e'),
me AS (SELECT oid FROM pg_roles WHERE rolname = :role),
ns AS (SELECT oid, nspname, nspowner FROM pg_namespace
       WHERE nspname NOT LIKE 'pg\_%' AND nspname <> 'information_schema')
SELECT format('ALTER SCHEMA %I OWNER TO %I', nspname, :role) FROM ns
WHERE nspowner <> (SELECT oid FROM me)
  AND nspowner IS DISTINCT FROM (SELECT oid FROM pg_roles WHERE rolname = 'pg_database_owner')
  AND NOT EXISTS (SELECT FROM ext WHERE classid = 'pg_namespace'::regclass AND objid = ns.oid)
UNION ALL
SELECT format('ALTER %s %I.%I OWNER TO %I',
              CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE'
                             WHEN 'f' THEN 'FOREIGN TABLE' WHEN 'c' THEN 'TYPE' ELSE 'TABLE' END,
              ns.nspname, c.relname, :role)
FROM pg_class c JOIN ns ON ns.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f', 'c') AND c.relowner <> (SELECT oid FROM me)
  AND NOT EXISTS (SELECT FROM ext WHERE classid = 'pg_class'::regclass AND objid = c.oid)
  AND NOT (c.relkind = 'S' AND EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                                       AND d.objid = c.oid AND d.deptype IN ('a', 'i')))
UNION ALL
SELECT format('ALTER %s %I.%I OWNER TO %I', CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END,
              ns.nspname, t.typname, :role)
FROM pg_type t JOIN ns ON ns.oid = t.typnamespace
WHERE t.typtype IN ('e', 'd', 'r') AND t.typowner <> (SELECT oid FROM me)
  AND NOT EXISTS (SELECT FROM ext WHERE classid = 'pg_type'::regclass AND objid = t.oid)
UNION ALL
SELECT format('ALTER %s %s OWNER TO %I',
              CASE p.prokind WHEN 'p' THEN 'PROCEDURE' WHEN 'a' THEN 'AGGREGATE' ELSE 'FUNCTION' END,
              p.oid::regprocedure, :role)
FROM pg_proc p JOIN ns ON ns.oid = p.pronamespace
WHERE p.proowner <> (SELECT oid FROM me)
  AND NOT EXISTS (SELECT FROM ext WHERE classid = 'pg_proc'::regclass AND objid = p.oid)
"""


def extensions(admin: Connection, names: tuple[str, ...]) -> None:
    """Create the listed extensions (and what they need) as the VERIFY_DATABASE_URL role."""
    for name in names:
        try:
            admin.execute(sa.text(f"CREATE EXTENSION IF NOT EXISTS {quote(name)} CASCADE"))
        except sa.exc.DBAPIError as exc:
            raise ConfigError(f"VERIFY_EXTENSIONS: cannot create the extension {name} in the scratch "
                              f"database ({reason(exc)}): install it on the verify server, or "
                              "remove it from VERIFY_EXTENSIONS") from None


def adopt(admin: Connection, role: str) -> int:
    """Make `role` the owner of what the template put in the scratch database; return how many
    objects changed owner."""
    statements = admin.execute(sa.text(_ADOPT), {"role": role}).scalars().all()
    for statement in statements:
        try:
            admin.execute(sa.text(statement))
        except sa.exc.DBAPIError as exc:
            raise ConfigError(f"cannot hand the template's objects to the revisions' role ({statement}: "
                              f"{reason(exc)}): let the VERIFY_DATABASE_URL role own the objects of "
                              "VERIFY_TEMPLATE (or template1), or make it a superuser") from None
    return len(statements)


def setup(conn: Connection, script: Path) -> None:
    """Run VERIFY_SETUP on the scratch database, as the revisions' role, and commit."""
    try:
        with conn.begin():
            if script.suffix == ".py":
                _python(script)(conn)
            else:
                conn.connection.dbapi_connection.cursor().execute(_sql(script))  # type: ignore[union-attr]
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's script: any failure is a config error
        raise ConfigError(f"VERIFY_SETUP={script} failed on the scratch database ({describe(exc)}): "
                          "fix the script") from None


def _sql(script: Path) -> str:
    """The file's SQL, sent as one simple-protocol query (several statements, no parameters)."""
    try:
        text = script.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"VERIFY_SETUP={script} cannot be read ({exc}): fix the path") from None
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        if _PSQL_GUARD.match(line):
            continue  # pg_dump's guard against meta-commands: there are none to guard here
        if line.startswith("\\"):
            raise ConfigError(f"VERIFY_SETUP={script} line {number} is a psql meta-command "
                              f"({line.split()[0]}): the setup runs plain SQL; dump with pg_dump "
                              "--schema-only, or use a .py setup")
        lines.append(line)
    return "\n".join(lines)


def _python(script: Path) -> Callable[[Connection], object]:
    spec = importlib.util.spec_from_file_location("runner_verify_setup", script)
    if spec is None or spec.loader is None:
        raise ConfigError(f"VERIFY_SETUP={script} cannot be loaded as Python: fix the path")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except FileNotFoundError:
        raise ConfigError(f"VERIFY_SETUP={script} does not exist: fix the path") from None
    fn = getattr(module, "setup", None)
    if not callable(fn):
        raise ConfigError(f"VERIFY_SETUP={script} defines no setup(connection) function: add one")
    return fn
