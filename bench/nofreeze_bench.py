"""No freeze: an ALTER TABLE queued behind a long transaction, fixed 4 s lock_timeout vs escalating.

An application reads a table of 100,000 rows by primary key (pgbench, 8 clients, a custom script,
every transaction logged with its latency). One second in, a long transaction reads the table and
keeps its ACCESS SHARE lock; the runner starts `upgrade --to l002` (the lab scenario: `ALTER TABLE
items ADD COLUMN flag boolean`), whose ALTER queues for ACCESS EXCLUSIVE behind it; from then on
the transaction lasts --hold more seconds. Every read of the table queues behind the ALTER until
its lock_timeout fires or the transaction ends. Side by side, alternating, on fresh databases:
LOCK_TIMEOUT_SCHEDULE=fixed (MIGRATION_LOCK_TIMEOUT=4s, the schedule before) and the default
escalating schedule (100 ms doubling to 500 ms). Prints, for the reads of a window of the same
length on both sides (from the ALTER queueing to --hold + 8 s later), the worst, p99 and p99.9
read, the reads slower than 100 ms and their total; the p99 before the long transaction
(baseline); the migration's duration and attempts; medians over the rounds, and the ratios
escalate/fixed (target: worst read under 1 s).
Usage: .venv/bin/python bench/nofreeze_bench.py [--rounds 3] [--hold 6] [--clients 8] [--major 18]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.pgcluster import PASSWORD, SUPERUSER, Cluster  # noqa: E402

LAB = REPO / "tests/scenarios/lab/alembic.ini"
ROWS = 100_000
WINDOW_AFTER = 8.0  # the measured window: from the ALTER queueing to --hold + this many seconds
READ = f"\\set id random(1, {ROWS})\nSELECT note FROM items WHERE id = :id;\n"
SIDES = {"fixed 4 s (before)": {"LOCK_TIMEOUT_SCHEDULE": "fixed", "MIGRATION_LOCK_TIMEOUT": "4s"},
         "escalate 100 ms -> 500 ms": {"LOCK_TIMEOUT_SCHEDULE": "escalate"}}


def one_round(cluster: Cluster, env: dict[str, str], side: dict[str, str], args: argparse.Namespace,
              tmp: Path) -> dict[str, float]:
    """Run the workload, the blocker and the migration once on a fresh database; return figures."""
    name = f"nofreeze_{uuid.uuid4().hex[:8]}"
    cluster.psql(f"CREATE DATABASE {name} TEMPLATE nofreeze_l001")
    script = tmp / "read.sql"
    script.write_text(READ)
    pg_env = dict(env, PGHOST="127.0.0.1", PGPORT=str(cluster.port), PGUSER=SUPERUSER,
                  PGPASSWORD=PASSWORD, PGDATABASE=name)
    bench = subprocess.Popen([str(cluster.bin / "pgbench"), "-n", "-c", str(args.clients), "-j", "2",
                              "-T", str(args.duration), "-f", str(script), "-l",
                              f"--log-prefix={tmp / name}"],
                             env=pg_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    t_block = time.time()
    hold = psycopg2.connect(cluster.url(name), application_name="long-report")
    with hold.cursor() as cur:
        cur.execute("SELECT count(*) FROM items")  # ACCESS SHARE until the transaction ends
    t0 = time.monotonic()
    runner = subprocess.Popen([sys.executable, "-m", "runner", "upgrade", "--to", "l002"],
                              env=dict(env, DATABASE_URL=cluster.url(name), **side), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_until_queued(cluster, name)
    t_queued = time.time()
    time.sleep(args.hold)  # the long transaction goes on for --hold s once the ALTER queues
    hold.commit()
    hold.close()
    err = runner.communicate()[1]
    took, t_end = time.monotonic() - t0, time.time()
    bench_err = bench.communicate()[1]
    if runner.returncode or bench.returncode:
        raise SystemExit(f"runner {runner.returncode}: {err[-2000:]}\npgbench {bench.returncode}: "
                         f"{bench_err[-2000:]}")
    window = (t_queued, t_queued + args.hold + WINDOW_AFTER)  # the same length on both sides
    if t_end > window[1] or window[1] > t_block + args.duration - 1:
        raise SystemExit(f"the migration or the window ended after the workload: raise --duration "
                         f"({args.duration}s)")
    if os.environ.get("NOFREEZE_DEBUG"):
        print(err, file=sys.stderr)
    cluster.psql(f"DROP DATABASE {name} WITH (FORCE)")
    during, before = _latencies(tmp, name, t_block, window)
    return {"worst": max(during), "p99": _p99(during), "p999": _p(during, 999, 1000),
            "slow": sum(x > 0.1 for x in during), "stalled": sum(x for x in during if x > 0.1),
            "reads": len(during), "baseline_p99": _p99(before), "migration": took,
            "attempts": err.count("migrate.retry") + 1}


def _wait_until_queued(cluster: Cluster, name: str) -> None:
    """Return once the runner's migration session waits for a lock (its start-up varies)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
                        "'migration-runner/migrate/%' AND wait_event_type = 'Lock'", name) != "0":
            return
        time.sleep(0.02)
    raise SystemExit("the runner's ALTER never queued behind the long transaction")


def _latencies(tmp: Path, name: str, t_block: float,
               window: tuple[float, float]) -> tuple[list[float], list[float]]:
    """Latencies (s) from pgbench's per-transaction logs: of the reads that ended in the window,
    and of those before the blocker started (the baseline)."""
    during, before = [], []
    for log in tmp.glob(f"{name}.*"):
        for line in log.read_text().splitlines():
            # client_id transaction_no time(us) script_no time_epoch(s) time_us
            _, _, latency, _, epoch, micros = line.split()[:6]
            seconds, ended = int(latency) / 1e6, int(epoch) + int(micros) / 1e6
            if ended < t_block:
                before.append(seconds)
            elif window[0] <= ended <= window[1]:
                during.append(seconds)
        log.unlink()
    return during, before


def _p99(values: list[float]) -> float:
    return _p(values, 99, 100)


def _p(values: list[float], k: int, n: int) -> float:
    return statistics.quantiles(values, n=n)[k - 1] if len(values) > 1 else float("nan")


def _prepare(cluster: Cluster, env: dict[str, str]) -> None:
    """A template database at l001 with ROWS rows in the table."""
    cluster.psql("CREATE DATABASE nofreeze_l001")
    done = subprocess.run([sys.executable, "-m", "runner", "upgrade", "--to", "l001"], cwd=REPO,
                          env=dict(env, DATABASE_URL=cluster.url("nofreeze_l001")),
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"upgrade --to l001 failed ({done.returncode}): {done.stderr[-2000:]}")
    cluster.psql(f"INSERT INTO items SELECT g, 'n' || g FROM generate_series(101, {ROWS}) g",
                 "nofreeze_l001")
    cluster.psql("VACUUM ANALYZE items", "nofreeze_l001")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hold", type=float, default=6.0, help="seconds the long transaction goes on "
                    "once the ALTER queued behind it")
    ap.add_argument("--duration", type=int, default=30, help="seconds of workload per round")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--major", default="18")
    args = ap.parse_args()
    cluster = Cluster(args.major).init().start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "PG"))}
    env.update(BACKUP_MODE="off", PYTHONPATH=str(REPO), ALEMBIC_CONFIG=str(LAB), LOG_FORMAT="text")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    try:
        _prepare(cluster, env)
        results: dict[str, list[dict[str, float]]] = {label: [] for label in SIDES}
        with tempfile.TemporaryDirectory() as tmp:
            for n in range(args.rounds):
                order = list(SIDES) if n % 2 == 0 else list(reversed(SIDES))
                for label in order:
                    results[label].append(one_round(cluster, env, SIDES[label], args, Path(tmp)))
        _print(args, results)
    finally:
        cluster.destroy()


def _print(args: argparse.Namespace, results: dict[str, list[dict[str, float]]]) -> None:
    med = {label: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
           for label, runs in results.items()}
    print(f"PostgreSQL {args.major}, {os.cpu_count()} CPUs; pgbench: {args.clients} clients reading "
          f"{ROWS:,} rows by primary key; a transaction keeps ACCESS SHARE {args.hold:g} s after the "
          f"runner's ALTER TABLE queued behind it; {args.rounds} rounds alternating, medians")
    print(f"reads in the {args.hold + WINDOW_AFTER:g} s from the ALTER queueing (p99, p99.9, reads over "
          "100 ms and their total, in client-seconds); baseline: p99 before the long transaction")
    print(f"{'schedule':<27}{'worst':>8}{'p99':>9}{'p99.9':>9}{'>100ms':>7}{'stalled':>9}{'reads':>8}"
          f"{'baseline':>10}{'migration':>10}{'attempts':>9}")
    for label, m in med.items():
        print(f"{label:<27}{m['worst']:>7.3f}s{m['p99'] * 1000:>7.1f}ms{m['p999'] * 1000:>7.0f}ms"
              f"{m['slow']:>7.0f}{m['stalled']:>8.1f}s{m['reads']:>8.0f}{m['baseline_p99'] * 1000:>8.1f}ms"
              f"{m['migration']:>9.2f}s{m['attempts']:>9.0f}")
    old, new = med.values()
    print(f"ratio escalate/fixed: worst read {new['worst'] / old['worst']:.2f}, p99 "
          f"{new['p99'] / old['p99']:.2f}, p99.9 {new['p999'] / old['p999']:.2f}, stalled "
          f"{new['stalled'] / old['stalled']:.2f}, migration time {new['migration'] / old['migration']:.2f}; "
          f"target: worst read < 1 s ({'met' if new['worst'] < 1 else 'NOT met'})")
    for label, runs in results.items():
        print(f"  {label}: worst reads " + ", ".join(f"{r['worst']:.3f}s" for r in runs))


if __name__ == "__main__":
    main()
