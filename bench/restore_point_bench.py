"""Bench: what BACKUP_MODE=restore-point adds before migrating, against no backup and a dump, one run.

    .venv/bin/python bench/restore_point_bench.py --sizes 0.05,1.2 --repeat 5

For each size (GB on disk) it builds a PostgreSQL 18 database with bench/backup_bench.py's
generator on a cluster that archives WAL to a local directory (archive_command `cp`), and times
`python -m runner upgrade --to 0001` (the sample chain's first revision) in alternating order:

  off            BACKUP_MODE=off
  restore-point  BACKUP_MODE=restore-point (archiving checked, a named point, a WAL switch, waited
                 for until archived, its manifest written to S3: moto on 127.0.0.1)
  dump           BACKUP_MODE=required (pg_dump | zstd streamed to S3), once per size

each followed by `downgrade --to base` (BACKUP_MODE=off, not timed). It prints the medians of the
wall time and of the runner's own phase (summary durations_s: restore_point or backup), and the
machine's load average. Goal: the restore point adds under 1 s on the 1.2 GB database, and the
same on any size. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.backup_bench import TOOLS, build  # noqa: E402
from bench.measure import wall_rss  # noqa: E402
from tests.pgcluster import Cluster  # noqa: E402
from tests.s3_fixtures import S3Server, moto_process, s3_client  # noqa: E402


def archiving_cluster() -> Cluster:
    cluster = Cluster("18").init()
    archive = cluster.root / "archive"
    archive.mkdir()
    cluster.give(archive)
    cluster.configure(f"archive_mode = on\narchive_command = 'cp %p {archive}/%f'\nmax_wal_size = 4GB")
    return cluster.start()


def summary(err: str) -> dict:
    return json.loads([x for x in err.splitlines() if '"summary"' in x][-1])


def bench_size(gb: float, endpoint: str, s3, repeat: int) -> dict[str, float]:
    cluster = archiving_cluster()
    try:
        t0 = time.monotonic()
        size = build(cluster, gb)
        print(f"\n== {size / 1e9:.2f} GB database (built in {time.monotonic() - t0:.0f}s)", flush=True)
        bucket = f"bench-{int(time.time())}"
        s3.create_bucket(Bucket=bucket)
        env = dict(os.environ, **S3Server(endpoint, s3).env(), DATABASE_URL=cluster.url("bench"),
                   ALEMBIC_CONFIG=str(REPO / "alembic.ini"),
                   BACKUP_S3_URI=f"s3://{bucket}/bench", PG_DUMP_BIN=str(TOOLS / "pg_dump"),
                   PYTHONPATH=str(REPO), LOG_FORMAT="json")
        reset = [sys.executable, "-m", "runner", "downgrade", "--to", "base", "--yes"]
        walls: dict[str, list[float]] = {"off": [], "restore-point": [], "dump": []}
        phases: dict[str, list[float]] = {"restore-point": [], "dump": []}
        loads: list[float] = []
        pairs = [["off", "restore-point"] if i % 2 == 0 else ["restore-point", "off"] for i in range(repeat)]
        for mode in [m for pair in pairs for m in pair] + ["dump"]:  # alternating, then one dump
            loads.append(os.getloadavg()[0])
            cluster.psql("CHECKPOINT")
            backup_mode = {"off": "off", "restore-point": "restore-point", "dump": "required"}[mode]
            r = wall_rss([sys.executable, "-m", "runner", "upgrade", "--to", "0001"],
                         {**env, "BACKUP_MODE": backup_mode})
            walls[mode].append(r["s"])
            durations = summary(r["err"])["durations_s"]
            if mode != "off":
                phases[mode].append(durations["restore_point" if mode == "restore-point" else "backup"])
            phase = durations.get("restore_point", durations.get("backup", 0.0))
            print(f"  {mode:<14} {r['s']:6.2f} s   phase {phase:.3f} s   (load {loads[-1]:.1f})", flush=True)
            wall_rss(reset, {**env, "BACKUP_MODE": "off"})
        for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=o["Key"])
        result = {"db_gb": size / 1e9, "load": statistics.median(loads),
                  **{f"wall_{k}": statistics.median(v) for k, v in walls.items()},
                  **{f"phase_{k}": statistics.median(v) for k, v in phases.items()}}
        print(f"  restore point: {result['phase_restore-point']:.3f} s before migrating (median of "
              f"{repeat}); wall {result['wall_restore-point']:.2f} s vs {result['wall_off']:.2f} s with no "
              f"backup; a dump: {result['phase_dump']:.1f} s", flush=True)
        return result
    finally:
        cluster.destroy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.05,1.2", help="database sizes in GB, comma separated")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each side per size (medians)")
    args = ap.parse_args()
    with moto_process() as endpoint:
        s3 = s3_client(endpoint)
        print(f"cores: {os.cpu_count()}, PostgreSQL 18 ({TOOLS}), S3: moto at {endpoint}")
        rows = [bench_size(float(gb), endpoint, s3, args.repeat) for gb in args.sizes.split(",")]
    print("\n| DB size | restore point (phase) | upgrade, restore-point | upgrade, off | difference | "
          "dump (phase) | load |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['db_gb']:.2f} GB | {r['phase_restore-point']:.3f} s | "
              f"{r['wall_restore-point']:.2f} s | {r['wall_off']:.2f} s | "
              f"{r['wall_restore-point'] - r['wall_off']:+.2f} s | "
              f"{r['phase_dump']:.1f} s | {r['load']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
