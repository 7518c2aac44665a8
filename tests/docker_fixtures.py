"""pytest fixtures (registered in conftest.py via pytest_plugins): the image, built once per session.

Without Docker the container tests are skipped with the reason; with CI=true they fail instead,
so CI cannot pass without having run them. MIGRATION_RUNNER_IMAGE=TAG tests an image built
elsewhere (e.g. with the default PGDG client) instead of building one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import docker_harness


def require_docker() -> None:
    """Skip (or, with CI=true, fail) the calling test when no Docker daemon answers."""
    reason = docker_harness.docker_unavailable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true requires Docker for the image tests: {reason}", pytrace=False)
    pytest.skip(f"Docker not available: {reason} (WITH_DOCKER=1 bash .ci/test runs these)")


@pytest.fixture(scope="session")
def docker_ready() -> None:
    """A Docker daemon answers (else skip, or fail under CI=true)."""
    require_docker()


@pytest.fixture(scope="session")
def runner_image(docker_ready: None) -> Iterator[str]:
    """The migration image's tag: the stand-in base if needed, then the Dockerfile, built once."""
    tag = os.environ.get("MIGRATION_RUNNER_IMAGE") or docker_harness.build_image()
    try:
        yield tag
    finally:
        docker_harness.remove_test_containers()
