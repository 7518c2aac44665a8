"""Linux inotify, the little a directory-format dump needs: which files appear in a directory and
when their writer closes them (no library on PyPI that the image already carries does this)."""

from __future__ import annotations

import ctypes
import os
import select
import struct
from collections.abc import Iterator

IN_CLOSE_WRITE = 0x00000008
IN_CREATE = 0x00000100
IN_MOVED_TO = 0x00000080
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name


class Watch:
    """Events of one directory: (name, mask) pairs."""

    def __init__(self, path: str, mask: int = IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_TO) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if libc.inotify_add_watch(self.fd, os.fsencode(path), mask) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch failed on {path}")

    def events(self, timeout: float) -> Iterator[tuple[str, int]]:
        """Yield what happened, waiting at most timeout seconds for the first event."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return
        pos = 0
        while pos + _EVENT.size <= len(data):
            _, mask, _, length = _EVENT.unpack_from(data, pos)
            name = data[pos + _EVENT.size:pos + _EVENT.size + length].rstrip(b"\0")
            pos += _EVENT.size + length
            yield os.fsdecode(name), mask

    def close(self) -> None:
        os.close(self.fd)
