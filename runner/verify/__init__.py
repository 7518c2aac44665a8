"""`verify`: prove a migration chain safe on a throwaway database before it reaches production."""

from __future__ import annotations

from typing import IO

from runner.context import Run


def verify(run: Run, from_rev: str | None, against: str | None, fmt: str) -> None:
    raise NotImplementedError("verify")  # issue 10


def plan_scratch(run: Run, target: str, out: IO[str]) -> None:
    raise NotImplementedError("plan --scratch")  # issue 10
