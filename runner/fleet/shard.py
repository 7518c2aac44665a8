"""Sharding for Kubernetes Indexed Jobs: pod JOB_COMPLETION_INDEX of JOB_COMPLETIONS takes its part.

Rendezvous (highest-random-weight) hashing: each target goes to the index that scores highest for
its name. A target's index depends only on its own name and the number of indexes, so adding or
removing a tenant never moves the others, and going from N to N+1 indexes moves only the targets
the new index wins (about 1/(N+1) of them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

from runner.config import Settings
from runner.errors import ConfigError

T = TypeVar("T")


def owner(name: str, completions: int) -> int:
    """Return the index (0 .. completions-1) that migrates the target called name."""
    return max(range(completions), key=lambda index: _weight(name, index))


def _weight(name: str, index: int) -> int:
    digest = hashlib.blake2b(f"{index}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def mine(targets: Sequence[T], names: Sequence[str], index: int, completions: int) -> list[T]:
    """Return the targets (names[i] is targets[i]'s name) that index owns, in their order."""
    return [t for t, name in zip(targets, names, strict=True) if owner(name, completions) == index]


def position(settings: Settings) -> tuple[int, int] | None:
    """Return (index, completions) when this pod is one of an Indexed Job's, else None."""
    index, completions = settings.job_completion_index, settings.job_completions
    if index is None and completions is None:
        return None
    if index is None or completions is None:
        given, missing = (("JOB_COMPLETIONS", "JOB_COMPLETION_INDEX") if index is None
                          else ("JOB_COMPLETION_INDEX", "JOB_COMPLETIONS"))
        raise ConfigError(f"{given} is set but {missing} is not: set both (Kubernetes sets "
                          "JOB_COMPLETION_INDEX in an Indexed Job; set JOB_COMPLETIONS to its "
                          "spec.completions) or neither")
    if not 0 <= index < completions:
        raise ConfigError(f"JOB_COMPLETION_INDEX={index} is not below JOB_COMPLETIONS={completions}: "
                          "set JOB_COMPLETIONS to the Job's spec.completions")
    return index, completions
