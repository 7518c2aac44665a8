"""The ledger: who migrated what, when, from which image; checksums of applied revisions."""

from __future__ import annotations

from runner.context import Run


def history(run: Run, limit: int, fmt: str) -> None:
    raise NotImplementedError("history")  # issue 11


def stamp(run: Run, revision: str, yes: bool) -> None:
    raise NotImplementedError("stamp")  # issue 11


def repair(run: Run, revisions: list[str]) -> None:
    raise NotImplementedError("repair")  # issue 11
