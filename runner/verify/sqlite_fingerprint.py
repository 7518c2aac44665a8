"""A SQLite database's schema fingerprint, in the sections of runner.verify.fingerprint.

Read from sqlite_master and the pragmas SQLite keeps (table_xinfo, foreign_key_list, index_list,
index_xinfo), not from the CREATE statements' text: SQLite stores that text as written, and an
ALTER TABLE or Alembic's batch mode rewrites it, so the same schema reached two ways would
differ. Views and triggers have no other definition: their text, whitespace folded.
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner.sqlname import quote

Fingerprint = dict[str, dict[str, str]]
Table = tuple[str | None, str]
SECTIONS = ("schema", "relation", "column", "constraint", "index", "view", "trigger")


def read(conn: Connection, exclude: Iterable[Table] = ()) -> Fingerprint:
    """Read the fingerprint of every attached database but temp (the version table and the runner's
    tables in exclude left out)."""
    skip = {(schema or "main", name) for schema, name in exclude}
    fp: Fingerprint = {s: {} for s in SECTIONS}
    inspector = sa.inspect(conn)
    for schema in [r[1] for r in conn.exec_driver_sql("PRAGMA database_list") if r[1] != "temp"]:
        fp["schema"][schema] = ""
        rows = conn.exec_driver_sql(f"SELECT type, name, tbl_name, sql FROM {quote(schema)}.sqlite_master "
                                    "WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name").all()
        wheres = {name: _folded(sql).partition(" WHERE ")[2] for kind, name, _, sql in rows
                  if kind == "index" and sql}
        for kind, name, table, sql in rows:
            if (schema, table) in skip:
                continue
            qname = f"{schema}.{name}"
            if kind == "table":
                fp["relation"][qname] = "table"
                _table(conn, inspector, schema, name, fp, wheres)
            elif kind == "view":
                fp["relation"][qname] = "view"
                fp["view"][qname] = _folded(sql)
            elif kind == "trigger":
                fp["trigger"][f"{schema}.{table}.{name}"] = _folded(sql)
    return fp


def _table(conn: Connection, inspector: sa.Inspector, schema: str, name: str, fp: Fingerprint,
           wheres: dict[str, str]) -> None:
    where, qname = f"{quote(schema)}.", f"{schema}.{name}"
    for _, column, type_, notnull, default, pk, hidden in conn.exec_driver_sql(
            f"PRAGMA {where}table_xinfo({quote(name)})"):
        fp["column"][f"{qname}.{column}"] = (
            (type_ or "(no type)").lower() + (" not null" if notnull else "")
            + (f" default {_unwrapped(default)}" if default is not None else "")
            + (f" primary key #{pk}" if pk else "") + (" generated" if hidden in (2, 3) else ""))
    fks: dict[int, list[tuple[str, str, str, str, str]]] = {}
    for fk_id, _, parent, frm, to, on_update, on_delete, _match in conn.exec_driver_sql(
            f"PRAGMA {where}foreign_key_list({quote(name)})"):
        fks.setdefault(fk_id, []).append((parent, frm, to or "", on_update, on_delete))
    for parts in fks.values():
        parent = parts[0][0]
        cols, refs = ", ".join(p[1] for p in parts), ", ".join(p[2] for p in parts)
        fp["constraint"][f"{qname}.foreign key ({cols})"] = (
            f"REFERENCES {parent} ({refs}) ON UPDATE {parts[0][3]} ON DELETE {parts[0][4]}")
    for check in inspector.get_check_constraints(name, schema=schema):
        label = check.get("name") or _folded(check["sqltext"])
        fp["constraint"][f"{qname}.check {label}"] = f"CHECK ({_folded(check['sqltext'])})"
    for _, index, unique, origin, partial in conn.exec_driver_sql(
            f"PRAGMA {where}index_list({quote(name)})"):
        cols = ", ".join(str(r[2]) + (" DESC" if r[3] else "") for r in conn.exec_driver_sql(
            f"PRAGMA {where}index_xinfo({quote(index)})") if r[5])
        if origin == "pk":
            continue  # the columns say primary key
        if origin == "u":  # a UNIQUE constraint: named by its columns (SQLite names them itself)
            fp["constraint"][f"{qname}.unique ({cols})"] = "UNIQUE"
            continue
        fp["index"][f"{schema}.{index}"] = (f"{'UNIQUE ' if unique else ''}INDEX ON {name} ({cols})"
                                            + (f" WHERE {wheres.get(index, '?')}" if partial else ""))


def _unwrapped(default: str) -> str:
    """Return a default without the parentheses batch mode writes around it: (CURRENT_TIMESTAMP) and
    CURRENT_TIMESTAMP are one default."""
    while default.startswith("(") and default.endswith(")") and _balanced(default[1:-1]):
        default = default[1:-1]
    return default


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def _folded(sql: str | None) -> str:
    return " ".join((sql or "").split())
