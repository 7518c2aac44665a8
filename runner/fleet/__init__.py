"""Fleets: one command over many tenant databases or schemas, in reused worker processes."""

from __future__ import annotations

import argparse

from runner.context import Run


def run(run: Run, args: argparse.Namespace) -> None:
    raise NotImplementedError("fleet")  # issue 12
