"""Keep secrets out of everything we print: URLs, driver messages, settings.

Every log line passes through redact(), so it must stay linear in the length of its input: a
100 KB value (a driver message quoting a huge literal, a hostile argument) costs milliseconds,
not seconds. URL passwords are therefore found by a scanner anchored on each "://" instead of a
regular expression that backtracks from every position.
"""

from __future__ import annotations

import re
import string
from typing import Any

_SCHEME_CHARS = frozenset(string.ascii_letters + string.digits + "+.-")
_LETTERS = frozenset(string.ascii_letters)
_USER_END = re.compile(r"[:/@\s]")  # the user part of scheme://user:password@ ends here
_PASSWORD_END = re.compile(r"[@\s]")
# the documented example URL (postgresql://USER:PASSWORD@HOST:PORT/DB) is no secret; a real
# password spelled PASSWORD is still masked when it was registered
PLACEHOLDER_PASSWORD = "PASSWORD"
# key=value pairs in libpq conninfo strings and query strings; an unclosed quote masks the rest
# of the text (the optional closing quote keeps the pattern from backtracking)
_KV_SECRET = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|secret|token|aws_secret_access_key|sslpassword)\s*[=:]\s*)"
    r"(?P<val>'[^']*'?|\"[^\"]*\"?|[^\s&,;]+)",
    re.IGNORECASE,
)

# literal values in a query text: strings, dollar-quoted strings, numbers
_LITERALS = re.compile(r"'(?:[^']|'')*'|\$\w*\$.*?\$\w*\$|(?<![\w$])\d+(?:\.\d+)?\b", re.S)

_known: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret value so any later output containing it is masked."""
    if value and len(value) >= 3:
        _known.add(value)


def redact(text: str) -> str:
    """Return text with URL passwords, key=value secrets and known secret values masked."""
    text = mask_url_passwords(text)
    text = _KV_SECRET.sub(lambda m: m.group("key") + "***", text)
    for secret in sorted(_known, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def redact_data(value: Any) -> Any:
    """Return a JSON-ready copy of value with every string redacted (keys are the runner's own).

    Redact values before encoding, never the encoded text: a mask that runs past a closing quote
    would leave invalid JSON.
    """
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):  # e.g. a bytea column: hex, as psql shows it
        return redact("\\x" + bytes(value).hex())
    return redact(str(value))


def mask_url_passwords(text: str) -> str:
    """Mask the password of every scheme://user:password@ in text, in one left-to-right pass.

    Same matches as re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\\s]*:)([^@\\s]*)(?=@)"), which is
    quadratic on long inputs: the scheme is looked for backwards from each "://" (never past the
    previous match), and the end of a password is searched once per stretch of text.
    """
    out: list[str] = []
    pos = 0  # the end of the previous match: the next one starts at or after it
    password_end = -1  # cached: the first '@' or whitespace at or after the last password start
    i = text.find("://")
    while i != -1:
        start = _password_start(text, i, pos)
        if start is not None:
            if password_end < start:
                m = _PASSWORD_END.search(text, start)
                password_end = m.start() if m else len(text)
            if password_end < len(text) and text[password_end] == "@":
                if text[start:password_end] != PLACEHOLDER_PASSWORD:
                    out += [text[pos:start], "***"]
                    pos = password_end
                i = text.find("://", password_end)
                continue
        i = text.find("://", i + 1)
    out.append(text[pos:])
    return "".join(out)


def _password_start(text: str, i: int, floor: int) -> int | None:
    """Return where the password starts for the "://" at i, or None when no scheme://user: is there."""
    j, letter = i, False
    while j > floor and text[j - 1] in _SCHEME_CHARS:
        j -= 1
        letter = letter or text[j] in _LETTERS
    if not letter:
        return None
    m = _USER_END.search(text, i + 3)
    return m.end() if m and m.group() == ":" else None


def scrub_query(query: str) -> str:
    """Drop literal values from a query text: they may be bind values or secrets."""
    return " ".join(_LITERALS.sub("?", query or "").split())[:160]
