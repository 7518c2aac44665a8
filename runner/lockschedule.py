"""The lock_timeout schedule: how long each attempt of a DDL may queue for its table lock, and the
pause before the next attempt.

Every attempt has a timeout (0 would turn lock_timeout off: never); the list is finite and its
end is the caller's "retries exhausted" (exit 8). Used by the revision-level retries
(runner.migrate) and by the statement-level retries of the online operations (runner.online).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

from runner.config import Settings


@dataclasses.dataclass(frozen=True)
class Attempt:
    number: int  # 1-based
    lock_timeout: float  # seconds, > 0
    pause: float  # seconds to wait after this attempt hit lock_timeout, before the next one


def attempts(settings: Settings, rand: Callable[[], float] = random.random) -> list[Attempt]:
    """Return the attempts, in order (today: LOCK_RETRY_ATTEMPTS of MIGRATION_LOCK_TIMEOUT, with
    jittered exponential pauses from 0.5 s up to LOCK_RETRY_MAX_WAIT)."""
    out = []
    for n in range(1, settings.lock_retry_attempts + 1):
        pause = min(settings.lock_retry_max_wait, 0.5 * 2 ** (n - 1)) + rand()
        out.append(Attempt(n, settings.migration_lock_timeout, pause))
    return out
