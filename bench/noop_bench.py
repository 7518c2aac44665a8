"""No-op upgrade: `python -m runner upgrade` vs plain `alembic upgrade head`, same database, alternating.

Prints each side's median wall time and the ratio runner/alembic (target: <= 1.0).
Usage: .venv/bin/python bench/noop_bench.py [--runs 15] [--major 18]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.pgcluster import Cluster  # noqa: E402


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Return (wall seconds, CPU seconds of the child): CPU time is steadier on a busy machine."""
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True)
    r1, t1 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    return t1 - t0, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--major", default="18")
    args = ap.parse_args()
    cluster = Cluster(args.major).init().start()
    try:
        cluster.psql("CREATE DATABASE bench")
        url = cluster.url("bench")
        env = dict(os.environ, DATABASE_URL=url, ALEMBIC_CONFIG=str(REPO / "alembic.ini"),
                   BACKUP_MODE="off", PYTHONPATH=str(REPO))
        # both sides run from cached bytecode, as in the image; a shell that sets this would
        # time the compiler instead (about 1.4 s of every run)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        runner = [sys.executable, "-m", "runner", "upgrade"]
        with tempfile.NamedTemporaryFile("w", suffix=".ini", delete=False) as ini:
            text = (REPO / "alembic.ini").read_text().replace("%(here)s", str(REPO))
            text = text.replace("[alembic]\n", "[alembic]\nsqlalchemy.url = "
                                + url.replace("postgresql://", "postgresql+psycopg2://").replace("%", "%%")
                                + "\n", 1)
            ini.write(text)
        alembic = [str(Path(sys.executable).with_name("alembic")), "-c", ini.name, "upgrade", "head"]
        subprocess.run(runner, env=env, cwd=REPO, check=True, capture_output=True)  # to head
        timed(alembic, env)  # warm both once (page cache, .pyc)
        timed(runner, env)
        ours, theirs = [], []
        for _ in range(args.runs):
            ours.append(timed(runner, env))
            theirs.append(timed(alembic, env))
        print(f"PostgreSQL {args.major}, {args.runs} alternating runs each, database already at head")
        for i, what in ((0, "wall"), (1, "CPU ")):
            mo = statistics.median(o[i] for o in ours)
            mt = statistics.median(t[i] for t in theirs)
            print(f"  {what}: runner {mo * 1000:6.1f} ms | alembic {mt * 1000:6.1f} ms | "
                  f"ratio runner/alembic {mo / mt:.2f} (target <= 1.00)")
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
