"""How far behind the streaming replicas are, so a backfill can wait for them.

pg_stat_replication's replay_lag is measured when a replica reports progress: a replica that has
stopped replaying keeps showing its last, small value. So the lag is also estimated from WAL
positions: each look records the primary's current position with the time; a replica whose
replay position is behind the position recorded at time t has not replayed what was written by
then, so it lags at least now - t. The larger of the two counts.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

LAG_SQL = sa.text("""
SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8 AS current,
       coalesce(r.application_name, '') || coalesce(' ' || host(r.client_addr), '') AS replica,
       pg_wal_lsn_diff(r.replay_lsn, '0/0')::float8 AS replay,
       extract(epoch FROM r.replay_lag)::float8 AS replay_lag,
       r.pid IS NOT NULL AS present
FROM (SELECT 1) AS one LEFT JOIN pg_stat_replication r ON r.state = 'streaming'
""")


@dataclasses.dataclass(frozen=True)
class Lag:
    replica: str
    seconds: float


class Gauge:
    """Looks at pg_stat_replication and keeps the WAL positions it saw, with their times."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=4096)
        self.hidden = False  # replicas exist but their positions are not visible to this role

    def worst(self, conn: Connection) -> Lag | None:
        """The most lagging streaming replica, or None without one."""
        rows = conn.execute(LAG_SQL).all()
        now = self.clock()
        if rows:
            self.samples.append((now, rows[0].current))
        lags = []
        for r in rows:
            if not r.present:
                continue
            if r.replay is None:
                self.hidden = True
                continue
            lags.append(Lag(r.replica or "replica", estimate(self.samples, r.replay, r.replay_lag, now)))
        return max(lags, key=lambda lag: lag.seconds, default=None)


def estimate(samples: collections.deque[tuple[float, float]], replay: float,
             reported: float | None, now: float) -> float:
    """The replica's lag: the larger of what it reported and now minus the time of the first
    recorded primary position beyond its replay position (0 once it has replayed the latest)."""
    if not samples or replay >= samples[-1][1]:
        return 0.0
    behind_since = next((t for t, lsn in samples if lsn > replay), now)
    return max(now - behind_since, reported or 0.0)
