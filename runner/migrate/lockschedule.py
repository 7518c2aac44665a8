"""The lock_timeout schedule: how long each attempt of a DDL may queue for its table lock, and the
pause before the next attempt.

A DDL queued for its lock stalls every later query on that table until it gets the lock or its
lock_timeout fires, so the lock_timeout of an attempt is the longest the application waits
behind it. `escalate` (the default) starts short and doubles up to a ceiling (100 ms -> 500 ms),
pausing between attempts as the `fixed` schedule does, until its attempts and pauses add up to
the fixed schedule's total: the same patience, spent in waits the application hardly notices.
`fixed` is the schedule before this one: LOCK_RETRY_ATTEMPTS attempts of MIGRATION_LOCK_TIMEOUT.

Every attempt has a timeout (0 would turn lock_timeout off: never); the list is finite and its
end is the caller's "retries exhausted" (exit 8). Used by the revision-level retries
(runner.migrate.apply) and by the statement-level retries of the online operations (runner.online).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from runner.config import Settings

if TYPE_CHECKING:
    from runner.context import Run

T = TypeVar("T")
FIRST_PAUSE = 0.5  # seconds; the pauses double from here up to LOCK_RETRY_MAX_WAIT
JITTER = 1.0  # up to this many seconds added to every pause after the first


@dataclasses.dataclass(frozen=True)
class Attempt:
    number: int  # 1-based
    lock_timeout: float  # seconds, > 0
    pause: float  # seconds to wait after this attempt hit lock_timeout, before the next one


def attempts(settings: Settings, rand: Callable[[], float] = random.random) -> list[Attempt]:
    """Return the attempts, in order, for settings.lock_timeout_schedule."""
    if settings.lock_timeout_schedule == "fixed":
        return _fixed(settings, rand)
    return _escalate(settings, rand)


def patience(settings: Settings) -> float:
    """The fixed schedule's total without jitter: its lock waits plus its pauses (seconds).

    The escalating schedule spends exactly this; with the defaults 10 x 4 s + 92 s = 132 s.
    """
    n = settings.lock_retry_attempts
    return n * settings.migration_lock_timeout + sum(_pause(settings, k) for k in range(1, n))


def ceiling(settings: Settings) -> float:
    """The longest lock_timeout any attempt gets."""
    if settings.lock_timeout_schedule == "fixed":
        return settings.migration_lock_timeout
    return settings.lock_timeout_ceiling


def describe(settings: Settings) -> str:
    """One line for logs and errors, e.g. 'lock_timeout 100ms doubling to 500ms'."""
    if settings.lock_timeout_schedule == "fixed":
        return f"lock_timeout {ms(settings.migration_lock_timeout)}"
    return (f"lock_timeout {ms(settings.lock_timeout_start)} doubling to "
            f"{ms(settings.lock_timeout_ceiling)}")


def ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def _pause(settings: Settings, n: int) -> float:
    """The pause after attempt n without jitter: 0.5 s, 0.5 s, 1 s, 2 s ... up to the maximum."""
    return min(settings.lock_retry_max_wait, FIRST_PAUSE * 2 ** max(0, n - 2))


def _jittered(settings: Settings, n: int, rand: Callable[[], float]) -> float:
    """The pause after attempt n: the first exact, the others with up to JITTER s added (capped)."""
    if n == 1:
        return _pause(settings, 1)
    return min(settings.lock_retry_max_wait, _pause(settings, n) + JITTER * rand())


def _fixed(settings: Settings, rand: Callable[[], float]) -> list[Attempt]:
    """LOCK_RETRY_ATTEMPTS attempts of MIGRATION_LOCK_TIMEOUT (the schedule's pauses)."""
    n = settings.lock_retry_attempts
    return [Attempt(k, settings.migration_lock_timeout, _jittered(settings, k, rand) if k < n else 0.0)
            for k in range(1, n + 1)]


def _escalate(settings: Settings, rand: Callable[[], float]) -> list[Attempt]:
    """Timeouts doubling from LOCK_TIMEOUT_START to LOCK_TIMEOUT_CEILING; attempts go on until
    their timeouts and (unjittered) pauses reach the fixed schedule's patience, the last pause
    shortened so the last attempt ends on it."""
    budget = patience(settings)
    out: list[Attempt] = []
    spent = 0.0  # nominal seconds up to the end of the last attempt
    while True:
        k = len(out) + 1
        timeout = _timeout(settings, k)
        if out:
            pause = _pause(settings, k - 1)
            if spent + pause + timeout > budget:  # the last attempt ends on the budget
                pause = max(0.0, round(budget - spent - timeout, 3))
                out[-1] = dataclasses.replace(out[-1], pause=pause)
                out.append(Attempt(k, timeout, 0.0))
                return out
            out[-1] = dataclasses.replace(out[-1], pause=_jittered(settings, k - 1, rand))
            spent += pause
        elif timeout >= budget:  # a patience shorter than one attempt: that one attempt
            return [Attempt(1, timeout, 0.0)]
        out.append(Attempt(k, timeout, 0.0))
        spent += timeout


def _timeout(settings: Settings, n: int) -> float:
    """Attempt n's lock_timeout, in whole milliseconds (PostgreSQL's unit)."""
    value = min(settings.lock_timeout_ceiling, settings.lock_timeout_start * 2 ** (n - 1))
    return max(0.001, round(value, 3))


def call(run: Run, fn: Callable[[Attempt], T], *, retry_on: tuple[type[BaseException], ...],
         on_retry: Callable[[BaseException, Attempt, Attempt], None],
         schedule: list[Attempt] | None = None) -> T:
    """Return fn(attempt) for the first attempt that does not raise retry_on; re-raise the last
    such exception when the schedule runs out, stop as the deadline (RunDeadline, exit 9) when
    RUN_DEADLINE does. on_retry(exception, failed attempt, next attempt) is called before each
    pause; pauses wake up on cancellation. Serves the revision-level retries (runner.migrate.apply) and
    each step of the online operations (runner.online.session)."""
    plan = schedule if schedule is not None else attempts(run.settings)
    for attempt, following in zip(plan, [*plan[1:], None], strict=True):
        try:
            return fn(attempt)
        except retry_on as exc:
            left = run.remaining()
            if following is None:
                raise
            run.stop_if_deadline(left is not None and left <= 0)  # the deadline, not the schedule
            on_retry(exc, attempt, following)
            run.cancel.sleep(attempt.pause if left is None else min(attempt.pause, left))
    raise AssertionError("an empty lock_timeout schedule")  # attempts() never returns one
