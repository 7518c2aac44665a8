"""What the fleet's main process sends a worker for one target (shared by pool and worker)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Task:
    """What the main process sends a worker for one target."""

    name: str
    url: str = dataclasses.field(repr=False)  # may carry a password: never printed
    tenant: str | None
    command: str
    options: dict[str, Any]  # the command's flags: to, yes, confirm, check
