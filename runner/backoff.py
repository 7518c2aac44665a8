"""Backoff that lands its last attempt on the deadline instead of giving up one sleep early."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tenacity


def until(limit: float, initial: float, maximum: float, jitter: float) -> dict[str, object]:
    """Return tenacity wait/stop arguments: exponential backoff with jitter, bounded by limit seconds."""
    import tenacity  # lazily: the no-op fast path never retries

    base = tenacity.wait_exponential_jitter(initial=initial, max=maximum, jitter=jitter)

    def wait(state: tenacity.RetryCallState) -> float:
        return max(0.0, min(base(state), limit - state.seconds_since_start))

    return {"wait": wait, "stop": tenacity.stop_after_delay(limit)}
