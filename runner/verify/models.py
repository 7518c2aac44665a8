"""Models vs migrations: Alembic's autogenerate comparison (what `alembic check` runs), rendered
as one line per difference."""

from __future__ import annotations

from typing import Any

_MEANING = {"add": "in the models, not in the schema the migrations build",
            "remove": "in the schema the migrations build, not in the models"}


def describe(diff: Any) -> str:
    """One autogenerate difference as a sentence: what, where, and which side has it."""
    if isinstance(diff, list):  # modify_* entries come as a list of tuples for one column
        return "; ".join(describe(d) for d in diff)
    op, *args = diff
    if op.startswith("modify_"):
        # (op, schema, table, column, existing kwargs, migrations' value, models' value)
        schema, table, column = args[0], args[1], args[2]
        old, new = args[-2], args[-1]
        return (f"{op} {_qualified(schema, table)}.{column}: the migrations give {_show(old)}, "
                f"the models say {_show(new)}")
    verb = op.split("_", 1)[0]
    return f"{op} {_subject(op, args)}: {_MEANING.get(verb, 'differs')}"


def _subject(op: str, args: list[Any]) -> str:
    if op.endswith("_column"):
        schema, table, column = args[0], args[1], args[2]
        return f"{_qualified(schema, table)}.{column.name}"
    obj = args[0]
    if op.endswith("_table") or op.endswith("_table_comment"):
        return _qualified(obj.schema, obj.name)
    table = getattr(obj, "table", None)
    name = getattr(obj, "name", None) or "(unnamed)"
    cols = ", ".join(c.name for c in getattr(obj, "columns", []))
    where = f" on {_qualified(table.schema, table.name)}" if table is not None else ""
    return f"{name}{where}" + (f" ({cols})" if cols else "")


def _qualified(schema: str | None, name: str) -> str:
    return f"{schema}.{name}" if schema else name


def _show(value: Any) -> str:
    text = str(getattr(value, "arg", value))
    return text if len(text) <= 80 else text[:77] + "..."
