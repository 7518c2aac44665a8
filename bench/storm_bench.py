"""Storm: 20 runners started at once on a 2-second migration, side by side with a single run.

Every deploy of a scaled-out service may start many copies of the Job at once; exactly one
migrates, the others must find nothing to do, quickly. Prints the median wall time of a single
run and of a storm (each on a fresh database at the same revision, alternating), with the no-op
facts recorded as the image records them (copies wait at the start-up gate, runner.lock.gate) and
with FAST_PATH=off (every copy runs env.py and polls the migration lock), and the ratios
storm/single (target: <= 2.5).
Usage: .venv/bin/python bench/storm_bench.py [--rounds 3] [--runners 20] [--sleep 2] [--major 18]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.pgcluster import Cluster  # noqa: E402

LAB = REPO / "tests/scenarios/lab"  # l002 sleeps LAB_SLEEP seconds with LAB_MODE=sleep


def storm(cluster: Cluster, env: dict[str, str], runners: int) -> tuple[float, float, list[str]]:
    """Start `runners` upgrades at once on a database at l001; return (wall s, CPU s, outcomes)."""
    name = f"storm_{uuid.uuid4().hex[:8]}"
    cluster.psql(f"CREATE DATABASE {name} TEMPLATE at_l001")
    env = dict(env, DATABASE_URL=cluster.url(name))
    cmd = [sys.executable, "-m", "runner", "upgrade"]
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(runners)]
    errs = [p.communicate()[1] for p in procs]
    r1, t1 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    if any(p.returncode for p in procs):
        raise SystemExit("a runner failed:\n" + next(e for p, e in zip(procs, errs, strict=True)
                                                      if p.returncode))
    outcomes = [_outcome(e) for e in errs]
    if outcomes.count("migrated") != 1:
        raise SystemExit(f"expected exactly one migration, got {outcomes}")
    cluster.psql(f"DROP DATABASE {name}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return t1 - t0, cpu, outcomes


def _outcome(log: str) -> str:
    if "outcome=migrated" in log:
        return "migrated"
    if "another copy of this upgrade is migrating" in log:
        return "waited at the start-up gate"  # facts recorded: no env.py, no SQLAlchemy
    if "lock.not_needed" in log:
        return "stopped waiting for the lock"  # saw the target reached while polling
    if "lock.acquired" in log:
        return "took the lock for nothing"
    return "nothing to do at start"


def _prepare(cluster: Cluster, env: dict[str, str], tmp: Path) -> Path:
    """A copy of the lab scenario with the no-op facts recorded, as the image records its own; a
    template database at l001."""
    shutil.copytree(LAB, tmp / "lab", ignore=shutil.ignore_patterns("__pycache__"))
    ini = tmp / "lab" / "alembic.ini"
    subprocess.run([sys.executable, "-m", "runner.fastpath", "record", "--strict", "-c", str(ini)],
                   env=env, cwd=REPO, check=True, capture_output=True)
    cluster.psql("CREATE DATABASE at_l001")
    subprocess.run([sys.executable, "-m", "runner", "upgrade", "--to", "l001"], cwd=REPO, check=True,
                   env=dict(env, ALEMBIC_CONFIG=str(ini), DATABASE_URL=cluster.url("at_l001")),
                   capture_output=True)
    return ini


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runners", type=int, default=20)
    ap.add_argument("--sleep", default="2", help="seconds the migration takes")
    ap.add_argument("--major", default="18")
    args = ap.parse_args()
    cluster = Cluster(args.major).init().start()
    env = dict(os.environ, BACKUP_MODE="off", PYTHONPATH=str(REPO), LOCK_WAIT_TIMEOUT="120s",
               DB_WAIT_TIMEOUT="60s", LAB_MODE="sleep", LAB_SLEEP=args.sleep)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # cached bytecode, as in the image
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env["ALEMBIC_CONFIG"] = str(_prepare(cluster, env, Path(tmp)))
            variants = {"facts recorded (as in the image)": env,
                        "FAST_PATH=off (env.py in every copy)": dict(env, FAST_PATH="off")}
            storm(cluster, env, 1)  # warm up: page cache, .pyc files
            single: list[tuple[float, float, list[str]]] = []
            many: dict[str, list[tuple[float, float, list[str]]]] = {k: [] for k in variants}
            for _ in range(args.rounds):
                single.append(storm(cluster, env, 1))
                for label, variant in variants.items():
                    many[label].append(storm(cluster, variant, args.runners))
            _print(args, single, many)
    finally:
        cluster.destroy()


def _print(args: argparse.Namespace, single: list[tuple[float, float, list[str]]],
           many: dict[str, list[tuple[float, float, list[str]]]]) -> None:
    s_wall, s_cpu = statistics.median(x[0] for x in single), statistics.median(x[1] for x in single)
    print(f"PostgreSQL {args.major}, {os.cpu_count()} CPUs, a {args.sleep}s migration (l002 of the lab "
          f"scenario), {args.rounds} rounds alternating (medians), a fresh database at l001 each time")
    print(f"  single run: wall {s_wall:5.2f} s, CPU {s_cpu:5.2f} s")
    for label, runs in many.items():
        wall, cpu = statistics.median(x[0] for x in runs), statistics.median(x[1] for x in runs)
        last = runs[-1][2]
        counts = ", ".join(f"{last.count(k)} {k}" for k in sorted(set(last)))
        print(f"  {args.runners} at once, {label}: wall {wall:5.2f} s, CPU {cpu:5.2f} s, "
              f"ratio storm/single {wall / s_wall:.2f} (target <= 2.5)")
        print(f"      last round: {counts}")


if __name__ == "__main__":
    main()
