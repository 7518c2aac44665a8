"""The migration image, built and run for real: hardened containers against real PostgreSQL and S3.

Containers run the way a Pod Security "restricted" pod runs them: the image's numeric non-root
user, a read-only root filesystem with a tmpfs /tmp, every capability dropped, no privilege
escalation. They reach the test clusters on 127.0.0.1 through the host network.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from runner.registry import COMMANDS
from tests.conftest import REPO, Database, assert_no_secrets, wait_for
from tests.docker_harness import (
    RUNNER_USER,
    TEST_BUILD_ARGS,
    Container,
    docker,
    image_exists,
    image_size,
    inspect,
    run_container,
    start_container,
)
from tests.result import Result
from tests.s3_fixtures import REGION, S3Server
from tests.test_fastpath import REVISION_0006, answered_from_facts, skipped

SLOWPOKE = REPO / "tests/scenarios/slowpoke"
ADDED_BUDGET = 60e6  # bytes the Dockerfile may add to its base (docs/image.md has the breakdown)
# the first test that needs the image pays for the stand-in base and the build on a fresh machine
pytestmark = pytest.mark.timeout(900)


def container_env(db: Database, **extra: str) -> dict[str, str]:
    return {"DATABASE_URL": db.url, "BACKUP_MODE": "off", "DB_WAIT_TIMEOUT": "20s", **extra}


def run(image: str, args: list[str], env: dict[str, str], **options: object) -> Result:
    """Run a hardened container (the harness defaults) and check it printed no password."""
    r = run_container(image, args, env, **options)
    assert_no_secrets(r.out, r.err)
    return r


def stop_timed(box: Container) -> tuple[float, Result]:
    """`docker stop` with a long grace period: how long it took, and what the runner left."""
    t0 = time.monotonic()
    box.stop(grace=20)
    took = time.monotonic() - t0
    return took, box.wait(timeout=60)


# -- without Docker: the Dockerfile lint, the entrypoint's mapping, the compose file -------------
def test_hadolint_clean_and_every_ignore_has_a_reason() -> None:
    hadolint = Path(os.environ.get("HADOLINT", REPO / ".venv/bin/hadolint"))
    proc = subprocess.run([str(hadolint), "--no-color", str(REPO / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr
    lines = (REPO / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"#\s*hadolint ignore=(\S+)", line)
        if m:
            comment = " ".join(lines[j] for j in range(max(0, i - 6), i) if lines[j].startswith("#"))
            for rule in m.group(1).split(","):
                assert rule in comment, f"hadolint ignore of {rule} without a reason above it"


@pytest.fixture
def fake_python(tmp_path: Path) -> dict[str, str]:
    """PATH with a `python` that prints its argv: shows what the entrypoint execs."""
    (tmp_path / "python").write_text('#!/bin/sh\necho "python $*"\n')
    (tmp_path / "python").chmod(0o755)
    return {"PATH": f"{tmp_path}:/usr/bin:/bin", "DATABASE_URL": "postgresql://u:s3cr3t-x@h/db"}


@pytest.mark.parametrize("args,expected", [
    (["upgrade"], "python -m runner upgrade"),
    (["downgrade", "--to", "-1"], "python -m runner downgrade --to -1"),
    (["status", "--check"], "python -m runner status --check"),
    (["wait"], "python -m runner wait"),
    (["plan"], "python -m runner plan"),
    (["backup"], "python -m runner backup"),
    (["backups"], "python -m runner backups"),
    (["restore", "--backup", "latest", "--yes"], "python -m runner restore --backup latest --yes"),
    (["--log-format", "json", "upgrade"], "python -m runner --log-format json upgrade"),
    ([], "python -m runner"),
    (["echo", "any", "command"], "any command"),
])
def test_entrypoint_maps_commands(fake_python: dict[str, str], args: list[str], expected: str) -> None:
    proc = subprocess.run(["bash", str(REPO / "entrypoint.sh"), *args], env=fake_python,
                          capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, expected, "")


def test_entrypoint_is_strict_and_executable() -> None:
    text = (REPO / "entrypoint.sh").read_text()
    assert "set -Eeuo pipefail" in text and text.startswith("#!/bin/bash")
    assert os.access(REPO / "entrypoint.sh", os.X_OK), "COPY keeps the mode: entrypoint.sh must be +x"
    assert "echo" not in text.split("set -Eeuo pipefail", 1)[1], "the entrypoint prints nothing"


def test_compose_file_is_valid_and_wired() -> None:
    if not shutil.which("docker-compose"):
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true requires docker-compose (WITH_DOCKER=1 bash .ci/setup installs it)")
        pytest.skip("docker-compose not installed (Debian package docker-compose)")
    proc = subprocess.run(["docker-compose", "-f", str(REPO / "docker-compose.yaml"), "config"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    import yaml

    services = yaml.safe_load(proc.stdout)["services"]
    assert services["db"]["healthcheck"]["test"][:4] == ["CMD", "pg_isready", "-h", "127.0.0.1"]
    migrate = services["migrate"]
    assert migrate["depends_on"]["db"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no" and migrate["read_only"] is True
    assert migrate["environment"]["BACKUP_S3_URI"].startswith("s3://")
    assert migrate["environment"]["AWS_ENDPOINT_URL_S3"] == "http://s3:8333"
    assert services["app"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for svc in services.values():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"published beyond loopback: {port}"


# -- the image -----------------------------------------------------------------------------------
def test_image_metadata(runner_image: str) -> None:
    cfg = inspect(runner_image)["Config"]
    assert cfg["User"] == RUNNER_USER, "a numeric user: the kubelet can check runAsNonRoot"
    assert not cfg.get("Healthcheck"), "a one-shot job has no HEALTHCHECK"
    assert cfg["Entrypoint"][0] == "/usr/bin/tini" and cfg["Cmd"] == ["upgrade"]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["PYTHONUNBUFFERED"] == "1"
    labels = cfg["Labels"]
    for key in ("title", "description", "licenses", "version", "revision", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key


def test_image_contents(runner_image: str) -> None:
    script = ("set -e; id -u; id -g; for t in pg_dump pg_restore psql zstd python; do command -v $t; "
              "done; pg_dump --version; zstd --version >/dev/null; "
              "test -f /app/alembic.ini && test -f /app/migrations/env.py && test -d /app/runner; "
              "ls /opt/venv/bin; python -c 'import pip' 2>/dev/null && echo HAS-PIP; "
              "python -c 'import uv' 2>/dev/null && echo HAS-UV; "
              "touch /written 2>/dev/null && echo ROOT-WRITABLE; touch /tmp/ok && echo TMP-OK; "
              "ls $(python -c 'import botocore, os; print(os.path.dirname(botocore.__file__))')/data; "
              "python -m runner.fastpath check; "
              # the entrypoint routes a word to the runner unless a program has that name
              f"for c in {' '.join(COMMANDS)}; do type -P $c >/dev/null && echo SHADOWED-$c; done; true")
    r = run(runner_image, ["bash", "-c", script], {})
    assert "SHADOWED" not in r.out, r.out
    assert r.code == 0, r.err
    lines = r.out.split()
    # botocore keeps S3, STS (web identity) and its shared data files; no other service model
    data = lines[lines.index("TMP-OK") + 1:]
    assert sorted(data) == ["_retry.json", "endpoints.json", "partitions.json", "s3",
                            "sdk-default-configuration.json", "sts"], data
    # the recorded no-op facts apply as the image runs: non-root, read-only, its own environment
    assert "the fast path applies: /app/alembic.ini.fastpath.json" in r.err, r.err
    assert lines[:2] == ["10001", "10001"]
    assert "/usr/lib/postgresql/" in r.out and "/opt/venv/bin/python" in lines
    for banned in ("pip", "pip3", "uv", "HAS-PIP", "HAS-UV", "ROOT-WRITABLE"):
        assert banned not in lines, f"{banned} in the final image"
    assert "TMP-OK" in lines


def test_image_adds_at_most_60_mb_to_its_base(runner_image: str) -> None:
    base = inspect(runner_image)["Config"]["Labels"]["org.opencontainers.image.base.name"]
    if not image_exists(base):
        pytest.skip(f"the base image {base} is not present locally")
    added = image_size(runner_image) - image_size(base)
    assert added <= ADDED_BUDGET, f"the Dockerfile adds {added / 1e6:.1f} MB (budget 60 MB)"


def test_upgrade_then_noop_from_facts_then_mounted_revision(runner_image: str, database: Database,
                                                            tmp_path: Path) -> None:
    env = container_env(database, LOG_FORMAT="json")
    first = run(runner_image, ["upgrade"], env)
    assert first.code == 0, first.err
    assert database.version() == "0005"
    assert first.summary()["applied"] == ["0001", "0002", "0003", "0004", "0005"]
    second = run(runner_image, [], {**env, "PYTHONPROFILEIMPORTTIME": "1"})  # default: upgrade
    assert second.code == 0, second.err
    assert second.summary()["outcome"] == "nothing to do"
    assert answered_from_facts(second), "the image's no-op did not take the fast path"
    status = run(runner_image, ["status", "--check"], env)
    assert status.code == 0, status.err
    # newer scripts mounted over the image's: the recorded facts no longer apply
    versions = tmp_path / "versions"
    shutil.copytree(REPO / "migrations/versions", versions, ignore=shutil.ignore_patterns("__pycache__"))
    (versions / "0006_extra.py").write_text(REVISION_0006)
    mounted = run(runner_image, ["upgrade"], env, volumes=[f"{versions}:/app/migrations/versions:ro"])
    assert mounted.code == 0, mounted.err
    assert skipped(mounted) and mounted.summary()["applied"] == ["0006"]
    assert database.version() == "0006"


def test_sigterm_during_slow_migration_rolls_back(runner_image: str, database: Database) -> None:
    env = container_env(database, ALEMBIC_CONFIG="/scenario/alembic.ini", SLOWPOKE_SLEEP="120")
    box = start_container(runner_image, ["upgrade"], env, volumes=[f"{SLOWPOKE}:/scenario:ro"])
    try:
        def slow_revision_running() -> bool:
            assert box.proc.poll() is None, box.wait().err
            return database.sql("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                                "AND query LIKE 'SELECT pg_sleep%'") != "0"

        wait_for(slow_revision_running, timeout=60, every=0.2, what="the slow revision never started")
        took, r = stop_timed(box)
    finally:
        box.kill()
    assert_no_secrets(r.out, r.err)
    assert r.code == 143, r.err
    assert took < 10, f"docker stop took {took:.1f}s: SIGTERM did not reach the runner"
    assert database.version() == "" and "public.slowpoke" not in database.tables()
    assert database.sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == "0"
    assert database.sql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' "
                        "AND state = 'active'") == "0"


def test_sigterm_during_startup_exits_143_at_once(runner_image: str, database: Database) -> None:
    """Before the runner takes over SIGTERM, tini's forwarded signal still ends it (no 10 s wait)."""
    env = container_env(database, ALEMBIC_CONFIG="/scenario/alembic.ini", SLOWPOKE_SLEEP="120")
    box = start_container(runner_image, ["upgrade"], env, volumes=[f"{SLOWPOKE}:/scenario:ro"])
    try:
        box.wait_running()
        took, r = stop_timed(box)
    finally:
        box.kill()
    assert r.code == 143, r.err
    assert took < 10, f"docker stop took {took:.1f}s"
    assert database.version() == ""


@pytest.mark.parametrize("env,args,needle", [
    ({"DATABASE_URL": "mysql://root:s3cr3t-x@127.0.0.1/app", "BACKUP_MODE": "off"}, ["upgrade"],
     "DATABASE_URL"),
    ({"BACKUP_MODE": "off"}, ["upgrade"], "DATABASE_URL"),
    ({"DATABASE_URL": "postgresql://u:s3cr3t-x@127.0.0.1:1/app", "BACKUP_MODE": "off"},
     ["upgrade", "--bogus"], "--bogus"),
])
def test_bad_configuration_exits_2_with_one_line(runner_image: str, env: dict[str, str],
                                                 args: list[str], needle: str) -> None:
    r = run(runner_image, args, env)
    assert r.code == 2, r.err
    assert len(r.lines) == 1 and needle in r.err and r.out == "", r.err
    assert "s3cr3t-x" not in r.err and "Traceback" not in r.err


def test_database_url_file_and_custom_migrations_mounted(runner_image: str, database: Database,
                                                        tmp_path: Path) -> None:
    secret = tmp_path / "database-url"
    secret.write_text(database.url + "\n")
    secret.chmod(0o644)
    env = {"DATABASE_URL_FILE": "/run/secrets/database-url", "BACKUP_MODE": "off",
           "ALEMBIC_CONFIG": "/scenario/alembic.ini"}
    r = run(runner_image, ["upgrade"], env,
            volumes=[f"{secret}:/run/secrets/database-url:ro", f"{SLOWPOKE}:/scenario:ro"])
    assert r.code == 0, r.err
    assert database.version() == "s001"


def test_derived_image_with_own_migrations(runner_image: str, database: Database,
                                           tmp_path: Path) -> None:
    """The README's `FROM migration-runner` recipe: copy your migrations, point ALEMBIC_CONFIG."""
    shutil.copytree(SLOWPOKE, tmp_path / "db")
    (tmp_path / "Dockerfile").write_text(  # docs/image.md's recipe, the fast path's facts included
        f"FROM {runner_image}\nCOPY db/ /srv/app/\nENV ALEMBIC_CONFIG=/srv/app/alembic.ini\n"
        "USER root\nRUN python -m runner.fastpath record --strict\nUSER 10001:10001\n")
    tag = "migration-runner-derived:test"
    docker("build", "--network", "host", "-t", tag, str(tmp_path), timeout=300,
           env={**os.environ, "DOCKER_BUILDKIT": "0"})
    try:
        r = run(tag, ["upgrade"], container_env(database))
        assert r.code == 0, r.err
        assert database.version() == "s001"
        noop = run(tag, ["upgrade"], container_env(database, LOG_FORMAT="json",
                                                   PYTHONPROFILEIMPORTTIME="1"))
        assert noop.code == 0 and noop.summary()["outcome"] == "nothing to do", noop.err
        assert answered_from_facts(noop), "the derived image's facts were not used"
    finally:
        docker("rmi", tag, check=False)


@pytest.mark.pg("15")  # the test image carries Debian's pg_dump 15; it rightly refuses newer servers
def test_backup_to_s3_with_web_identity_from_the_container(runner_image: str, database: Database,
                                                           s3_server: S3Server, bucket: str,
                                                           tmp_path: Path) -> None:
    """The trimmed botocore still has what S3 and IRSA need: no static keys, a web identity token,
    STS (AssumeRoleWithWebIdentity) and S3 on the test server."""
    from moto.sts.models import sts_backends

    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2ln")
    token.chmod(0o644)
    role = f"arn:aws:iam::123456789012:role/runner-{uuid.uuid4().hex[:8]}"
    env = {**container_env(database, LOG_FORMAT="json", BACKUP_MODE="required",
                           BACKUP_S3_URI=f"s3://{bucket}/team/app"),
           "AWS_ENDPOINT_URL_S3": s3_server.endpoint, "AWS_ENDPOINT_URL_STS": s3_server.endpoint,
           "AWS_ROLE_ARN": role, "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/aws/token",
           "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}
    mount = [f"{token}:/var/run/secrets/aws/token:ro"]
    r = run(runner_image, ["upgrade", "--to", "0002"], env, volumes=mount)
    assert r.code == 0, r.err
    key = r.summary()["backup"]
    assert key.startswith(f"team/app/{database.name}/") and key.endswith(".pgdump.zst")
    assert s3_server.keys(bucket) == [key, key + ".manifest.json"]
    assumed = [a.role_arn for a in sts_backends["123456789012"]["aws"].assumed_roles]
    assert role in assumed, "the credentials did not come from AssumeRoleWithWebIdentity"
    listed = run(runner_image, ["backups"], env, volumes=mount)
    assert listed.code == 0 and key in listed.out + listed.err, listed.err


def test_verify_target_adds_the_locked_squawk(runner_image: str) -> None:
    """`docker build --target verify`: the runtime image plus squawk. The plain build has built
    (and cached) every stage already, so this costs only the cache lookups."""
    if os.environ.get("MIGRATION_RUNNER_IMAGE"):
        pytest.skip("an image built elsewhere: no build cache to check the verify target cheaply")
    locked = re.search(r'name = "squawk-cli"\nversion = "([^"]+)"', (REPO / "uv.lock").read_text())
    assert locked, "uv.lock has no squawk-cli"
    tag = "migration-runner-verify:test"
    docker("build", "--network", "host", "--target", "verify", "-t", tag,
           *[a for k, v in TEST_BUILD_ARGS.items() for a in ("--build-arg", f"{k}={v}")], str(REPO),
           timeout=600, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    try:
        r = run(tag, ["sh", "-c", "command -v squawk && squawk --version"], {})
        assert r.code == 0, r.err
        assert r.out.split()[0] == "/opt/venv/bin/squawk" and locked.group(1) in r.out, r.out
        assert inspect(tag)["Config"]["User"] == RUNNER_USER
    finally:
        docker("rmi", tag, check=False)


def test_arbitrary_command_runs(runner_image: str) -> None:
    r = run(runner_image, ["sh", "-c", "echo hello from $(id -u)"], {})
    assert (r.code, r.out.strip()) == (0, "hello from 10001")
