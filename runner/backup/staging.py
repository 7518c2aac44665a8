"""The new database a parallel restore fills, and the swap that puts it in the target's place.

Created like the target (template0, its encoding, locale, owner and tablespace); after the
restore it gets the target's database-level settings (ALTER DATABASE ... SET, ALTER ROLE ... IN
DATABASE ... SET), privileges, connection limit and comment. The swap: both databases closed to
new connections, every session on the target ended, then ONE transaction renames the target to
runner_prev_<tag>_<run id> and the new database to the target's name and opens it; the previous
contents are dropped after the commit. Names carry tag = the first 8 hex digits of sha256(target
name), so the next parallel restore of that database finds and drops what a killed run left
(it holds the migration lock: no other restore of it runs at the same time).

Every statement runs on a session in a maintenance database (postgres, else template1): a
database with sessions in it cannot be renamed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner import db
from runner.context import Run
from runner.db import db_message
from runner.errors import BackupFailed, LockRetriesExhausted

MAINTENANCE = ("postgres", "template1")
SESSIONS_GONE_WITHIN = 15.0  # seconds for terminated sessions to exit
# settings whose value is a list: each element is written as a literal of its own (as pg_dump does)
LIST_SETTINGS = {"search_path", "temp_tablespaces", "session_preload_libraries",
                 "local_preload_libraries", "shared_preload_libraries", "unix_socket_directories"}

PREREQUISITES_SQL = sa.text("""
SELECT r.rolsuper AS superuser, r.rolcreatedb AS createdb,
       pg_catalog.pg_has_role(d.datdba, 'MEMBER') AS owner,
       (SELECT m.datname FROM pg_catalog.pg_database m
         WHERE m.datname IN ('postgres', 'template1') AND m.datallowconn
           AND pg_catalog.has_database_privilege(m.datname, 'CONNECT')
         ORDER BY m.datname <> 'postgres' LIMIT 1) AS maintenance
  FROM pg_catalog.pg_database d, pg_catalog.pg_roles r
 WHERE d.datname = current_database() AND r.rolname = current_user
""")
UNENDABLE_SQL = sa.text("""
SELECT a.pid, a.usename, a.application_name FROM pg_catalog.pg_stat_activity a
 WHERE a.datname = current_database() AND a.pid <> pg_catalog.pg_backend_pid()
   AND a.usesysid IS NOT NULL AND a.application_name NOT LIKE :ours
   AND NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user)
   AND NOT pg_catalog.pg_has_role(a.usesysid, 'MEMBER')
   AND NOT (pg_catalog.pg_has_role('pg_signal_backend', 'MEMBER')
            AND NOT coalesce((SELECT rolsuper FROM pg_catalog.pg_roles WHERE oid = a.usesysid), true))
""")
DATABASE_SQL = sa.text("""
SELECT d.oid, to_jsonb(d) - 'datacl' AS props, pg_catalog.pg_encoding_to_char(d.encoding) AS encoding,
       pg_catalog.pg_get_userbyid(d.datdba) AS owner, t.spcname AS tablespace,
       pg_catalog.shobj_description(d.oid, 'pg_database') AS comment
  FROM pg_catalog.pg_database d JOIN pg_catalog.pg_tablespace t ON t.oid = d.dattablespace
 WHERE d.datname = :name
""")
ACL_SQL = sa.text("""
SELECT coalesce(pg_catalog.pg_get_userbyid(NULLIF(a.grantee, 0)), 'PUBLIC') AS grantee,
       a.grantee = 0 AS public, a.privilege_type, a.is_grantable
  FROM pg_catalog.pg_database d, aclexplode(d.datacl) a WHERE d.datname = :name
""")
HAS_ACL_SQL = sa.text("SELECT datacl IS NOT NULL FROM pg_catalog.pg_database WHERE datname = :name")
SETTINGS_SQL = sa.text("""
SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_catalog.pg_get_userbyid(s.setrole) END AS role,
       c.config FROM pg_catalog.pg_db_role_setting s, unnest(s.setconfig) AS c(config)
 WHERE s.setdatabase = :oid ORDER BY 1 NULLS FIRST, 2
""")
# sessions of a role (backend_type is hidden from roles without pg_read_all_stats; autovacuum
# workers have no role, and the rename ends them itself)
SESSIONS_SQL = sa.text("""
SELECT pid, usename, application_name FROM pg_catalog.pg_stat_activity
 WHERE datname = :name AND pid <> pg_catalog.pg_backend_pid() AND usesysid IS NOT NULL
""")


def tag(database: str) -> str:
    return hashlib.sha256(database.encode()).hexdigest()[:8]


def why_not(run: Run, conn: Connection) -> str | None:
    """Return why this role cannot restore through a new database now (None: it can).

    conn is a session in the target database."""
    r = conn.execute(PREREQUISITES_SQL).mappings().one()
    if not (r["superuser"] or r["createdb"]):
        return "the role may not create databases (it needs CREATEDB)"
    if not r["owner"]:
        return "the role does not own the database (it needs to be the owner, or a member of it)"
    if not r["maintenance"]:
        return ("the role may connect to neither postgres nor template1 (the renames run from "
                "another database than the two renamed)")
    others = conn.execute(UNENDABLE_SQL, {"ours": f"{run.settings.application_name}/%/{run.run_id}"})
    stuck = [f"pid {x.pid} ({x.usename}, {x.application_name or 'no application_name'})" for x in others]
    if stuck:
        return (f"other sessions on the database belong to roles this role may not end "
                f"({', '.join(stuck[:5])}; it needs pg_signal_backend)")
    try:  # pg_hba.conf may still refuse it
        db.connect(_admin_run(run, r["maintenance"]), "restore-admin", connect_timeout=10).close()
    except sa.exc.DBAPIError as exc:
        return f"the role cannot connect to the {r['maintenance']} database ({db_message(exc)})"
    return None


@dataclasses.dataclass
class Staging:
    """One parallel restore's new database, and the swap."""

    run: Run
    target: str
    name: str = ""
    prev: str = ""
    oid: int | None = None
    swapped: bool = False

    def __post_init__(self) -> None:
        t = tag(self.target)
        self.name = f"runner_restore_{t}_{self.run.run_id}"
        self.prev = f"runner_prev_{t}_{self.run.run_id}"
        self.admin = _admin_run(self.run, _maintenance(self.run))

    def url(self) -> Any:
        """The new database's URL (for pg_restore)."""
        return self.run.settings.database_url.set(database=self.name)

    # -- before -------------------------------------------------------------------------------
    def sweep(self) -> None:
        """Drop what a killed parallel restore of this database left behind."""
        pattern = f"runner\\_restore\\_{tag(self.target)}\\_%"
        with self._connect(autocommit=True) as c:
            found = c.execute(sa.text(
                "SELECT datname FROM pg_catalog.pg_database WHERE datname LIKE :a OR datname LIKE :b"),
                {"a": pattern, "b": pattern.replace("restore", "prev")}).scalars().all()
            for name in found:
                c.execute(sa.text(_format(c, "DROP DATABASE IF EXISTS %I WITH (FORCE)", name)))
                self.run.log.warning("restore.sweep", f"dropped {name}, left by a restore of "
                                     f"{self.target} that was killed")

    def create(self) -> None:
        """CREATE DATABASE like the target; raise BackupFailed (the target is untouched)."""
        with self._connect(autocommit=True) as c:
            t = c.execute(DATABASE_SQL, {"name": self.target}).mappings().one()
            p = t["props"]
            parts = ["CREATE DATABASE %I WITH TEMPLATE template0 ENCODING %L LC_COLLATE %L LC_CTYPE %L "
                     "OWNER %I"]
            args = [self.name, t["encoding"], p["datcollate"], p["datctype"], t["owner"]]
            if t["tablespace"] != "pg_default":  # naming it needs CREATE on it, even the default
                parts.append("TABLESPACE %I")
                args.append(t["tablespace"])
            provider = {"c": "libc", "i": "icu", "b": "builtin"}.get(p.get("datlocprovider") or "c")
            if "datlocprovider" in p:
                parts.append(f"LOCALE_PROVIDER {provider}")
            locale = p.get("datlocale") or p.get("daticulocale")
            if provider in ("icu", "builtin") and locale:
                parts.append("ICU_LOCALE %L" if provider == "icu" else "BUILTIN_LOCALE %L")
                args.append(locale)
            if p.get("daticurules"):
                parts.append("ICU_RULES %L")
                args.append(p["daticurules"])
            try:
                c.execute(sa.text(_format(c, " ".join(parts), *args)))
            except sa.exc.DBAPIError as exc:
                raise BackupFailed(f"could not create the database to restore into ({db_message(exc)}): "
                                   "RESTORE_JOBS=1 restores in place instead; the database was not "
                                   "touched") from None
            self.oid = c.execute(sa.text("SELECT oid FROM pg_catalog.pg_database WHERE datname = :n"),
                                 {"n": self.name}).scalar_one()
        self.run.log("restore.staging", f"created {self.name} to restore into, like {self.target}",
                     owner=t["owner"], encoding=t["encoding"], tablespace=t["tablespace"])

    def size(self) -> int | None:
        """The new database's size so far (progress); None when it cannot be read."""
        try:
            with self._connect(autocommit=True) as c:
                return int(c.execute(sa.text("SELECT pg_catalog.pg_database_size(:n)"),
                                     {"n": self.name}).scalar_one())
        except sa.exc.DBAPIError:
            return None

    def copy_properties(self) -> None:
        """Give the new database the target's settings, privileges, connection limit and comment.

        After the restore: a setting such as default_transaction_read_only must not apply to it.
        A statement the role may not run fails the restore (the target is untouched): a
        database that silently lost a role's search_path would break its application."""
        with self._connect(autocommit=True) as c:
            t = c.execute(DATABASE_SQL, {"name": self.target}).mappings().one()
            statements = self._properties(c, t)
            for statement in statements:
                try:
                    c.execute(sa.text(statement))
                except sa.exc.DBAPIError as exc:
                    raise BackupFailed(
                        f"could not give the restored database the target's properties "
                        f"({db_message(exc)}): RESTORE_JOBS=1 restores in place and keeps them; the "
                        "database was not touched") from None
        if statements:
            self.run.log("restore.properties", f"copied {len(statements)} database-level setting(s) "
                         f"and privilege(s) of {self.target}")

    def _properties(self, c: Connection, t: Any) -> list[str]:
        out = []
        if t["props"]["datconnlimit"] != -1:
            out.append(_format(c, f"ALTER DATABASE %I CONNECTION LIMIT {int(t['props']['datconnlimit'])}",
                               self.name))
        if c.execute(HAS_ACL_SQL, {"name": self.target}).scalar_one():
            out += [_format(c, "REVOKE ALL ON DATABASE %I FROM PUBLIC", self.name),
                    _format(c, "REVOKE ALL ON DATABASE %I FROM %I", self.name, t["owner"])]
            for a in c.execute(ACL_SQL, {"name": self.target}).mappings():
                grant = "GRANT " + a["privilege_type"] + " ON DATABASE %I TO " + (
                    "PUBLIC" if a["public"] else "%I") + (" WITH GRANT OPTION" if a["is_grantable"] else "")
                out.append(_format(c, grant, self.name, *([] if a["public"] else [a["grantee"]])))
        for s in c.execute(SETTINGS_SQL, {"oid": t["oid"]}).mappings():
            name, _, value = s["config"].partition("=")
            values = _split_list(value) if name in LIST_SETTINGS else [value]
            rhs = ", ".join(_format(c, "%L", v) for v in values) or "''"
            if s["role"] is None:
                out.append(_format(c, "ALTER DATABASE %I SET %I = ", self.name, name) + rhs)
            else:
                out.append(_format(c, "ALTER ROLE %I IN DATABASE %I SET %I = ", s["role"], self.name,
                                   name) + rhs)
        if t["comment"] is not None:
            out.append(_format(c, "COMMENT ON DATABASE %I IS %L", self.name, t["comment"]))
        return out

    # -- the swap ----------------------------------------------------------------------------
    def swap(self) -> None:
        """Close both databases, end the target's sessions, rename both in one transaction.

        Raise (the target's contents unchanged, open again) when a session cannot be ended or a
        rename fails."""
        run = self.run
        with self._connect(autocommit=True) as c:
            c.execute(sa.text(_format(c, "ALTER DATABASE %I WITH ALLOW_CONNECTIONS false", self.name)))
            c.execute(sa.text(_format(c, "ALTER DATABASE %I WITH ALLOW_CONNECTIONS false", self.target)))
            reopen = _format(c, "ALTER DATABASE %I WITH ALLOW_CONNECTIONS true", self.target)
            run.log("restore.swap", f"{self.target} is closed to new connections for the swap (should "
                    f"the runner die before it ends: {reopen})")
            try:
                self._end_sessions(c)
                self._rename()
            except BaseException:
                c.execute(sa.text(reopen))
                raise
        self.swapped = True
        run.summary["swapped"] = True
        run.log("restore.swapped", f"{self.target} is now the restored database; its previous "
                f"contents are {self.prev}, dropped next")

    def _end_sessions(self, c: Connection) -> None:
        stuck = []
        ours = f"{self.run.settings.application_name}/"
        for s in c.execute(SESSIONS_SQL, {"name": self.target}).mappings().all():
            try:
                c.execute(sa.text("SELECT pg_catalog.pg_terminate_backend(:pid)"), {"pid": s["pid"]})
            except sa.exc.DBAPIError as exc:
                stuck.append(f"pid {s['pid']} ({s['usename']}, {s['application_name']}: {db_message(exc)})")
                continue
            if not (s["application_name"] or "").startswith(ours):
                self.run.log.warning("restore.ended_session", "ended a session on the database for the "
                                     "swap", pid=s["pid"], user=s["usename"],
                                     application_name=s["application_name"])
        if stuck:
            raise LockRetriesExhausted(f"could not end every session on {self.target} for the swap "
                                       f"({'; '.join(stuck[:5])}): the restored copy was dropped, "
                                       "nothing was changed: stop the application, or grant "
                                       "pg_signal_backend, then retry")
        deadline = time.monotonic() + SESSIONS_GONE_WITHIN
        while c.execute(SESSIONS_SQL, {"name": self.target}).first() is not None:
            if time.monotonic() > deadline:
                raise LockRetriesExhausted(f"sessions on {self.target} did not end within "
                                           f"{SESSIONS_GONE_WITHIN:g}s of being terminated: the "
                                           "restored copy was dropped, nothing was changed; retry")
            self.run.cancel.sleep(0.05)

    def _rename(self) -> None:
        """The commit point: both renames and the reopening in one transaction."""
        with self._connect(autocommit=False) as tx, tx.begin():
            oids = dict(tx.execute(sa.text(
                "SELECT datname, oid FROM pg_catalog.pg_database WHERE datname IN (:a, :b)"),
                {"a": self.name, "b": self.target}).all())
            if oids.get(self.name) != self.oid or self.target not in oids:
                raise BackupFailed(f"{self.name} or {self.target} changed during the restore (renamed "
                                   "or replaced by someone else): nothing was swapped")
            for template, *args in (("ALTER DATABASE %I RENAME TO %I", self.target, self.prev),
                                    ("ALTER DATABASE %I RENAME TO %I", self.name, self.target),
                                    ("ALTER DATABASE %I WITH ALLOW_CONNECTIONS true", self.target)):
                tx.execute(sa.text(_format(tx, template, *args)))

    # -- after -------------------------------------------------------------------------------
    def drop(self) -> None:
        """Drop the new database (the restore failed before the swap); best effort."""
        try:
            with self._connect(autocommit=True) as c:
                c.execute(sa.text(_format(c, "DROP DATABASE IF EXISTS %I WITH (FORCE)", self.name)))
        except Exception as exc:  # noqa: BLE001 - the restore's own error is what matters
            self.run.log.warning("restore.cleanup", f"could not drop {self.name} ({exc.__class__.__name__}):"
                                 " the next parallel restore of this database drops it")

    def drop_prev(self) -> None:
        """Drop the target's previous contents; a failure only warns (the restore is done)."""
        try:
            with self._connect(autocommit=True) as c:
                c.execute(sa.text(_format(c, "DROP DATABASE %I WITH (FORCE)", self.prev)))
        except sa.exc.DBAPIError as exc:
            self.run.log.warning("restore.cleanup", f"the restore is complete, but the previous contents "
                                 f"{self.prev} could not be dropped ({db_message(exc)}): drop it when "
                                 "its replication slots or subscriptions are gone; the next parallel "
                                 "restore of this database tries again")

    def _connect(self, autocommit: bool) -> Connection:
        return db.connect(self.admin, "restore-admin", autocommit=autocommit, connect_timeout=10)


def _maintenance(run: Run) -> str:
    with db.connect(run, "restore-info") as conn:
        return conn.execute(PREREQUISITES_SQL).mappings().one()["maintenance"] or MAINTENANCE[0]


def _admin_run(run: Run, maintenance: str) -> Run:
    """A copy of run whose database is the server's maintenance database."""
    settings = dataclasses.replace(run.settings,
                                   database_url=run.settings.database_url.set(database=maintenance))
    return dataclasses.replace(run, settings=settings)


def _format(c: Connection, template: str, *args: Any) -> str:
    """Quote identifiers (%I) and literals (%L) the server's way: format()."""
    return str(c.execute(sa.text("SELECT format(:t, VARIADIC CAST(:a AS text[]))"),
                         {"t": template, "a": [str(a) for a in args]}).scalar_one())


def _split_list(value: str) -> list[str]:
    """Split a list setting as the server stores it (`"$user", public`) into its elements."""
    return [m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2).strip()
            for m in re.finditer(r'\s*(?:"((?:[^"]|"")*)"|([^,]+))\s*(?:,|$)', value) if m.group(0).strip()]
