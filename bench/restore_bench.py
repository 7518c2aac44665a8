"""Bench: the runner's restore from S3 vs `pg_restore -d` from a local file of the same dump, one run.

    .venv/bin/python bench/restore_bench.py --sizes 1.2 --repeat 3 --jobs 1,2,4

For each size (GB on disk) it builds a PostgreSQL 18 database with bench/backup_bench.py's
generator (pgbench tables plus random hex text), backs it up with `python -m runner backup` to a
local S3 server (moto, 127.0.0.1, its own process), downloads and decompresses the same object
to a local file, then times, each into a fresh empty database, in rotating order:

  runner    python -m runner restore --backup latest --from-database bench --yes, RESTORE_JOBS=1
            (one GET -> zstd -d -> pg_restore -1 -f - -> psql, one transaction, digest checked)
  jobs N    the same with RESTORE_JOBS=N, for each N of --jobs above 1 (one GET -> zstd -d ->
            a verified local file -> pg_restore -j N into a new database -> swapped in)
  baseline  pg_restore -d DB FILE       (the plain way: a local file, many transactions)
  single    pg_restore -1 -d DB FILE    (the same, one transaction)
  local jN  pg_restore -j N -d DB FILE  (the floor of a parallel restore: no fetch, no swap)

and prints the medians, the ratios to the baseline (goals: runner <= 1.2; 2 jobs <= 0.6 on 2
cores), the runner's own phases, the CPU the S3 server spent serving it (on a real S3 that is
not on this machine's cores), the machine's load average while it ran, and the runner's peak RSS
(VmHWM of its Python process; wait4's ru_maxrss also covers psql, pg_restore and zstd). Not part
of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.backup_bench import TOOLS, build  # noqa: E402
from bench.measure import wall_rss  # noqa: E402
from tests.pgcluster import PASSWORD, Cluster  # noqa: E402
from tests.s3_fixtures import S3Server, moto_process, s3_client  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def moto_pid(endpoint: str) -> int:
    port = endpoint.rsplit(":", 1)[1].encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"moto_server") for a in argv) and port in argv:
            return int(cmdline.parent.name)
    raise SystemExit("moto_server not found")


def rows(cluster: Cluster, db: str) -> str:
    """A cheap content check: row counts of the bench tables."""
    return cluster.psql("SELECT (SELECT count(*) FROM pgbench_accounts) || '/' || "
                        "(SELECT count(*) FROM noise)", db)


def bench_size(gb: float, endpoint: str, s3: Any, workdir: Path, repeat: int,
               jobs: list[int]) -> dict[str, Any]:
    cluster = Cluster("18").init().start()
    try:
        t0 = time.monotonic()
        size = build(cluster, gb)
        expected = rows(cluster, "bench")
        print(f"\n== {size / 1e9:.2f} GB database (built in {time.monotonic() - t0:.0f}s)", flush=True)
        bucket = f"bench-{int(time.time())}"
        s3.create_bucket(Bucket=bucket)
        aws = S3Server(endpoint, s3).env()

        def runner_env(db: str) -> dict[str, str]:
            return dict(os.environ, **aws, DATABASE_URL=cluster.url(db), PYTHONPATH=str(REPO),
                        ALEMBIC_CONFIG=str(REPO / "alembic.ini"), BACKUP_S3_URI=f"s3://{bucket}/bench",
                        PG_DUMP_BIN=str(TOOLS / "pg_dump"), PG_RESTORE_BIN=str(TOOLS / "pg_restore"),
                        LOG_FORMAT="json")

        wall_rss([sys.executable, "-m", "runner", "backup"], runner_env("bench"))
        key = next(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]
                   if o["Key"].endswith(".zst"))
        file = workdir / "restore-bench.dump"
        with open(file, "wb") as out:  # the same dump, as a local file pg_restore reads directly
            zstd = subprocess.Popen(["zstd", "-q", "-d", "-c"], stdin=subprocess.PIPE, stdout=out)
            assert zstd.stdin is not None
            for chunk in s3.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(1 << 20):
                zstd.stdin.write(chunk)
            zstd.stdin.close()
            assert zstd.wait() == 0
        pg_env = dict(os.environ, PGPASSWORD=PASSWORD, PGHOST="127.0.0.1", PGPORT=str(cluster.port),
                      PGUSER="admin")
        cluster.psql("DROP DATABASE bench")  # free the disk and the cache for the restores
        moto = moto_pid(endpoint)
        times: dict[str, list[float]] = {"runner": [], "baseline": [], "single": [],
                                         **{f"jobs {n}": [] for n in jobs if n > 1},
                                         **{f"local j{n}": [] for n in jobs if n > 1}}
        phases: list[float] = []
        hwm: list[float] = []
        moto_cpu: list[float] = []
        loads: list[float] = []
        order = list(times)
        for i in range(repeat):
            for name in order[i % len(order):] + order[:i % len(order)]:
                target = f"r_{name.replace(' ', '_')}_{i}"
                cluster.psql(f'CREATE DATABASE "{target}"')
                cluster.psql("CHECKPOINT")
                loads.append(os.getloadavg()[0])
                if name == "runner" or name.startswith("jobs"):
                    n = name.split()[-1] if name.startswith("jobs") else "1"
                    before = cpu_seconds(moto)
                    r = wall_rss([sys.executable, "-m", "runner", "restore", "--backup", "latest",
                                  "--from-database", "bench", "--yes"],
                                 {**runner_env(target), "RESTORE_JOBS": n})
                    events = [json.loads(x) for x in r["err"].splitlines() if x.startswith("{")]
                    marks = {e["event"]: e["ts"] for e in events}
                    if name != "runner":
                        print("    " + "  ".join(f"{k}={v[17:23]}" for k, v in marks.items()
                                                if k.startswith(("restore.", "lock."))), flush=True)
                    if name == "runner":
                        moto_cpu.append(cpu_seconds(moto) - before)
                        summary = json.loads([x for x in r["err"].splitlines() if '"summary"' in x][-1])
                        phases.append(summary["durations_s"]["restore"])
                        hwm.append(max(r["hwm"], r["maxrss"]))
                else:
                    flag = {"single": "-1 ", "baseline": ""}.get(name, f"-j {name.removeprefix('local j')} ")
                    r = wall_rss(f"{TOOLS / 'pg_restore'} {flag}-d {target} {file}", pg_env, shell=True)
                times[name].append(r["s"])
                got = rows(cluster, target)
                assert got == expected, f"{name}: {got} rows, expected {expected}"
                print(f"  {name:<9} {r['s']:7.1f} s   (load {loads[-1]:.1f})", flush=True)
                cluster.psql(f'DROP DATABASE "{target}"')
        object_mb = s3.head_object(Bucket=bucket, Key=key)["ContentLength"] / 1e6
        result = {"db_gb": size / 1e9, "object_mb": object_mb,
                  "file_mb": file.stat().st_size / 1e6, "phase": statistics.median(phases),
                  "moto_cpu": statistics.median(moto_cpu), "rss": max(hwm),
                  "load": statistics.median(loads), "sides": list(times),
                  **{k: statistics.median(v) for k, v in times.items()}}
        file.unlink()
        s3.delete_object(Bucket=bucket, Key=key)  # moto keeps objects in memory
        report(result)
        return result
    finally:
        cluster.destroy()


def report(r: dict[str, Any]) -> None:
    print(f"  object {r['object_mb']:.0f} MB (zstd), dump file {r['file_mb']:.0f} MB; medians:")
    print(f"  runner restore (S3 -> zstd -> pg_restore -f - -> psql)  {r['runner']:7.1f} s "
          f"(restore phase {r['phase']:.1f} s; the S3 server spent {r['moto_cpu']:.1f} s CPU serving it)")
    print(f"  pg_restore -d FILE                                    {r['baseline']:7.1f} s")
    print(f"  pg_restore -1 -d FILE                                 {r['single']:7.1f} s")
    print(f"  ratio runner / pg_restore -d    = {r['runner'] / r['baseline']:.2f}   (goal <= 1.2)")
    print(f"  ratio runner / pg_restore -1 -d = {r['runner'] / r['single']:.2f}")
    for side in r["sides"]:
        if side.startswith(("jobs", "local")):
            goal = "   (goal <= 0.6 on 2 cores)" if side == "jobs 2" else ""
            print(f"  {side:<9} {r[side]:7.1f} s   ratio to pg_restore -d = "
                  f"{r[side] / r['baseline']:.2f}{goal}")
    print(f"  load average while it ran (median of the samples before each restore): {r['load']:.1f}")
    print(f"  runner peak RSS: {r['rss']:.0f} MiB (its Python process, or the largest of its children)"
          "  (goal <= 150)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4", help="database sizes in GB, comma separated")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side per size (medians)")
    ap.add_argument("--workdir", default=tempfile.gettempdir(), help="where the local dump file goes")
    ap.add_argument("--jobs", default="1,2,4", help="RESTORE_JOBS values to time (1 is the runner's "
                    "streamed restore, always timed)")
    args = ap.parse_args()
    jobs = sorted({int(n) for n in args.jobs.split(",")} | {1})
    with moto_process() as endpoint:  # its own process: it does not share a GIL with the bench
        s3 = s3_client(endpoint)
        print(f"cores: {os.cpu_count()}, PostgreSQL 18 ({TOOLS}), S3: moto at {endpoint}")
        table = [bench_size(float(gb), endpoint, s3, Path(args.workdir), args.repeat, jobs)
                 for gb in args.sizes.split(",")]
    print("\n| DB size | object | runner restore | pg_restore -d | pg_restore -1 -d | runner / -d | "
          "runner / -1 -d | runner peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in table:
        print(f"| {r['db_gb']:.2f} GB | {r['object_mb']:.0f} MB | {r['runner']:.1f} s | "
              f"{r['baseline']:.1f} s | {r['single']:.1f} s | {r['runner'] / r['baseline']:.2f} | "
              f"{r['runner'] / r['single']:.2f} | {r['rss']:.0f} MiB |")
    print("\n| DB size | RESTORE_JOBS | runner | / pg_restore -d | pg_restore -j N -d FILE | "
          "/ pg_restore -d | load |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in table:
        for n in jobs:
            side, local = ("runner", "baseline") if n == 1 else (f"jobs {n}", f"local j{n}")
            print(f"| {r['db_gb']:.2f} GB | {n} | {r[side]:.1f} s | {r[side] / r['baseline']:.2f} | "
                  f"{r[local]:.1f} s | {r[local] / r['baseline']:.2f} | {r['load']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
