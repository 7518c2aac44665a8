"""Structured events, one per line on stderr, as text or JSON; every value passes through redact().

One event is one line whatever its values hold: in text format control characters (newlines,
carriage returns, escape sequences, Unicode line separators) are escaped, so a value such as a
hostile `--to` argument cannot forge a log line; JSON escapes them by itself.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO, Any

from runner.redact import redact, redact_data

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# C0 and C1 controls, DEL and the Unicode line/paragraph separators: everything a terminal or a
# log collector may take as a line break or a control sequence
_ESCAPES = {c: _NAMED.get(chr(c), f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}")
            for c in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]}
# JSON escapes C0 controls itself; these it leaves raw with ensure_ascii=False
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in [*range(0x7F, 0xA0), 0x2028, 0x2029]}


class EventLog:
    def __init__(self, fmt: str = "text", stream: IO[str] | None = None) -> None:
        self.fmt = fmt
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()  # the signal watcher thread logs too

    def __call__(self, event: str, msg: str = "", level: str = "info", **fields: Any) -> None:
        now = time.time()
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        if self.fmt == "json":
            line = json.dumps(redact_data({"ts": ts, "level": level, "event": event, "msg": msg,
                                           **fields}), ensure_ascii=False).translate(_JSON_ESCAPES)
        else:
            # None and {} say nothing in text (e.g. no durations yet); JSON keeps them for parsers.
            # Redact first, then escape: a secret is registered as it is, not as its escaped form
            kv = " ".join(f"{k}={_text(redact_data(v))}" for k, v in fields.items()
                          if v is not None and v != {})
            line = f"{ts} {level.upper():5} {escape(event):<16} {escape(redact(msg))}" + (
                f" [{kv}]" if kv else "")
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def warning(self, event: str, msg: str = "", **fields: Any) -> None:
        self(event, msg, level="warn", **fields)

    def error(self, event: str, msg: str = "", **fields: Any) -> None:
        self(event, msg, level="error", **fields)


def escape(text: str) -> str:
    """Return text with control characters and line separators written as escapes."""
    return text.translate(_ESCAPES)


def one_line(text: str) -> str:
    """Join a multi-line message (a driver's error, its detail and hint) into one readable line.

    A line that starts in lower case continues the sentence above it (libpq wraps its hints);
    any other line is a sentence of its own, set off by " / " so words are never glued together.
    """
    out = ""
    for line in text.splitlines():
        line = " ".join(line.split())
        if line:
            out += ("" if not out else " " if line[0].islower() else " / ") + line
    return out


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value)) or "none"
    elif isinstance(value, dict):
        value = ",".join(f"{k}:{v}" for k, v in value.items())
    s = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return escape(json.dumps(s, ensure_ascii=False) if (" " in s or not s) else s)
