"""Fixtures: real PostgreSQL 15 and 18 clusters started by the suite, and a runner launcher."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pgcluster import APP_PASSWORD, PASSWORD, Cluster
from tests.result import Result

pytest_plugins = ["tests.s3_fixtures", "tests.docker_fixtures"]

REPO = Path(__file__).resolve().parent.parent
MAJORS = os.environ.get("TEST_PG_MAJORS", "15,18").split(",")
NEWEST = MAJORS[-1]
SECRETS = (PASSWORD, APP_PASSWORD)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "every_major: run on every PostgreSQL major in TEST_PG_MAJORS "
                            "(behaviour differs between them: backup/restore, CONCURRENTLY, "
                            "lock_timeout, signals)")
    config.addinivalue_line("markers", "pg(*majors): run only on these majors")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Database tests run on the newest major, on every major when marked every_major, or on
    the majors a pg(...) mark names."""
    if "pg_major" not in metafunc.fixturenames:
        return
    marked = metafunc.definition.get_closest_marker("pg")
    if marked:
        majors = [m for m in marked.args if m in MAJORS] or list(marked.args[:1])
    elif metafunc.definition.get_closest_marker("every_major"):
        majors = MAJORS
    else:
        majors = [NEWEST]
    metafunc.parametrize("pg_major", majors, ids=[f"pg{m}" for m in majors], scope="session")


class _Clusters:
    """Started on first use, one per major, shared by the whole session."""

    def __init__(self) -> None:
        self.started: dict[str, Cluster] = {}

    def get(self, major: str) -> Cluster:
        if major not in self.started:
            self.started[major] = Cluster(major).init().start()
        return self.started[major]


@pytest.fixture(scope="session")
def clusters() -> Iterator[_Clusters]:
    pool = _Clusters()
    yield pool
    for cluster in pool.started.values():
        cluster.destroy()


@pytest.fixture(scope="session")
def pg(clusters: _Clusters, pg_major: str) -> Cluster:
    """A running cluster of the test's major, shared by the tests of that major."""
    return clusters.get(pg_major)


@dataclass
class Database:
    cluster: Cluster
    name: str

    @property
    def url(self) -> str:
        return self.cluster.url(self.name)

    def sql(self, statement: str, check: bool = True) -> str:
        return self.cluster.psql(statement, self.name, check=check)

    def version(self) -> str:
        """Return the stamped revision(s), or '' when none."""
        exists = self.sql("SELECT to_regclass('public.alembic_version') IS NOT NULL")
        return self.sql("SELECT string_agg(version_num, ',') FROM alembic_version") if exists == "t" else ""

    def tables(self) -> set[str]:
        out = self.sql("SELECT table_schema || '.' || table_name FROM information_schema.tables "
                       "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')")
        return set(out.split()) if out else set()


@pytest.fixture
def database(pg: Cluster) -> Iterator[Database]:
    """A fresh, empty database in the shared cluster."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    pg.psql(f"CREATE DATABASE {name}")
    yield Database(pg, name)
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=False)


def runner_env(url: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_URL", "PG", "BACKUP_", "AWS_"))}
    env.update(ALEMBIC_CONFIG=str(REPO / "alembic.ini"), DB_WAIT_TIMEOUT="20s",
               LOCK_WAIT_TIMEOUT="60s", PYTHONPATH=str(REPO), BACKUP_MODE="off")
    if url is not None:
        env["DATABASE_URL"] = url
    env.update(extra)
    return env


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, "a password was printed"


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, every: float = 0.1,
             what: str = "condition not reached in time") -> None:
    """Poll predicate until it is true; fail with what at the timeout (predicate may assert)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(what)


def run_runner(args: list[str], env: Mapping[str, str], timeout: float = 120,
               cwd: Path = REPO) -> Result:
    """Run `python -m runner ARGS` as a real process; check no secret was printed."""
    proc = subprocess.run([sys.executable, "-m", "runner", *args], env=dict(env), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert_no_secrets(proc.stdout, proc.stderr)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def start_runner(args: list[str], env: Mapping[str, str], cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runner", *args], env=dict(env), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def finish(proc: subprocess.Popen, timeout: float = 120) -> Result:
    out, err = proc.communicate(timeout=timeout)
    assert_no_secrets(out, err)
    return Result(proc.returncode, out, err)
