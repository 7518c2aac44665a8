"""Checksums of revision scripts that survive reformatting: sha256 of a canonical form of the AST.

What the checksum covers: the code of the revision file (its Python syntax tree). What it does
not cover: comments, docstrings, blank lines, indentation and line breaks, quote style, string
prefixes, redundant parentheses, trailing commas, numeric literal spelling (1_000 == 1000), the
encoding and line endings (CRLF, LF, CR). So black / ruff format and an editor's line-ending
setting keep the checksum; any change to what the code does (a statement, a name, a literal's
value, an import) changes it. Modules the revision imports are not covered.

The tree is walked here rather than with ast.dump(): ast.dump's text changes between Python
versions (3.13 leaves out empty fields), and a checksum recorded by one image must match the
same file in an image built on another Python.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

# `# type: ...` comments are formatting, not meaning (Constant's u"" prefix is handled below)
_FORMATTING = frozenset({"type_comment"})
_WITH_DOCSTRING = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def of_source(source: bytes | str) -> str:
    """Return the hex sha256 of source's canonical syntax tree."""
    if isinstance(source, bytes):  # honours a coding cookie or BOM; newlines become \n
        source = importlib.util.decode_source(source)
    tree = ast.parse(source.replace("\r\n", "\n").replace("\r", "\n"))
    text = json.dumps(_canonical(tree), separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def of_file(path: str | Path) -> str:
    """Return the checksum of a revision file; a sourceless (.pyc) revision by its bytes."""
    data = Path(path).read_bytes()
    if str(path).endswith(".py"):
        return of_source(data)
    return hashlib.sha256(data).hexdigest()


def _canonical(node: Any) -> Any:
    if isinstance(node, ast.Constant):  # the value, whatever quotes or spelling produced it
        return ["Constant", type(node.value).__name__, repr(node.value)]
    if isinstance(node, ast.JoinedStr):
        return ["JoinedStr", [_canonical(v) for v in _merged(node.values)]]
    if isinstance(node, ast.AST):
        fields = []
        for name in sorted(node._fields):  # sorted: a field added by a newer Python lands anywhere
            value = getattr(node, name, None)
            if name == "body" and isinstance(node, _WITH_DOCSTRING):
                value = _without_docstring(value)
            if name in _FORMATTING or _empty(value):
                continue
            fields.append([name, _canonical(value)])
        return [type(node).__name__, fields]
    if isinstance(node, list):
        return [_canonical(v) for v in node]
    return [type(node).__name__, repr(node)]  # identifiers, operator flags, levels


def _empty(value: Any) -> bool:
    """None, [] and 0 mean "absent": Python versions differ in which of them a default is."""
    return value is None or value == [] or (type(value) is int and value == 0)


def _without_docstring(body: list[ast.stmt]) -> list[ast.stmt]:
    first = body[0] if body else None
    if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        return body[1:]
    return body


def _merged(values: list[ast.expr]) -> list[ast.expr]:
    """Join adjacent literal parts of an f-string and drop empty ones: the parsers of different
    Python versions split "a" f"{x}" "b" differently."""
    out: list[ast.expr] = []
    for v in values:
        if isinstance(v, ast.Constant) and isinstance(v.value, str):
            if not v.value:
                continue
            if out and isinstance(out[-1], ast.Constant) and isinstance(out[-1].value, str):
                out[-1] = ast.Constant(out[-1].value + v.value)
                continue
        out.append(v)
    return out
