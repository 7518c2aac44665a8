"""Structured events, one per line on stderr, as text or JSON; every line passes through redact()."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO, Any

from runner.redact import redact


class EventLog:
    def __init__(self, fmt: str = "text", stream: IO[str] | None = None) -> None:
        self.fmt = fmt
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()  # the signal watcher thread logs too

    def __call__(self, event: str, msg: str = "", level: str = "info", **fields: Any) -> None:
        now = time.time()
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        if self.fmt == "json":
            line = json.dumps({"ts": ts, "level": level, "event": event, "msg": msg, **fields},
                              default=str, ensure_ascii=False)
        else:
            # None and {} say nothing in text (e.g. no durations yet); JSON keeps them for parsers
            kv = " ".join(f"{k}={_text(v)}" for k, v in fields.items() if v is not None and v != {})
            line = f"{ts} {level.upper():5} {event:<16} {msg}" + (f" [{kv}]" if kv else "")
        with self._lock:
            self.stream.write(redact(line) + "\n")
            self.stream.flush()

    def warning(self, event: str, msg: str = "", **fields: Any) -> None:
        self(event, msg, level="warn", **fields)

    def error(self, event: str, msg: str = "", **fields: Any) -> None:
        self(event, msg, level="error", **fields)


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value)) or "none"
    elif isinstance(value, dict):
        value = ",".join(f"{k}:{v}" for k, v in value.items())
    s = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return json.dumps(s, ensure_ascii=False) if (" " in s or not s) else s
