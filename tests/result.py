"""What a finished runner process (host or container) left behind."""

from __future__ import annotations

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
