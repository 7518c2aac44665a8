"""Fleet: 200 databases with the sample chain on one server, migrated three ways in the same run.

  (a) a shell loop of `python -m runner upgrade`, one database after the other
  (b) the fleet command, `--parallel 1`
  (c) the fleet command, `--parallel 8`           goal: (c) at least 5x faster than (a)
  then `status` over the fleet, all at head         goal: at most 0.05 s per target

BACKUP_MODE=off on every side (the issue's setting for (a)); everything else at its default.
Besides wall time it reports the CPU time of the runner's processes and of the PostgreSQL server
per database: on a shared machine the wall times move with everyone else's load, the CPU does not.
Usage: .venv/bin/python bench/fleet_bench.py [--targets 200] [--parallel 8] [--major 18]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg2  # noqa: E402

from tests.pgcluster import Cluster  # noqa: E402

HEAD = "0005"
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def fresh(cluster: Cluster, names: list[str]) -> None:
    """(Re)create every database empty."""
    conn = psycopg2.connect(cluster.url("postgres"))
    conn.autocommit = True
    with conn.cursor() as cur:
        for name in names:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            cur.execute(f"CREATE DATABASE {name}")
    conn.close()


def at_head(cluster: Cluster, names: list[str]) -> int:
    count = 0
    for name in names:
        conn = psycopg2.connect(cluster.url(name))
        with conn.cursor() as cur:
            cur.execute("SELECT version_num FROM alembic_version")
            count += cur.fetchone() == (HEAD,)
        conn.close()
    return count


def server_cpu(cluster: Cluster) -> float:
    """CPU seconds of the postmaster and its reaped backends (a shared machine's load aside)."""
    fields = Path(f"/proc/{cluster.postmaster_pid()}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


def adopt_orphans() -> None:
    """Become the subreaper of what the commands leave running (the fleet's forkserver outlives
    its main process by a moment): reaping it adds its CPU time to ours."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)


def reap(timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.05)
        except ChildProcessError:
            return


def timed(cmd: list[str], env: dict[str, str], cluster: Cluster) -> tuple[float, float, float]:
    """Run cmd; return (wall, client CPU, server CPU) seconds."""
    r0, s0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), server_cpu(cluster), time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    took = time.perf_counter() - t0
    reap()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    time.sleep(0.5)  # the last backends exit and are reaped by the postmaster
    client = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return took, client, server_cpu(cluster) - s0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", type=int, default=200)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--major", default="18")
    args = ap.parse_args()
    names = [f"tenant_{i:03d}" for i in range(args.targets)]
    load = os.getloadavg()[0]  # these VMs are shared: say how busy this one was
    cluster = Cluster(args.major)
    cluster.init()
    with open(cluster.data / "postgresql.conf", "a") as conf:  # 8 workers x 4 connections, and more
        conf.write("max_connections = 300\n")
    cluster.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            listing = Path(tmp) / "targets"
            listing.write_text("\n".join(names) + "\n")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "PG"))}
            env.pop("PYTHONDONTWRITEBYTECODE", None)  # cached bytecode, as in the image
            env.update(ALEMBIC_CONFIG=str(REPO / "alembic.ini"), BACKUP_MODE="off", PYTHONPATH=str(REPO))
            fleet_env = dict(env, TARGETS_FILE=str(listing), DATABASE_URL_TEMPLATE=cluster.url("{name}"))
            loop = Path(tmp) / "loop.sh"  # the shell loop a team would write (URLs from the environment)
            loop.write_text('set -e\nwhile read -r name; do\n  DATABASE_URL="${TEMPLATE/\\{name\\}/$name}" '
                            f'"{sys.executable}" -m runner upgrade 2>/dev/null\ndone < "{listing}"\n')
            timed([sys.executable, "-m", "runner", "--help"], env, cluster)  # warm the bytecode cache
            adopt_orphans()
            rows = []
            for label, cmd, run_env in [
                ("(a) shell loop of `python -m runner upgrade`", ["bash", str(loop)],
                 dict(env, TEMPLATE=cluster.url("{name}"))),
                ("(b) fleet `upgrade --parallel 1`", [sys.executable, "-m", "runner", "upgrade",
                                                     "--parallel", "1"], fleet_env),
                (f"(c) fleet `upgrade --parallel {args.parallel}`",
                 [sys.executable, "-m", "runner", "upgrade", "--parallel", str(args.parallel)], fleet_env),
            ]:
                fresh(cluster, names)
                rows.append((label, *timed(cmd, run_env, cluster)))
                assert at_head(cluster, names) == len(names), f"{label}: not every database at head"
            rows.append((f"(d) fleet `status --parallel {args.parallel}`, all at head",
                         *timed([sys.executable, "-m", "runner", "status", "--parallel", str(args.parallel)],
                                fleet_env, cluster)))
    finally:
        cluster.destroy()
    n, base = args.targets, rows[0][1]
    print(f"PostgreSQL {args.major}, {n} databases, sample chain ({HEAD}), BACKUP_MODE=off, "
          f"{os.cpu_count()} CPUs, load average before the run {load:.1f}")
    print("| run | wall | wall per database | speed-up vs (a) | runner CPU per database | "
          "server CPU per database |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, took, client, server in rows:
        print(f"| {label} | {took:.1f} s | {took / n * 1000:.0f} ms | {base / took:.1f}x | "
              f"{client / n * 1000:.0f} ms | {server / n * 1000:.0f} ms |")
    speedup, status = base / rows[2][1], rows[3][1] / n
    print(f"(c) is {speedup:.1f}x faster than (a) (goal >= 5x): {'met' if speedup >= 5 else 'NOT met'}; "
          f"status {status:.3f} s per target (goal <= 0.05 s): {'met' if status <= 0.05 else 'NOT met'}")


if __name__ == "__main__":
    main()
