"""pg_restore's SQL script, fitted to the target server, relayed to psql with its COMMIT withheld.

`pg_restore -f -` writes the session settings of its own major (17+ adds `transaction_timeout`)
and an older server rejects them ("unrecognized configuration parameter"). Only the prologue —
the run of session `SET x = y;` / `SELECT pg_catalog.set_config(...)` lines before the first
object — is adapted: a setting the target does not have is dropped, and so is pg_restore's
`BEGIN;` (the runner's transaction is already open). Everything after the prologue passes
through byte for byte: an unknown SET there fails the restore, which then rolls back.

The script comes from `pg_restore --single-transaction` (large objects are otherwise written
between a BEGIN and a COMMIT of their own, which would commit the restore halfway), so it ends
with one COMMIT followed only by comments and `\\unrestrict`. That last COMMIT line is held back
(the relay always keeps the last TAIL bytes) and removed: the runner commits only after the
digest matched.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import termios
from collections.abc import Callable

from runner.errors import BackupFailed

CHUNK = 1 << 20
TAIL = 4096  # the script's end (COMMIT, a footer comment, \unrestrict) fits many times over
PROLOGUE_MAX = 1 << 20
_PROLOGUE_LINE = re.compile(
    rb"|--.*|\\restrict \S+|BEGIN;|SET ([\w.]+) = .*;|SELECT pg_catalog\.set_config\('([\w.]+)', .*\);")
_COMMIT_LINE = b"COMMIT;\n"


class Prologue:
    """Adapt the prologue to the settings the target server has."""

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.dropped: list[str] = []

    def adapt(self, head: bytes, eof: bool) -> tuple[bytes, int] | None:
        """Return (the adapted prologue, bytes of head it used), or None until head holds its end."""
        out: list[bytes] = []
        dropped: list[str] = []
        pos = 0
        while True:
            end = head.find(b"\n", pos)
            if end < 0 and not eof:
                return None
            m = _PROLOGUE_LINE.fullmatch(head, pos, end) if end >= 0 else None
            if m is None:
                self.dropped = dropped
                return b"".join(out), pos
            name = (m.group(1) or m.group(2) or b"").decode()
            if head[pos:end] == b"BEGIN;":
                pass  # the runner's transaction is open already
            elif name and "." not in name and name not in self.known:
                dropped.append(name)  # customised (dotted) options are always accepted
            else:
                out.append(head[pos:end + 1])
            pos = end + 1


def without_final_commit(tail: bytes) -> bytes:
    """Return the script's last bytes without its final COMMIT line; refuse when there is none."""
    at = tail.rfind(b"\n" + _COMMIT_LINE)
    start = at + 1 if at >= 0 else (0 if tail.startswith(_COMMIT_LINE) else -1)
    if start < 0:
        raise BackupFailed("pg_restore's script did not end with its COMMIT (was it cut short?): "
                           "refusing to commit the restore; it was rolled back, the database is "
                           "unchanged")
    return tail[:start] + tail[start + len(_COMMIT_LINE):]


def relay(src: int, dst: int, prologue: Prologue, tick: Callable[[], None]) -> bytes:
    """Copy the script from pipe src to dst: the prologue adapted, the rest as is, except the last
    TAIL bytes, which are returned. tick() is called at least every second (progress, cancel).

    The bulk moves pipe to pipe with splice(2), never through Python: whatever the pipe holds
    beyond TAIL bytes cannot be the script's end yet and goes on; the last TAIL bytes are read."""
    head = b""
    while (found := prologue.adapt(head, eof=False)) is None:
        chunk = _read(src, tick)
        if not chunk:
            found = prologue.adapt(head, eof=True)
            break
        head += chunk
        if len(head) > PROLOGUE_MAX:
            raise BackupFailed("pg_restore's script does not start with the session settings it "
                               "always writes: refusing it; the database is unchanged")
    adapted, used = found
    _write(dst, adapted)
    pending = bytearray(head[used:])  # read, not yet written: it comes before what the pipe holds
    while True:
        if len(pending) > TAIL:
            _write(dst, pending[:-TAIL])
            del pending[:-TAIL]
        if not _ready(src, tick):
            continue
        waiting = _buffered(src)
        if waiting <= TAIL:  # maybe the end: take it out of the pipe, so the next wait blocks
            chunk = os.read(src, TAIL)
            if not chunk:
                return bytes(pending)
            pending += chunk
            continue
        _write(dst, pending)
        pending.clear()
        _splice(src, dst, waiting - TAIL)


def _buffered(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def _splice(src: int, dst: int, count: int) -> None:
    while count > 0:
        if hasattr(os, "splice"):
            moved = os.splice(src, dst, count)
        else:  # not Linux: through user space
            data = os.read(src, min(count, CHUNK))
            _write(dst, data)
            moved = len(data)
        count -= moved


def _ready(fd: int, tick: Callable[[], None]) -> bool:
    ready, _, _ = select.select([fd], [], [], 1.0)
    tick()
    return bool(ready)


def _read(fd: int, tick: Callable[[], None]) -> bytes:
    while not _ready(fd, tick):
        pass
    return os.read(fd, 65536)


def _write(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
