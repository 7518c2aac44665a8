"""One retry style for every wait (database ready, migration lock, lock_timeout, S3, restore locks).

Exponential backoff with jitter (tenacity), bounded by attempts and/or a time limit whose last
attempt lands on the deadline instead of giving up one sleep early; every sleep wakes up on
cancellation; one log callback per retry. The first attempt runs before tenacity is imported:
the common case (ready at once) pays nothing for the machinery.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from runner.context import Run

T = TypeVar("T")
# on_retry(exception, attempt that failed (1-based), seconds until the next attempt)
OnRetry = Callable[[BaseException, int, float], None]


def call(run: Run, fn: Callable[[], T], *, retry_on: tuple[type[BaseException], ...],
         initial: float, maximum: float, jitter: float, on_retry: OnRetry,
         limit: float | None = None, attempts: int | None = None) -> T:
    """Return fn(); retry on retry_on until attempts or limit seconds run out, then re-raise the
    last exception. Cancellation (signal, run deadline) raises from the sleeps."""
    deadline = None if limit is None else run.clock() + limit
    try:
        return fn()
    except retry_on as exc:
        first = exc
    if (attempts is not None and attempts <= 1) or _left(run, deadline) <= 0:
        raise first
    import tenacity  # only now: most runs never retry

    base = tenacity.wait_exponential_jitter(initial=initial, max=maximum, jitter=jitter)

    def wait(state: tenacity.RetryCallState) -> float:
        return max(0.0, min(base(state), _left(run, deadline)))

    def stop(state: tenacity.RetryCallState) -> bool:
        done = state.attempt_number + 1  # + the first attempt, made before tenacity
        return (attempts is not None and done >= attempts) or _left(run, deadline) <= 0

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        on_retry(exc or RuntimeError("retry"), state.attempt_number + 1, state.upcoming_sleep)

    pause = min(initial, _left(run, deadline))
    on_retry(first, 1, pause)
    run.cancel.sleep(pause)
    retrying = tenacity.Retrying(retry=tenacity.retry_if_exception_type(retry_on), wait=wait,
                                 stop=stop, sleep=run.cancel.sleep, before_sleep=before_sleep,
                                 reraise=True)
    return retrying(fn)


def _left(run: Run, deadline: float | None) -> float:
    return float("inf") if deadline is None else deadline - run.clock()
