"""What the catalog says about the objects an online operation works on.

Every operation looks before each step and skips what an earlier, interrupted attempt already
did: this is what makes a rerun after a crash continue instead of failing on "already exists".
"""

from __future__ import annotations

import dataclasses
import hashlib

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from runner.errors import MigrationFailed
from runner.sqlname import qualified


@dataclasses.dataclass(frozen=True)
class Table:
    oid: int
    schema: str
    name: str

    @property
    def sql(self) -> str:
        """The table's name in SQL, always schema-qualified (resolved once, through search_path)."""
        return qualified(self.schema, self.name)

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    type: str  # format_type(): the type as SQL, with its modifiers
    collation: str | None  # a non-default collation, as SQL (COLLATE "x"), or None
    notnull: bool
    default: str | None  # pg_get_expr() of the default, or None
    identity: bool
    generated: bool

    @property
    def type_sql(self) -> str:
        return f"{self.type} COLLATE {self.collation}" if self.collation else self.type


@dataclasses.dataclass(frozen=True)
class Index:
    oid: int
    table_oid: int | None  # None: the name belongs to a relation that is not an index
    valid: bool
    builder: int | None  # pid of a backend building it right now (CREATE INDEX CONCURRENTLY)


@dataclasses.dataclass(frozen=True)
class Constraint:
    type: str  # pg_constraint.contype: c, f, u, p, x, n (NOT NULL, PostgreSQL 18+)
    validated: bool


def table(conn: Connection, name: str, schema: str | None) -> Table:
    """Resolve a table as the revision's session does (search_path when schema is None)."""
    row = conn.execute(sa.text(
        "SELECT c.oid, n.nspname, c.relname FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(:t)"),
        {"t": qualified(schema, name)}).first()
    if row is None:
        raise MigrationFailed(f"table {qualified(schema, name)} does not exist (schema "
                              f"{'search_path' if schema is None else schema}): check the name and the "
                              "revision order")
    return Table(row.oid, row.nspname, row.relname)


def column(conn: Connection, table: Table, name: str) -> Column | None:
    row = conn.execute(sa.text("""
        SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid) AS dflt, a.attidentity <> '' AS identity,
               a.attgenerated <> '' AS generated,
               CASE WHEN a.attcollation <> t.typcollation THEN quote_ident(co.collname) END AS coll
        FROM pg_attribute a
        JOIN pg_type t ON t.oid = a.atttypid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        LEFT JOIN pg_collation co ON co.oid = a.attcollation
        WHERE a.attrelid = :t AND a.attname = :c AND a.attnum > 0 AND NOT a.attisdropped"""),
        {"t": table.oid, "c": name}).first()
    if row is None:
        return None
    return Column(row.attname, row.type, row.coll, row.attnotnull, row.dflt, row.identity,
                  row.generated)


def index(conn: Connection, schema: str, name: str) -> Index | None:
    """The relation called name in schema (indexes share the namespace of tables), or None."""
    row = conn.execute(sa.text("""
        SELECT c.oid, i.indrelid, coalesce(i.indisvalid, false) AS valid,
               (SELECT p.pid FROM pg_stat_progress_create_index p
                WHERE p.index_relid = c.oid LIMIT 1) AS builder
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_index i ON i.indexrelid = c.oid
        WHERE n.nspname = :s AND c.relname = :n"""), {"s": schema, "n": name}).first()
    if row is None:
        return None
    return Index(row.oid, row.indrelid, row.valid, row.builder)


def constraint(conn: Connection, table: Table, name: str) -> Constraint | None:
    row = conn.execute(sa.text(
        "SELECT contype, convalidated FROM pg_constraint WHERE conrelid = :t AND conname = :n"),
        {"t": table.oid, "n": name}).first()
    return None if row is None else Constraint(row.contype, row.convalidated)


def trigger_exists(conn: Connection, table: Table, name: str) -> bool:
    return bool(conn.execute(sa.text(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = :t AND tgname = :n)"),
        {"t": table.oid, "n": name}).scalar_one())


def primary_key(conn: Connection, table: Table) -> list[tuple[str, str]]:
    """The primary key's columns with their types, in key order ([] without a primary key)."""
    rows = conn.execute(sa.text("""
        SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type
        FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, pos)
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = :t AND i.indisprimary ORDER BY k.pos"""), {"t": table.oid}).all()
    return [(r.attname, r.type) for r in rows]


def owned_sequence(conn: Connection, table: Table, column_name: str) -> str | None:
    """The sequence a serial column owns (dropping the column would drop it), as SQL, or None."""
    seq = conn.execute(sa.text("SELECT pg_get_serial_sequence(:t, :c)"),
                       {"t": table.sql, "c": column_name}).scalar_one()
    return str(seq) if seq else None


def short_name(*parts: str) -> str:
    """parts joined by "_", cut to PostgreSQL's 63 bytes with a hash that keeps it unique."""
    name = "_".join(parts)
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return name.encode()[:54].decode(errors="ignore") + "_" + digest


def dependents(conn: Connection, table: Table, column_name: str) -> list[str]:
    """Indexes and constraints that go when the column is dropped (NOT NULL aside), described."""
    return list(conn.execute(sa.text("""
        SELECT pg_describe_object(d.classid, d.objid, d.objsubid)
        FROM pg_depend d
        JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
        LEFT JOIN pg_constraint c ON d.classid = 'pg_constraint'::regclass AND c.oid = d.objid
        WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = :t AND a.attname = :c
          AND d.classid IN ('pg_class'::regclass, 'pg_constraint'::regclass)
          AND coalesce(c.contype, '') <> 'n'
        ORDER BY 1"""), {"t": table.oid, "c": column_name}).scalars())
