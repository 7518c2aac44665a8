"""What a finished runner process (host or container) left behind."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        """The runner logs to stderr, one event per line."""
        return self.err.splitlines()

    def summary(self) -> dict:
        """The final summary event of a LOG_FORMAT=json run."""
        found = [line for line in self.lines if '"event": "summary"' in line]
        assert found, self.err
        return json.loads(found[-1])
