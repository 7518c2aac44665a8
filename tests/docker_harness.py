"""Docker helpers for the tests: a local stand-in base image, the image build, running containers.

No registry can be reached here, so when the Dockerfile's base image is not present locally a
stand-in is built with debootstrap (Debian bookworm + Debian's python3) and imported under the
base image's exact name. Only the stand-in carries the host's CA bundle and the pip/uv TLS
settings the build needs behind a TLS-inspecting proxy: the Dockerfile stays what a user builds.
All traffic stays on loopback: builds and containers use the host network, never a bridge.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.result import Result

REPO = Path(__file__).resolve().parent.parent
IMAGE = "migration-runner:test"
# the test build uses Debian's own client: apt.postgresql.org is unreachable from here
TEST_BUILD_ARGS = {"PG_APT_SOURCE": "debian", "PG_MAJOR": "15"}
RUNNER_USER = "10001:10001"
LABEL = "migration-runner-test"  # on every container the tests start, for the final sweep
# the label's value: the sweep removes this session's containers, never a parallel session's
SESSION = uuid.uuid4().hex[:12]
STANDIN_LABEL = "org.migration-runner.test.standin"
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_LOCK = Path(tempfile.gettempdir()) / "migration-runner-docker-build.lock"


class DockerError(RuntimeError):
    """A docker command failed; the message carries the tail of its output."""


def docker_unavailable() -> str | None:
    """Return why Docker cannot be used here, or None when a daemon answers."""
    if not shutil.which("docker"):
        return "the docker CLI is not installed (apt-get install docker.io, or WITH_DOCKER=1 bash .ci/setup)"
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker info failed: {exc}"
    if proc.returncode:
        return f"no Docker daemon answers ({_tail(proc.stderr, 1)}); start one with: bash .ci/dockerd"
    return None


def docker(*args: str, timeout: float = 600, env: Mapping[str, str] | None = None,
           check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run one docker CLI command and return it; raise DockerError with its output on failure."""
    return _run(["docker", *args], timeout, env=env, check=check, input=input)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def image_exists(name: str) -> bool:
    return docker("image", "inspect", name, check=False, timeout=60).returncode == 0


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """Serialise builds across pytest processes (xdist workers, parallel sessions)."""
    with open(BUILD_LOCK, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- the base image and its stand-in -------------------------------------------------------------
def base_image(dockerfile: Path = REPO / "Dockerfile") -> str:
    """Return the Dockerfile's default base image (its `ARG PYTHON_IMAGE=...`)."""
    m = re.search(r"^ARG PYTHON_IMAGE=(\S+)", dockerfile.read_text(), re.MULTILINE)
    if not m:
        raise DockerError(f"{dockerfile} declares no ARG PYTHON_IMAGE=<base image>")
    return m.group(1)


STANDIN_ENV = {
    # what the official python image sets, so the Dockerfile sees the same environment
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    # only here: pip, uv and Python trust the host bundle, which holds the proxy's CA
    "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
    "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt",
    "REQUESTS_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt",
    "UV_SYSTEM_CERTS": "1",
}


def ensure_base_image(name: str) -> str:
    """Make sure `name` exists locally: keep a pulled or cached one, else build the stand-in."""
    with build_lock():
        if not image_exists(name):
            build_standin(name)
    return name


def build_standin(name: str) -> None:
    """Build Debian bookworm minbase + python3 + the host CA bundle and import it as `name`."""
    if not shutil.which("debootstrap"):
        raise DockerError("debootstrap is needed to build a stand-in base image "
                          "(apt-get install debootstrap, or WITH_DOCKER=1 bash .ci/setup)")
    root = Path(tempfile.mkdtemp(prefix="standin-"))
    try:
        _run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
              "bookworm", str(root), DEBIAN_MIRROR], timeout=900)
        cas = root / "usr/local/share/ca-certificates"
        cas.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HOST_CA_BUNDLE, cas / "host-bundle.crt")
        _run(["chroot", str(root), "update-ca-certificates"], timeout=120)
        _run(["chroot", str(root), "apt-get", "clean"], timeout=120)
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True)
        for cache in root.glob("var/cache/debconf/*-old"):
            cache.unlink()
        changes = [f"ENV {k}={v}" for k, v in STANDIN_ENV.items()]
        changes += [f"LABEL {STANDIN_LABEL}=true", 'CMD ["python3"]']
        args = [a for c in changes for a in ("--change", c)]
        tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "--exclude=./dev/*",
                                "--exclude=./proc/*", "--exclude=./sys/*", "-c", "."],
                               stdout=subprocess.PIPE)
        imp = subprocess.run(["docker", "import", *args, "-", name], stdin=tar.stdout,
                             capture_output=True, text=True, timeout=600)
        tar.stdout.close()  # type: ignore[union-attr]
        if tar.wait() or imp.returncode:
            raise DockerError(f"docker import of the stand-in failed: {_tail(imp.stderr)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(cmd: Sequence[str], timeout: float, env: Mapping[str, str] | None = None,
         check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run one command; raise DockerError with the tail of its output when it fails and check."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else dict(env), input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode:
        what = " ".join(cmd[:2]) if cmd[0] == "docker" else cmd[0]
        raise DockerError(f"{what} exited {proc.returncode}:\n{_tail(proc.stdout + proc.stderr)}")
    return proc


def is_standin(name: str) -> bool:
    out = docker("image", "inspect", "--format", f'{{{{index .Config.Labels "{STANDIN_LABEL}"}}}}',
                 name, check=False).stdout.strip()
    return out == "true"


# -- the image -----------------------------------------------------------------------------------
def build_image(tag: str = IMAGE, build_args: Mapping[str, str] = TEST_BUILD_ARGS,
                context: Path = REPO) -> str:
    """Build the repository's Dockerfile as `tag` on the host network; return the tag."""
    ensure_base_image(base_image(context / "Dockerfile"))
    args = [a for k, v in build_args.items() for a in ("--build-arg", f"{k}={v}")]
    with build_lock():
        before = image_id(tag)
        # DOCKER_BUILDKIT=0: Debian's docker.io ships no buildx; the classic builder is what runs
        docker("build", "--network", "host", "-t", tag, *args, str(context), timeout=1800,
               env={**os.environ, "DOCKER_BUILDKIT": "0"})
        if before and before != image_id(tag):
            docker("rmi", before, check=False)  # the previous build, now untagged
    return tag


def image_id(name: str) -> str | None:
    proc = docker("image", "inspect", "--format", "{{.Id}}", name, check=False, timeout=60)
    return proc.stdout.strip() if proc.returncode == 0 else None


def inspect(name: str) -> dict:
    return json.loads(docker("image", "inspect", name).stdout)[0]


def image_size(name: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", name).stdout.strip())


# -- containers ----------------------------------------------------------------------------------
@dataclass
class Container:
    """A container started in the background by start_container()."""

    name: str
    proc: subprocess.Popen = field(repr=False)

    def wait(self, timeout: float = 120) -> Result:
        out, err = self.proc.communicate(timeout=timeout)
        return Result(self.proc.returncode, out, err)

    def stop(self, grace: int = 10) -> None:
        """`docker stop`: SIGTERM to PID 1, SIGKILL after `grace` seconds."""
        docker("stop", "-t", str(grace), self.name, check=False, timeout=grace + 60)

    def kill(self, signal: str = "KILL") -> None:
        docker("kill", "-s", signal, self.name, check=False)

    def running(self) -> bool:
        out = docker("inspect", "--format", "{{.State.Running}}", self.name, check=False).stdout
        return out.strip() == "true"

    def wait_running(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.running():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise DockerError(f"container {self.name} did not start: {self.wait(10).err}")
            time.sleep(0.1)


def container_command(image: str, args: Sequence[str] = (), env: Mapping[str, str] | None = None, *,
                      user: str | None = RUNNER_USER, read_only: bool = True,
                      tmpfs: Sequence[str] = ("/tmp",), volumes: Sequence[str] = (),
                      cap_drop_all: bool = True, no_new_privileges: bool = True,
                      entrypoint: Sequence[str] | None = None, workdir: str | None = None,
                      network: str = "host", name: str | None = None, remove: bool = True,
                      extra: Sequence[str] = ()) -> tuple[list[str], dict[str, str], str]:
    """Return (docker run argv, the docker client's environment, container name).

    The hardening defaults are those of a Pod Security "restricted" pod: a numeric non-root
    user, a read-only root filesystem with /tmp as a tmpfs (an emptyDir in Kubernetes), every
    capability dropped and no privilege escalation. `entrypoint` plays the role of a Kubernetes
    `command`, `args` of its `args`. Values of `env` reach the container by name (`-e NAME`)
    from the docker client's environment, so no secret appears in a process list.
    """
    name = name or f"{LABEL}-{uuid.uuid4().hex[:10]}"
    argv = ["docker", "run", "--name", name, "--label", f"{LABEL}={SESSION}", "--network", network]
    argv += ["--rm"] if remove else []
    argv += ["--user", user] if user else []
    argv += ["--read-only"] if read_only else []
    argv += [a for t in tmpfs for a in ("--tmpfs", t)]
    argv += [a for v in volumes for a in ("-v", v)]
    argv += ["--cap-drop", "ALL"] if cap_drop_all else []
    argv += ["--security-opt", "no-new-privileges"] if no_new_privileges else []
    argv += ["--workdir", workdir] if workdir else []
    client_env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_HOST")}
    for key, value in (env or {}).items():
        argv += ["-e", key]
        client_env[key] = value
    argv += list(extra)
    command = list(args)
    if entrypoint is not None:
        argv += ["--entrypoint", entrypoint[0]]
        command = [*entrypoint[1:], *command]
    return [*argv, image, *command], client_env, name


def run_container(image: str, args: Sequence[str] = (), env: Mapping[str, str] | None = None, *,
                  timeout: float = 180, **options: object) -> Result:
    """Run a container to completion (options as in container_command) and return its result."""
    argv, client_env, name = container_command(image, args, env, **options)  # type: ignore[arg-type]
    try:
        proc = subprocess.run(argv, env=client_env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        docker("rm", "-f", name, check=False)
        raise
    return Result(proc.returncode, proc.stdout, proc.stderr)


def start_container(image: str, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                    **options: object) -> Container:
    """Start a container in the background (options as in container_command)."""
    argv, client_env, name = container_command(image, args, env, **options)  # type: ignore[arg-type]
    proc = subprocess.Popen(argv, env=client_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    return Container(name, proc)


def remove_test_containers() -> None:
    """Remove every container this test session started that is still around."""
    ids = docker("ps", "-aq", "--filter", f"label={LABEL}={SESSION}", check=False).stdout.split()
    if ids:
        docker("rm", "-f", *ids, check=False)
