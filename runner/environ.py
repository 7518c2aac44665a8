"""The process environment while env.py runs elsewhere than the run's database: env.py files that
read DATABASE_URL (or libpq's PG* variables) themselves must get that database's (verify's
scratch database, the fast-path recorder's stand-in URLs), never the target's."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def overlaid(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, remove) these variables while the block runs; restore them after."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
