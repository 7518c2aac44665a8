"""What to use instead: the online operation (runner.online, docs/online.md) that does what a
blocking statement does without the blocking lock, with its arguments where they are cheap to
read.

Two sources. A lint finding has its rule and its statement: for_rule() reads the names from the
SQL text (`CREATE INDEX ix_a ON accounts (email)` -> `op.create_index_online('ix_a', 'accounts',
['email'])`). An observed lock has no statement when it was taken inside a transaction: changes()
reads how the revision changed each table's schema (a new index, a column's new type, a new NOT
NULL...) from the fingerprints before and after it, and for_observed() picks the change that
explains what was observed. Names are as PostgreSQL stores them (quotes removed); `schema=` is
given outside `public`. What cannot be read cheaply is left as `...`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

from runner.online.catalog import short_name
from runner.verify.fingerprint import Fingerprint

POST_DEPLOY = 'a post-deploy revision (runner_phase = "post-deploy")'

_NAME = r'(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*)'
_QNAME = rf"{_NAME}(?:\s*\.\s*{_NAME})?"
_COLUMN_TAIL = re.compile(r" (?:not null|generated |default |collate |comment )")
_COLUMN_END = (r"(?=\s+(?:DEFAULT|NOT\s+NULL|NULL|CONSTRAINT|REFERENCES|CHECK|UNIQUE|PRIMARY|GENERATED|"
               r"COLLATE)\b|\s*,|\s*$)")
# SQL type (as written, or as format_type() prints it) -> the SQLAlchemy type for a Column
_TYPES = [(re.compile(p, re.I), t) for p, t in (
    (r"bigint|int8", "sa.BigInteger()"), (r"integer|int|int4", "sa.Integer()"),
    (r"smallint|int2", "sa.SmallInteger()"), (r"text", "sa.Text()"),
    (r"(?:character varying|varchar)\s*\(\s*(\d+)\s*\)", "sa.String({0})"),
    (r"character varying|varchar", "sa.String()"), (r"boolean|bool", "sa.Boolean()"),
    (r"uuid", "sa.Uuid()"), (r"(?:numeric|decimal)\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)", "sa.Numeric({0}, {1})"),
    (r"(?:numeric|decimal)\s*\(\s*(\d+)\s*\)", "sa.Numeric({0})"), (r"numeric|decimal", "sa.Numeric()"),
    (r"timestamp(?:\s*\(\d\))?\s+with\s+time\s+zone|timestamptz", "sa.DateTime(timezone=True)"),
    (r"timestamp(?:\s*\(\d\))?(?:\s+without\s+time\s+zone)?", "sa.DateTime()"), (r"date", "sa.Date()"),
    (r"double precision|float8", "sa.Double()"), (r"real|float4", "sa.REAL()"),
    (r"jsonb", "postgresql.JSONB()"), (r"json", "sa.JSON()"), (r"bytea", "sa.LargeBinary()"))]


class Code(str):
    """Python source to print as it is (a type, sa.text(...)), not as a string literal."""


def call(operation: str, *args: object, **kw: object) -> str:
    """`op.<operation>(...)` with its arguments as Python source."""
    parts = [_py(a) for a in args] + [f"{k}={_py(v)}" for k, v in kw.items() if v is not None]
    return f"op.{operation}({', '.join(parts)})"


def _py(value: object) -> str:
    if isinstance(value, Code):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_py(v) for v in value) + "]"
    return repr(value)


def sa_type(sql: str) -> Code:
    """The SQLAlchemy type for an SQL type name; `...` when there is no cheap one."""
    sql = " ".join(sql.split())
    for pattern, template in _TYPES:
        m = pattern.fullmatch(sql)
        if m:
            return Code(template.format(*m.groups()))
    return Code("...")


def expand_contract(kind: str, table: str, schema: str | None, old: str, new: str,
                    type_: Code | None = None, using: str | None = None) -> str:
    """The expand call, then the contract call in a post-deploy revision."""
    if kind == "rename":
        first = call("rename_column_expand", table, old, new, schema=schema)
        then = call("rename_column_contract", table, old, new, schema=schema)
    else:
        first = call("alter_column_type_expand", table, old, new, type_ or Code("..."), using=using,
                     schema=schema)
        then = call("alter_column_type_contract", table, old, new, schema=schema)
    return f"{first}, then {then} in {POST_DEPLOY}"


# -- from a lint finding: the rule and the statement -----------------------------------------------
def for_rule(rule: str, statement: str) -> str | None:
    """The online operation to use instead of the statement a Squawk rule flags (None: none)."""
    text = " ".join(statement.split())
    if rule == "require-concurrent-index-creation":
        return _create_index(text) or "op.create_index_online"
    if rule == "require-concurrent-index-deletion":
        return _drop_index(text) or "op.drop_index_online"
    if rule in ("adding-foreign-key-constraint", "constraint-missing-not-valid",
                "disallowed-unique-constraint"):
        return _constraint(rule, text)
    if rule == "adding-not-nullable-field":
        m = re.search(rf"^ALTER TABLE (?:IF EXISTS )?(?:ONLY )?(?P<t>{_QNAME}) .*?ALTER (?:COLUMN )?"
                      rf"(?P<c>{_NAME}) SET NOT NULL", text, re.I)
        if m is None:
            return "op.set_not_null_online"
        table, schema = _split(m["t"])
        return call("set_not_null_online", table, _unquote(m["c"]), schema=schema)
    if rule in ("adding-field-with-default", "adding-required-field"):
        return _add_column(text)
    if rule == "changing-column-type":
        m = re.search(rf"^ALTER TABLE (?:IF EXISTS )?(?:ONLY )?(?P<t>{_QNAME}) .*?ALTER (?:COLUMN )?"
                      rf"(?P<c>{_NAME}) (?:SET DATA )?TYPE (?P<type>.+?)(?: USING (?P<using>.+?))?"
                      r"(?:,\s*ALTER\b.*)?$", text, re.I)
        if m is None:
            return "op.alter_column_type_expand / op.alter_column_type_contract"
        table, schema = _split(m["t"])
        column = _unquote(m["c"])
        type_sql = re.split(r"\s+COLLATE\s+", m["type"], flags=re.I)[0]
        return expand_contract("type", table, schema, column, f"{column}_new", sa_type(type_sql), m["using"])
    if rule == "renaming-column":
        m = re.search(rf"^ALTER TABLE (?:IF EXISTS )?(?:ONLY )?(?P<t>{_QNAME}) RENAME (?:COLUMN )?"
                      rf"(?P<a>{_NAME}) TO (?P<b>{_NAME})", text, re.I)
        if m is None:
            return "op.rename_column_expand / op.rename_column_contract"
        table, schema = _split(m["t"])
        return expand_contract("rename", table, schema, _unquote(m["a"]), _unquote(m["b"]))
    if rule in BREAKS_THE_PREVIOUS_RELEASE:
        return POST_DEPLOY
    return None


# rules about what the previous release, still running during the rollout, may use: safe once
# it is gone, in a post-deploy revision (renaming is not: the new release uses the new name)
BREAKS_THE_PREVIOUS_RELEASE = frozenset({"ban-drop-column", "ban-drop-table", "ban-drop-not-null",
                                         "ban-drop-constraint", "ban-drop-function", "ban-drop-view",
                                         "ban-drop-type", "ban-drop-sequence", "ban-drop-domain",
                                         "ban-drop-trigger"})


def _create_index(text: str) -> str | None:
    m = re.search(rf"^CREATE (?P<u>UNIQUE )?INDEX (?:IF NOT EXISTS )?(?P<n>{_NAME}) ON (?:ONLY )?"
                  rf"(?P<t>{_QNAME})(?: USING (?P<using>\w+))? ?\(", text, re.I)
    if m is None:
        return None
    columns, rest = _parenthesized(text[m.end():])
    table, schema = _split(m["t"])
    where = re.search(r"\bWHERE (.+)$", rest, re.I)
    using = m["using"] if m["using"] and m["using"].lower() != "btree" else None
    return call("create_index_online", _unquote(m["n"]), table, _columns(columns), schema=schema,
                unique=True if m["u"] else None, postgresql_using=using,
                postgresql_where=Code(f"sa.text({where[1]!r})") if where else None)


def _drop_index(text: str) -> str | None:
    m = re.search(rf"^DROP INDEX (?:IF EXISTS )?(?P<n>{_QNAME})\s*(?:CASCADE|RESTRICT)?$", text, re.I)
    if m is None:
        return None
    name, schema = _split(m["n"])
    return call("drop_index_online", name, schema=schema)


def _constraint(rule: str, text: str) -> str | None:
    m = re.search(rf"^ALTER TABLE (?:IF EXISTS )?(?:ONLY )?(?P<t>{_QNAME}) (?P<body>.*)$", text, re.I)
    if m is None:
        return None
    table, schema = _split(m["t"])
    body = m["body"]
    if re.match(rf"VALIDATE CONSTRAINT {_NAME}", body, re.I):  # validated in the same transaction
        return ("op.create_foreign_key_online or op.create_check_constraint_online (each validates "
                "in a transaction of its own)")
    add = re.match(rf"ADD (?:CONSTRAINT (?P<n>{_NAME}) )?(?P<what>.*)$", body, re.I)
    if add is None:
        if rule == "adding-foreign-key-constraint":  # ADD COLUMN ... REFERENCES
            return "op.add_column, then op.create_foreign_key_online"
        return None
    name, what = _unquote(add["n"]) if add["n"] else None, add["what"]
    fk = re.match(rf"FOREIGN KEY \((?P<a>[^)]*)\) REFERENCES (?P<r>{_QNAME})\s*(?:\((?P<b>[^)]*)\))?"
                  r"(?P<rest>.*)$", what, re.I)
    if fk is not None:
        local = _columns(fk["a"])
        referent, referent_schema = _split(fk["r"])
        on = {k: re.search(rf"\bON {k.upper()} (CASCADE|RESTRICT|SET NULL|SET DEFAULT|NO ACTION)",
                           fk["rest"], re.I) for k in ("delete", "update")}
        return call("create_foreign_key_online", name or f"{table}_{'_'.join(map(str, local))}_fkey",
                    table, referent, local, _columns(fk["b"]) if fk["b"] else ["..."],
                    ondelete=on["delete"][1].upper() if on["delete"] else None,
                    onupdate=on["update"][1].upper() if on["update"] else None,
                    source_schema=schema, referent_schema=referent_schema)
    check = re.match(r"CHECK \((?P<c>.*)\)(?: NOT VALID)?$", what, re.I)
    if check is not None:
        return call("create_check_constraint_online", name or f"{table}_check", table, check["c"],
                    schema=schema)
    unique = re.match(r"UNIQUE (?:NULLS (?:NOT )?DISTINCT )?\((?P<c>[^)]*)\)", what, re.I)
    if unique is not None:
        columns = _columns(unique["c"])
        return call("create_unique_constraint_online", name or f"{table}_{'_'.join(map(str, columns))}_key",
                    table, columns, schema=schema)
    if rule == "adding-foreign-key-constraint":  # ADD COLUMN ... REFERENCES
        return "op.add_column, then op.create_foreign_key_online"
    return None  # a primary key: no online operation for that


def _add_column(text: str) -> str | None:
    m = re.search(rf"^ALTER TABLE (?:IF EXISTS )?(?:ONLY )?(?P<t>{_QNAME}) ADD (?:COLUMN )?"
                  rf"(?:IF NOT EXISTS )?(?P<c>{_NAME}) (?P<type>.+?){_COLUMN_END}(?P<rest>.*)$", text, re.I)
    if m is None:
        return "op.add_column_online"
    rest = re.split(r",\s*(?:ADD|ALTER|DROP)\b", m["rest"], maxsplit=1, flags=re.I)[0]
    if re.search(r"\bGENERATED\b", rest, re.I):
        return None  # identity and generated columns: PostgreSQL writes them itself
    table, schema = _split(m["t"])
    default = re.search(r"\bDEFAULT (.+?)(?=\s+(?:NOT\s+NULL|NULL|CONSTRAINT|REFERENCES|CHECK|UNIQUE|"
                        r"PRIMARY|COLLATE)\b|$)", rest, re.I)
    not_null = bool(re.search(r"\bNOT NULL\b", rest, re.I))
    column = Code(f"sa.Column({_unquote(m['c'])!r}, {sa_type(m['type'])}"
                  + (", nullable=False" if not_null else "")
                  + (f", server_default=sa.text({default[1]!r})" if default else
                     ", server_default=..." if not_null else "") + ")")
    return call("add_column_online", table, column, schema=schema)


# -- from what was observed: how the revision changed the schema --------------------------------------
@dataclasses.dataclass(frozen=True)
class Change:
    """One change a revision made to a table, and the online operation that makes it."""

    table: str  # schema.table as the fingerprint names it
    kind: str  # type, not-null, add-column, rename-column, index, unique-index, drop-index, unique,
    # foreign-key, check
    call: str  # the online operation, with its arguments
    undo: str | None = None  # the operation for the other direction (a downgrade), when known
    name: str | None = None  # an index's

    @property
    def operations(self) -> str:
        """The operation's name(s) alone: `op.rename_column_expand / op.rename_column_contract`."""
        names = re.findall(r"\bop\.\w+", self.call)
        return " / ".join(dict.fromkeys(names)) or self.call


def changes(before: Fingerprint | None, after: Fingerprint | None) -> list[Change]:
    """How the schema changed, per table, with the online operation for each change."""
    if before is None or after is None:
        return []
    found: list[Change] = []
    old, new = before.get("column", {}), after.get("column", {})
    for key in sorted(set(old) | set(new)):
        qtable, column = _split_key(key)
        table, schema = _split(qtable)
        if key in old and key in new and old[key] != new[key]:
            if _type(old[key]) != _type(new[key]):
                found.append(Change(qtable, "type", expand_contract(
                    "type", table, schema, column, f"{column}_new", sa_type(_type(new[key])))))
            if " not null" in new[key] and " not null" not in old[key]:
                found.append(Change(qtable, "not-null", call("set_not_null_online", table, column,
                                                             schema=schema)))
        elif key in new and key not in old:
            if " not null" in new[key] or " default " in new[key]:  # a nullable column is instant
                found.append(Change(qtable, "add-column", call("add_column_online", table, _column(
                    column, new[key]), schema=schema)))
            renamed = [k for k in old if k not in new and _split_key(k)[0] == qtable
                       and _type(old[k]) == _type(new[key])]
            if renamed:
                found.append(Change(qtable, "rename-column", expand_contract(
                    "rename", table, schema, _split_key(renamed[0])[1], column) if len(renamed) == 1
                    else "op.rename_column_expand / op.rename_column_contract"))
    found += _contracted(before, after)
    # an index that comes or goes with a constraint (unique, primary key) is the constraint's
    cons_before, cons_after = before.get("constraint", {}), after.get("constraint", {})
    constraints = {_split_key(k)[1] for k in set(cons_before) ^ set(cons_after)}
    indexes = _indexes(before.get("index", {}), after.get("index", {}))
    found += [c for c in indexes if c.name not in constraints]
    for key in sorted(set(cons_after) - set(cons_before)):
        qtable, name = _split_key(key)
        table, schema = _split(qtable)
        made = _constraint_call(name, table, schema, cons_after[key])
        if made is not None:
            found.append(Change(qtable, *made))
    return found


def _contracted(before: Fingerprint, after: Fingerprint) -> list[Change]:
    """The old column of an expand (rename_column_expand, alter_column_type_expand: its sync
    trigger names both columns) dropped: kind "contract", or "contract-trigger-left" when the
    trigger stays (it still writes the old column: every INSERT and UPDATE fails)."""
    found = []
    for key in sorted(before.get("trigger", {})):
        qtable, trigger = _split_key(key)
        table, schema = _split(qtable)
        old_columns = {c: d for (t, c), d in _by_table(before.get("column", {})).items() if t == qtable}
        new_columns = {c for (t, c) in _by_table(after.get("column", {})) if t == qtable}
        for old, new in [(a, b) for a in old_columns for b in old_columns
                         if a != b and short_name(table, a, b, "sync") == trigger]:
            if old in new_columns or not new_columns:
                continue  # the old column is still there, or the whole table went
            kind = "contract" if key not in after.get("trigger", {}) else "contract-trigger-left"
            rename = _type(old_columns[old]) == _type(old_columns[new])
            operation = "rename_column_contract" if rename else "alter_column_type_contract"
            found.append(Change(qtable, kind, call(operation, table, old, new, schema=schema), name=trigger))
    return found


def _indexes(before: dict[str, str], after: dict[str, str]) -> list[Change]:
    found = []
    for key, definition, kind in ([(k, after[k], "index") for k in sorted(set(after) - set(before))]
                                  + [(k, before[k], "drop-index") for k in sorted(set(before) - set(after))]):
        m = re.search(rf" ON (?:ONLY )?(?P<t>{_QNAME}) USING ", definition)
        if m is None:
            continue
        create = _create_index(definition.removesuffix(" INVALID"))
        name, schema = _split(key)
        drop = call("drop_index_online", name, _split(m["t"])[0], schema=schema)
        if kind == "index":
            unique = definition.startswith("CREATE UNIQUE")
            found.append(Change(m["t"], "unique-index" if unique else "index",
                                create or "op.create_index_online", drop, name))
        else:
            found.append(Change(m["t"], "drop-index", drop, create, name))
    return found


def _constraint_call(name: str, table: str, schema: str | None, definition: str) -> tuple[str, str] | None:
    fk = re.match(rf"FOREIGN KEY \((?P<a>[^)]*)\) REFERENCES (?P<r>{_QNAME})\((?P<b>[^)]*)\)(?P<rest>.*)$",
                  definition)
    if fk is not None:
        referent, referent_schema = _split(fk["r"])
        on = {k: re.search(rf"\bON {k.upper()} (CASCADE|RESTRICT|SET NULL|SET DEFAULT)", fk["rest"])
              for k in ("delete", "update")}
        return "foreign-key", call("create_foreign_key_online", name, table, referent, _columns(fk["a"]),
                                   _columns(fk["b"]), ondelete=on["delete"][1] if on["delete"] else None,
                                   onupdate=on["update"][1] if on["update"] else None, source_schema=schema,
                                   referent_schema=referent_schema)
    check = re.match(r"CHECK \((?P<c>.*)\)(?: NOT VALID)?$", definition)
    if check is not None:
        return "check", call("create_check_constraint_online", name, table, _unwrap(check["c"]),
                             schema=schema)
    unique = re.match(r"UNIQUE (?:NULLS NOT DISTINCT )?\((?P<c>[^)]*)\)$", definition)
    if unique is not None:
        return "unique", call("create_unique_constraint_online", name, table, _columns(unique["c"]),
                              schema=schema)
    return None  # a primary key, an exclusion constraint: no online operation


# which schema changes can explain each kind of observation, most specific first
_EXPLAINS = {
    "table-rewrite": ("type", "add-column"),
    "scan-under-lock": ("not-null", "foreign-key", "check", "unique", "unique-index", "index", "type"),
    "strong-lock": ("rename-column", "drop-index", "foreign-key", "check", "unique", "not-null"),
}


_UNDONE = {"index": "drop-index", "unique-index": "drop-index", "drop-index": "index"}


def for_observed(kind: str, relation: str, *, downgrade: bool, full_update: bool,
                 found: Iterable[Change], statements: Sequence[str] = ()) -> str | None:
    """The online operation that does what this revision did to relation without the blocking
    lock. kind: what was observed; full_update: an UPDATE or DELETE read the table in full; found:
    the upgrade's changes; statements: the SQL the upgrade ran (its UPDATE gives op.backfill's
    arguments). A downgrade undoes the changes: the inverse for an index, the names otherwise."""
    mine = [c for c in found if c.table == relation]
    hints = []
    for wanted in _EXPLAINS.get(kind, ()):
        for c in mine:
            if downgrade and c.kind in _UNDONE:  # undoing an index is dropping it, and the other way round
                if _UNDONE[c.kind] == wanted or (wanted == "index" and c.kind == "drop-index"):
                    hints.append(c.undo or c.operations)
            elif c.kind == wanted:
                hints.append(c.operations if downgrade else c.call)
    if kind in ("scan-under-lock", "full-table-update") and full_update:
        hints.append((None if downgrade else _backfill(relation, statements)) or "op.backfill")
    return " or ".join(dict.fromkeys(hints)) or None


def _backfill(relation: str, statements: Sequence[str]) -> str | None:
    """op.backfill(...) from the revision's own UPDATE of relation, when there is one."""
    for statement in statements:
        text = " ".join(statement.split())
        m = re.match(rf"^UPDATE (?:ONLY )?(?P<t>{_QNAME})(?: (?:AS )?\w+)? SET (?P<set>.+?)"
                     r"(?: WHERE (?P<where>.+?))?;?$", text, re.I)
        if m is None or m["set"].upper().count(" FROM ") or " RETURNING " in m["set"].upper():
            continue
        table, schema = _split(m["t"])
        if relation.replace('"', "").rsplit(".", 1)[-1] == table and (
                schema is None or relation.replace('"', "").startswith(f"{schema}.")):
            return call("backfill", table, m["set"], where=m["where"], schema=schema)
    return None


# -- names ---------------------------------------------------------------------------------------------
def _unquote(name: str) -> str:
    name = name.strip()
    return name[1:-1].replace('""', '"') if name.startswith('"') else name.lower()


def _split(qname: str) -> tuple[str, str | None]:
    """(name, schema or None) from `schema.name` or `name`; public counts as no schema."""
    parts = [_unquote(p) for p in re.findall(_NAME, qname)]
    name, schema = parts[-1], (parts[-2] if len(parts) > 1 else None)
    return name, None if schema == "public" else schema


def _by_table(section: dict[str, str]) -> dict[tuple[str, str], str]:
    """{(schema.table, name): definition} from a fingerprint section keyed `schema.table.name`."""
    return {_split_key(k): d for k, d in section.items()}


def _split_key(key: str) -> tuple[str, str]:
    """A fingerprint key `schema.table.name` -> (`schema.table`, name)."""
    parts = re.findall(_NAME, key)
    return ".".join(parts[:-1]), _unquote(parts[-1])


def _columns(text: str) -> list[str | Code]:
    """Index or key columns: plain names as strings, expressions as sa.text(...)."""
    out: list[str | Code] = []
    for part in _top_level(text):
        part = re.sub(r"\s+(?:ASC|DESC|NULLS (?:FIRST|LAST))\b.*$", "", part.strip(), flags=re.I)
        out.append(_unquote(part) if re.fullmatch(_NAME, part) else Code(f"sa.text({part!r})"))
    return out


def _parenthesized(text: str) -> tuple[str, str]:
    """text starts inside an opening parenthesis: (what is inside it, what follows it)."""
    depth = 1
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return text[:i], text[i + 1:]
    return text, ""


def _top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p for p in (*parts, current) if p.strip()]


def _unwrap(expression: str) -> str:
    """pg_get_constraintdef's CHECK ((a > 0)): the inner expression."""
    while expression.startswith("(") and expression.endswith(")") and _top_level(expression[1:-1]) == [
            expression[1:-1]] and _balanced(expression[1:-1]):
        expression = expression[1:-1]
    return expression


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            return False
    return depth == 0


def _type(column: str) -> str:
    return _COLUMN_TAIL.split(column, 1)[0]


def _column(name: str, definition: str) -> Code:
    """sa.Column(...) for a column as the fingerprint describes it."""
    default = re.search(r" default (.+?)(?= collate | comment |$)", definition)
    not_null = " not null" in definition
    return Code(f"sa.Column({name!r}, {sa_type(_type(definition))}" + (", nullable=False" if not_null else "")
                + (f", server_default=sa.text({default[1]!r})" if default else "") + ")")
