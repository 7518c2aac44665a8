"""TCP keepalives on both ends of every runner session (no SQLAlchemy: the fast path and the
start-up gate use them too).

The client's side: a backend whose runner vanished without closing its socket goes away. The
server's side: a runner whose machine vanished (node crash, network partition: no FIN, no RST)
loses its sessions, and with them the migration lock or the start-up gate, within idle + count x
interval = 20 s instead of the server kernel's default (about two hours on Linux).
tcp_user_timeout (PG 12+) bounds what the server sent and never got acknowledged, where
keepalives do not apply. A partition shorter than count x interval (15 s) ends nothing.
"""

from __future__ import annotations

CLIENT = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
SERVER = {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3"}
SERVER_USER_TIMEOUT = "20s"


def server_options() -> str:
    """libpq `options` asking the server for its keepalives (every supported version has them)."""
    return " ".join(f"-c {k}={v}" for k, v in SERVER.items())
