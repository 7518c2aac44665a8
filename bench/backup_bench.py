"""Bench: the runner's streamed backup vs the common temp-file approach, in one run, on loopback.

    .venv/bin/python bench/backup_bench.py --sizes 1,4
    .venv/bin/python bench/backup_bench.py --sizes 1.2 --jobs 2 --repeat 3   # parallel vs streamed

For each size (GB on disk) it builds a PostgreSQL 18 database from pgbench tables plus a table of
random hex text (not trivially compressible), starts a local S3 server (moto, 127.0.0.1), and times:

  runner   python -m runner backup          (pg_dump -Fc -Z0 | zstd -1 -T0 -> multipart upload)
  (a)      pg_dump -Fc -f FILE && aws s3 cp FILE s3://...   (the "postgres-backup-s3" approach)
  (b)      pg_dump -Fc > /dev/null          (gzip custom format, no upload at all)

and prints wall times, ratios and the runner's peak RSS (VmHWM of the runner process, and
wait4's ru_maxrss, which also covers its pg_dump and zstd children). With --jobs N it instead
times the runner's streamed backup against BACKUP_JOBS=N (pg_dump -Fd -j N, each file shipped as
it is closed), alternating, --repeat times each, and prints medians and the load average. Not
part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.measure import wall_rss  # noqa: E402
from tests.pgcluster import PASSWORD, Cluster, bindir  # noqa: E402
from tests.s3_fixtures import S3Server, moto_process, s3_client  # noqa: E402

TOOLS = bindir("18")
RUNNER_ONLY = False


def aws_cli() -> str:
    """Return an aws CLI, installing awscli from PyPI into a private venv when none is on PATH."""
    found = shutil.which("aws")
    if found:
        return found
    venv = Path(tempfile.gettempdir()) / "bench-awscli"
    if not (venv / "bin" / "aws").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "awscli"], check=True)
    return str(venv / "bin" / "aws")


def build(cluster: Cluster, gb: float) -> int:
    """Fill database 'bench' to about gb GB: ~45% pgbench tables, the rest random hex text."""
    cluster.psql("CREATE DATABASE bench")
    scale = max(1, int(gb * 1000 * 0.45 / 15))  # pgbench: ~15 MB per scale unit
    cluster._run(TOOLS / "pgbench", "-i", "-q", "-s", str(scale), "-h", cluster.sock, "-p",
                 str(cluster.port), "-U", "admin", "bench")
    have = int(cluster.psql("SELECT pg_database_size('bench')", "bench"))
    rows = max(0, int((gb * 1e9 - have) / 300))  # ~300 bytes per row on disk
    step = 500_000
    cluster.psql("CREATE TABLE noise (id bigint, body text)", "bench")
    for start in range(0, rows, step):
        cluster.psql(
            "INSERT INTO noise SELECT g, md5(random()::text) || md5(random()::text) || "
            "md5(random()::text) || md5(random()::text) || md5(random()::text) || "
            "md5(random()::text) || md5(random()::text) || md5(random()::text) "
            f"FROM generate_series({start}, {min(rows, start + step) - 1}) g", "bench")
    cluster.psql("VACUUM ANALYZE", "bench")
    return int(cluster.psql("SELECT pg_database_size('bench')", "bench"))


def bench_size(gb: float, aws: str, endpoint: str, s3, workdir: Path) -> dict[str, float]:
    cluster = Cluster("18").init().start()
    try:
        t0 = time.monotonic()
        size = build(cluster, gb)
        print(f"\n== {size / 1e9:.2f} GB database (built in {time.monotonic() - t0:.0f}s)", flush=True)
        bucket = f"bench-{int(time.time())}"
        s3.create_bucket(Bucket=bucket)
        aws_env = dict(os.environ, **S3Server(endpoint, s3).env())
        pg_env = dict(aws_env, PGPASSWORD=PASSWORD, PGHOST="127.0.0.1", PGPORT=str(cluster.port),
                      PGUSER="admin", PGDATABASE="bench")
        runner_env = dict(aws_env, DATABASE_URL=cluster.url("bench"),
                          ALEMBIC_CONFIG=str(REPO / "alembic.ini"),
                          BACKUP_S3_URI=f"s3://{bucket}/bench", PG_DUMP_BIN=str(TOOLS / "pg_dump"),
                          PG_RESTORE_BIN=str(TOOLS / "pg_restore"), PYTHONPATH=str(REPO))
        dump = TOOLS / "pg_dump"
        file = workdir / "bench.dump"
        results: dict[str, float] = {}
        r = wall_rss([sys.executable, "-m", "runner", "backup"], runner_env)
        runner_s, hwm = r["s"], r["hwm"]
        results.update(runner=runner_s, runner_hwm_mib=hwm, runner_tree_maxrss_mib=r["maxrss"])
        key = next(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]
                   if o["Key"].endswith(".zst"))
        results["runner_object_mb"] = s3.head_object(Bucket=bucket, Key=key)["ContentLength"] / 1e6
        if RUNNER_ONLY:
            print(f"  runner {runner_s:.1f} s, peak RSS {hwm:.0f} MiB", flush=True)
            return results
        results["a"] = wall_rss(f"{dump} -Fc -f {file} && {aws} s3 cp --only-show-errors "
                                   f"--endpoint-url {endpoint} {file} s3://{bucket}/a.dump", pg_env,
                                shell=True)["s"]
        results["a_object_mb"] = file.stat().st_size / 1e6
        file.unlink()
        results["b"] = wall_rss(f"{dump} -Fc > /dev/null", pg_env, shell=True)["s"]
        results["zstd_pipe_only"] = wall_rss(f"{dump} -Fc -Z0 | zstd -q -1 -T0 > /dev/null",
                                             pg_env, shell=True)["s"]
        for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=o["Key"])  # moto keeps objects: free the memory
        results["db_gb"] = size / 1e9
        report(results)
        return results
    finally:
        cluster.destroy()


def bench_jobs(gb: float, endpoint: str, s3, jobs: int, repeat: int) -> dict[str, float]:
    """The streamed backup against BACKUP_JOBS=jobs, alternating; medians."""
    cluster = Cluster("18").init().start()
    try:
        size = build(cluster, gb)
        print(f"\n== {size / 1e9:.2f} GB database", flush=True)
        bucket = f"bench-{int(time.time())}"
        s3.create_bucket(Bucket=bucket)
        env = dict(os.environ, **S3Server(endpoint, s3).env(), DATABASE_URL=cluster.url("bench"),
                   ALEMBIC_CONFIG=str(REPO / "alembic.ini"),
                   BACKUP_S3_URI=f"s3://{bucket}/bench", PG_DUMP_BIN=str(TOOLS / "pg_dump"),
                   PG_RESTORE_BIN=str(TOOLS / "pg_restore"), PYTHONPATH=str(REPO))
        times: dict[str, list[float]] = {"1": [], str(jobs): []}
        stored: dict[str, float] = {}
        loads, hwm = [], []
        for i in range(repeat):
            for n in (["1", str(jobs)] if i % 2 == 0 else [str(jobs), "1"]):
                loads.append(os.getloadavg()[0])
                cluster.psql("CHECKPOINT")
                r = wall_rss([sys.executable, "-m", "runner", "backup"], {**env, "BACKUP_JOBS": n})
                times[n].append(r["s"])
                hwm.append(r["hwm"])
                objects = [o for p in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                           for o in p.get("Contents", [])]
                stored[n] = sum(o["Size"] for o in objects if not o["Key"].endswith(".json")) / 1e6
                for o in objects:  # moto keeps objects in memory
                    s3.delete_object(Bucket=bucket, Key=o["Key"])
                print(f"  BACKUP_JOBS={n:<3} {r['s']:6.1f} s   stored {stored[n]:.0f} MB   "
                      f"(load {loads[-1]:.1f})", flush=True)
        result = {"db_gb": size / 1e9, "single": statistics.median(times["1"]),
                  "parallel": statistics.median(times[str(jobs)]), "jobs": jobs,
                  "load": statistics.median(loads), "hwm": max(hwm),
                  "single_mb": stored["1"], "parallel_mb": stored[str(jobs)]}
        print(f"  medians: streamed {result['single']:.1f} s, {jobs} jobs {result['parallel']:.1f} s: "
              f"ratio {result['parallel'] / result['single']:.2f}; load {result['load']:.1f}", flush=True)
        return result
    finally:
        cluster.destroy()


def report(r: dict[str, float]) -> None:
    print(f"  runner backup (stream, zstd)     {r['runner']:7.1f} s   object {r['runner_object_mb']:7.0f} MB",
          flush=True)
    print(f"  (a) pg_dump -Fc file + aws s3 cp {r['a']:7.1f} s   object {r['a_object_mb']:7.0f} MB")
    print(f"  (b) pg_dump -Fc > /dev/null      {r['b']:7.1f} s")
    print(f"      pg_dump -Z0 | zstd > null    {r['zstd_pipe_only']:7.1f} s")
    print(f"  ratio runner / (a) = {r['runner'] / r['a']:.2f}   (target <= 0.40)")
    print(f"  ratio runner / (b) = {r['runner'] / r['b']:.2f}")
    print(f"  runner peak RSS: {r['runner_hwm_mib']:.0f} MiB (python process), "
          f"{r['runner_tree_maxrss_mib']:.0f} MiB (largest of it and its children)  (target <= 150)",
          flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4", help="database sizes in GB, comma separated")
    ap.add_argument("--workdir", default=tempfile.gettempdir(), help="where approach (a) writes its file")
    ap.add_argument("--runner-only", action="store_true", help="time only the runner (quick RSS check)")
    ap.add_argument("--jobs", type=int, default=0, help="compare BACKUP_JOBS=N with the streamed backup")
    ap.add_argument("--repeat", type=int, default=3, help="with --jobs: runs of each side (medians)")
    args = ap.parse_args()
    if args.jobs:
        with moto_process() as endpoint:
            s3 = s3_client(endpoint)
            print(f"cores: {os.cpu_count()}, PostgreSQL 18 ({TOOLS}), S3: moto at {endpoint}")
            rows = [bench_jobs(float(gb), endpoint, s3, args.jobs, args.repeat)
                    for gb in args.sizes.split(",")]
        print("\n| DB size | streamed (BACKUP_JOBS=1) | BACKUP_JOBS=N | ratio | stored, 1 / N | load |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['db_gb']:.2f} GB | {r['single']:.1f} s | {r['jobs']}: {r['parallel']:.1f} s | "
                  f"{r['parallel'] / r['single']:.2f} | {r['single_mb']:.0f} / {r['parallel_mb']:.0f} MB | "
                  f"{r['load']:.1f} |")
        return 0
    global RUNNER_ONLY
    RUNNER_ONLY = args.runner_only
    aws = aws_cli()
    # the S3 server runs in its own process so it does not share a GIL with the bench
    with moto_process() as endpoint:
        s3 = s3_client(endpoint)
        print(f"cores: {os.cpu_count()}, PostgreSQL 18 ({TOOLS}), S3: moto at {endpoint}, aws: {aws}")
        rows = [bench_size(float(gb), aws, endpoint, s3, Path(args.workdir)) for gb in args.sizes.split(",")]
        if RUNNER_ONLY:
            return 0
        print("\n| DB size | runner | (a) file + aws s3 cp | (b) pg_dump -Fc >/dev/null | runner/(a) | "
              "runner/(b) | runner peak RSS |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['db_gb']:.2f} GB | {r['runner']:.1f} s | {r['a']:.1f} s | {r['b']:.1f} s | "
                  f"{r['runner'] / r['a']:.2f} | {r['runner'] / r['b']:.2f} | "
                  f"{r['runner_hwm_mib']:.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
