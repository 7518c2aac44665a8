"""The processes a run started, at any depth: found in /proc, so they can be ended with it.

A fleet's workers are children of its forkserver, not of the main process, and pg_dump or zstd
run in sessions of their own: neither the process group nor multiprocessing's list of children
covers them all. The parent links in /proc do (Linux; elsewhere nothing is found).
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def descendants(pid: int | None = None) -> list[int]:
    """Return the pids of every live descendant of pid (default: this process), parents first."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # the command name may hold spaces and parentheses: the fields follow the last ')'
            fields = entry.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill(pids: list[int]) -> None:
    """SIGKILL pids (gone ones are skipped). Collect the tree first: a killed parent's children
    are handed to init, and their link to us is lost."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
