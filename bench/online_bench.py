"""Online schema changes under an application workload: the online operations against plain Alembic.

PostgreSQL 18; a table `items` of --rows rows (2,000,000) and its child `orders` (a quarter as
many rows, orders.item_id references items). An application of --clients processes (8), each a
psycopg2 connection pacing itself to --rate queries/s, runs primary-key reads (60 %), updates
(25 %) and inserts of items (10 %) and orders (5 %) from before the chain to after it. The chain
(bench/scenarios/online_chain): c001 a NOT NULL column with a backfilled value, c002 an index,
c003 a foreign key, c004 a unique constraint, c005 a rename of items.note to description; in the
online chain c005 is the expand and c006 (runner_phase = "post-deploy") the contract; the plain
chain uses op.add_column / create_index / create_foreign_key / create_unique_constraint /
alter_column(new_column_name=...).

Each side, on a fresh database copied from one template: --baseline seconds of workload alone,
then `python -m runner upgrade --phase pre-deploy`, the rollout (the clients switch from the old
code, which reads and writes `note`, to the new code, which uses `description`, one by one over
--rollout seconds), `upgrade --phase post-deploy`, --tail seconds more. Reported per side: failed
application queries, the longest, p99 and p99.9 against the baseline's, per phase; the duration of
each revision; each backfill's rows/s at 10 % and 90 % of the way (from the runner's own progress
lines: the rows/s over the 10 % of the way centred there). Then the kill -9 case (online chain,
no workload, two more fresh databases): `upgrade --to c001` uninterrupted, and killed with SIGKILL
mid-backfill then rerun; it reports the rows the rerun did again (pg_stat_user_tables.n_tup_upd
counts rolled-back updates too) against the batch size, and compares the two tables' checksums.
Load averages are printed with the figures: the machine may be shared.
Usage: .venv/bin/python bench/online_bench.py [--rows 2000000] [--clients 8] [--rate 250]
       [--baseline 10] [--rollout 4] [--tail 3] [--sides online,plain] [--no-kill] [--durable]
"""

from __future__ import annotations

import argparse
import array
import bisect
import contextlib
import dataclasses
import datetime
import itertools
import json
import multiprocessing
import os
import pickle
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.measure import wall_rss  # noqa: E402
from tests.pgcluster import Cluster  # noqa: E402

CHAIN = REPO / "bench/scenarios/online_chain"
SIDES = {"online": CHAIN / "online/alembic.ini", "plain": CHAIN / "plain/alembic.ini"}
KINDS = ("read", "update", "insert item", "insert order")
MIX = (0.60, 0.25, 0.10, 0.05)  # shares of KINDS
OLD, NEW = "note", "description"  # the column the old and the new application code use
WARMUP = 2.0  # seconds of workload before the baseline window
KILL_AT = 0.4  # the kill -9 case kills the runner once the backfill is this far


# -- the application -------------------------------------------------------------------------------

def client(n: int, url: str, rows: int, rate: float, code: Any, stop: Any, out: str) -> None:
    """One application connection: a query at a time (autocommit), paced to rate per second,
    with the old or the new code's column name (code[n]); every query's end time, latency, kind
    and outcome go to the file out when stop is set."""
    rng = random.Random(n)
    ends, lats, kinds, failed = array.array("d"), array.array("d"), array.array("b"), array.array("b")
    errors: Counter[tuple[int, str, str]] = Counter()
    conn = _connect(url, n)
    next_at = time.monotonic()
    while not stop.is_set():
        col = NEW if code[n] else OLD
        kind = rng.choices(range(len(KINDS)), MIX)[0]
        item = rng.randint(1, rows)
        statement, params = _query(kind, col, item, rng)
        bad = 0
        t0 = time.perf_counter()
        try:
            if conn is None:
                conn = _connect(url, n)
            with conn.cursor() as cur:
                cur.execute(statement, params)
                if kind == 0:
                    cur.fetchall()
        except psycopg2.Error as exc:
            bad = 1
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            errors[(kind, exc.pgcode or "connection", first[:200])] += 1
            if conn is not None and conn.closed:
                conn = None
        t1 = time.perf_counter()
        ends.append(time.time())
        lats.append(t1 - t0)
        kinds.append(kind)
        failed.append(bad)
        if rate:
            next_at = max(next_at + 1 / rate, time.monotonic() - 1 / rate)  # no burst after a stall
            time.sleep(max(0.0, next_at - time.monotonic()))
    with open(out, "wb") as f:
        pickle.dump((ends, lats, kinds, failed, dict(errors)), f)


def _connect(url: str, n: int) -> Any:
    conn = psycopg2.connect(url, application_name=f"bench-app/{n}")
    conn.autocommit = True
    return conn


def _query(kind: int, col: str, item: int, rng: random.Random) -> tuple[str, tuple[Any, ...]]:
    if kind == 0:
        return f"SELECT id, qty, {col} FROM items WHERE id = %s", (item,)
    if kind == 1:
        return f"UPDATE items SET qty = qty + 1, {col} = %s WHERE id = %s", (f"updated {item}", item)
    if kind == 2:
        return f"INSERT INTO items (qty, {col}) VALUES (%s, %s)", (rng.randint(0, 999), "new item")
    gift = rng.randint(1, item) if rng.random() < 0.5 else None
    return ("INSERT INTO orders (item_id, gift_item_id, amount) VALUES (%s, %s, %s)",
            (item, gift, rng.randint(1, 500)))


class Application:
    """--clients client processes; rollout() switches them to the new code one by one."""

    def __init__(self, url: str, args: argparse.Namespace, tmp: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.code = ctx.Array("b", args.clients, lock=False)
        self.stop = ctx.Event()
        self.files = [str(tmp / f"client{n}.pickle") for n in range(args.clients)]
        self.procs = [ctx.Process(target=client, daemon=True,
                                  args=(n, url, args.rows, args.rate, self.code, self.stop, f))
                      for n, f in enumerate(self.files)]
        for p in self.procs:
            p.start()

    def rollout(self, seconds: float) -> None:
        for n in range(len(self.procs)):
            time.sleep(seconds / len(self.procs))
            self.code[n] = 1

    def finish(self) -> Samples:
        self.stop.set()
        for p in self.procs:
            p.join(60)
        out = Samples()
        for f in self.files:
            with open(f, "rb") as fh:
                ends, lats, kinds, failed, errors = pickle.load(fh)
            out.rows.extend(zip(ends, lats, kinds, failed, strict=True))
            out.errors.update(errors)
        out.rows.sort()
        return out


@dataclasses.dataclass
class Samples:
    # each query: end (epoch s), latency (s), kind (KINDS), failed (0/1)
    rows: list[tuple[float, float, int, int]] = dataclasses.field(default_factory=list)
    errors: Counter[tuple[int, str, str]] = dataclasses.field(default_factory=Counter)

    def between(self, t0: float, t1: float) -> list[tuple[float, float, int, int]]:
        """The queries that ended in [t0, t1)."""
        lo = bisect.bisect_left(self.rows, (t0,))
        hi = bisect.bisect_left(self.rows, (t1,))
        return self.rows[lo:hi]


def figures(rows: list[tuple[float, float, int, int]]) -> dict[str, float]:
    lats = [r[1] for r in rows]
    return {"queries": len(rows), "failed": sum(r[3] for r in rows),
            "longest": max(lats, default=float("nan")), "p99": _p(lats, 99, 100),
            "p999": _p(lats, 999, 1000)}


def _p(values: list[float], k: int, n: int) -> float:
    return statistics.quantiles(values, n=n)[k - 1] if len(values) > 1 else float("nan")


# -- the runner ------------------------------------------------------------------------------------

def events(stderr: str) -> list[dict[str, Any]]:
    """The runner's JSON log lines, each with `t` (its timestamp, epoch seconds)."""
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            e = json.loads(line)
            e["t"] = datetime.datetime.strptime(e["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=datetime.UTC).timestamp()
            out.append(e)
    return out


def revision_times(evs: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per revision: from its migrate.step line to the next one (or the summary)."""
    marks = [(e["t"], e.get("revision")) for e in evs if e["event"] in ("migrate.step", "summary")]
    return {rev: round(t1 - t0, 2) for (t0, rev), (t1, _) in itertools.pairwise(marks) if rev}


def backfill_rates(evs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per backfill: rows, seconds, overall rows/s, and rows/s over the 10 % of the way centred
    at 10 % and at 90 %, interpolated from its progress lines (rows done at each line's time)."""
    out: dict[str, dict[str, float]] = {}
    for done in (e for e in evs if e["event"] == "backfill.done"):
        name = done["name"]
        start = next(e for e in evs if e["event"] in ("backfill.start", "backfill.resume")
                     and e.get("name") == name)
        points = [(start["t"], start.get("rows_done", 0))]
        points += [(e["t"], e["rows_done"]) for e in evs
                   if e["event"] == "backfill.progress" and e["name"] == name]
        points.append((done["t"], done["rows_done"]))
        total = done["rows_done"]
        rates = {f"at{int(f * 100)}": _rate(points, total, f - 0.05, f + 0.05) for f in (0.1, 0.9)}
        out[name] = {"rows": total, "seconds": done["seconds"],
                     "overall": total / max(done["seconds"], 1e-6), **rates}
    return out


def _rate(points: list[tuple[float, int]], total: int, lo: float, hi: float) -> float:
    """Rows/s between the moments rows_done passed lo*total and hi*total (linear in between)."""
    def when(rows: float) -> float:
        for (t0, r0), (t1, r1) in itertools.pairwise(points):
            if r1 >= rows:
                return t0 + (t1 - t0) * (rows - r0) / max(r1 - r0, 1)
        return points[-1][0]
    t_lo, t_hi = when(lo * total), when(hi * total)
    return (hi - lo) * total / (t_hi - t_lo) if t_hi > t_lo else float("nan")


def runner_env(base: dict[str, str], url: str, side: str) -> dict[str, str]:
    return dict(base, DATABASE_URL=url, ALEMBIC_CONFIG=str(SIDES[side]))


class BackfillCpu(threading.Thread):
    """The CPU time of the backend running a backfill against its rows done, 4 times a second
    (/proc/PID/stat of the migration session's server process): the CPU per row, unlike rows/s,
    does not move with the load other processes put on a shared machine."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.points: dict[str, list[tuple[int, float]]] = {}  # name -> (rows done, CPU seconds)
        self.done = threading.Event()

    def run(self) -> None:
        conn = psycopg2.connect(self.url, application_name="bench-monitor")
        conn.autocommit = True
        tick = os.sysconf("SC_CLK_TCK")
        with contextlib.closing(conn), conn.cursor() as cur:
            while not self.done.wait(0.25):
                with contextlib.suppress(psycopg2.Error, OSError, ValueError, IndexError):
                    cur.execute("SELECT (SELECT pid FROM pg_stat_activity WHERE application_name "
                                "LIKE 'migration-runner/migrate/%' ORDER BY backend_start LIMIT 1), "
                                "name, rows_done FROM runner_backfills WHERE state = 'running'")
                    for pid, name, rows in cur.fetchall():
                        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
                        self.points.setdefault(name, []).append((rows, cpu))

    def per_row(self, name: str, total: int, lo: float, hi: float) -> float:
        """CPU microseconds per row between lo*total and hi*total rows done."""
        points = self.points.get(name, [])

        def cpu_at(rows: float) -> float | None:
            for (r0, c0), (r1, c1) in itertools.pairwise(points):
                if r0 <= rows <= r1 and c1 >= c0:
                    return c0 + (c1 - c0) * (rows - r0) / max(r1 - r0, 1)
            return None
        a, b = cpu_at(lo * total), cpu_at(hi * total)
        return float("nan") if a is None or b is None else (b - a) / ((hi - lo) * total) * 1e6


# -- one side --------------------------------------------------------------------------------------

class LoadSampler(threading.Thread):
    """The 1-minute load average, once a second."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.values: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.values.append(os.getloadavg()[0])


def one_side(cluster: Cluster, env: dict[str, str], side: str, args: argparse.Namespace,
             tmp: Path) -> dict[str, Any]:
    """The workload, the pre-deploy run, the rollout, the post-deploy run, on a fresh database."""
    name = fresh_database(cluster, side)
    url = cluster.url(name)
    load = LoadSampler()
    load.start()
    app = Application(url, args, tmp)
    try:
        _wait_for_clients(cluster, name, args.clients)
        time.sleep(WARMUP)
        t_base = time.time()
        time.sleep(args.baseline)
        t_pre = time.time()
        cpu = BackfillCpu(url)
        cpu.start()
        pre = wall_rss([sys.executable, "-m", "runner", "upgrade", "--phase", "pre-deploy"],
                       runner_env(env, url, side))
        t_rollout = time.time()
        cpu.done.set()
        app.rollout(args.rollout)
        t_post = time.time()
        post = wall_rss([sys.executable, "-m", "runner", "upgrade", "--phase", "post-deploy"],
                        runner_env(env, url, side))
        t_tail = time.time()
        time.sleep(args.tail)
        t_end = time.time()
    finally:
        samples = app.finish()
        load.done.set()
    cluster.psql(f"DROP DATABASE {name} WITH (FORCE)")
    pre_ev, post_ev = events(pre["err"]), events(post["err"])
    backfills = backfill_rates(pre_ev)
    for name, b in backfills.items():
        b.update({f"cpu{int(f * 100)}": cpu.per_row(name, int(b["rows"]), f - 0.05, f + 0.05)
                  for f in (0.1, 0.9)})
    if os.environ.get("ONLINE_BENCH_DEBUG"):
        print(pre["err"], post["err"], file=sys.stderr)
    windows = {"baseline": (t_base, t_pre), "chain": (t_pre, t_end), "pre-deploy": (t_pre, t_rollout),
               "rollout": (t_rollout, t_post), "post-deploy": (t_post, t_tail),
               "after": (t_tail, t_end)}
    return {"figures": {w: figures(samples.between(*span)) for w, span in windows.items()},
            "slowest": slowest(samples.between(t_pre, t_end), pre_ev + post_ev, t_pre),
            "errors": {k: v for k, v in samples.errors.items()},
            "baseline_errors": figures(samples.between(*windows["baseline"]))["failed"],
            "pre_s": pre["s"], "post_s": post["s"], "revisions": {**revision_times(pre_ev),
                                                                   **revision_times(post_ev)},
            "backfills": backfills, "load": load.values,
            "retries": Counter(e["event"] for e in pre_ev + post_ev if e["event"] in (
                "online.retry", "migrate.retry", "autovacuum.cancelled")),
            "qps_baseline": len(samples.between(t_base, t_pre)) / args.baseline}


def slowest(rows: list[tuple[float, float, int, int]], evs: list[dict[str, Any]], t0: float,
            n: int = 3) -> list[str]:
    """The n longest queries: latency, kind, when they started (s after t0) and the runner's last
    log line before that (what it was doing)."""
    out = []
    for end, lat, kind, bad in sorted(rows, key=lambda r: -r[1])[:n]:
        start = end - lat
        last = next((e for e in reversed(evs) if e["t"] <= start), None)
        doing = f"{last['event']}: {last['msg'][:120]}" if last else "before the runner's first line"
        out.append(f"{lat * 1000:.0f} ms {KINDS[kind]}{' (failed)' if bad else ''} at "
                   f"+{start - t0:.1f}s, after {doing}")
    return out


def _wait_for_clients(cluster: Cluster, name: str, clients: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
                        "'bench-app/%' AND state IS NOT NULL", name) == str(clients):
            return
        time.sleep(0.1)
    raise SystemExit("the application's clients did not connect")


def fresh_database(cluster: Cluster, label: str) -> str:
    name = f"online_{label}_{uuid.uuid4().hex[:6]}"
    cluster.psql(f"CREATE DATABASE {name} TEMPLATE online_template STRATEGY FILE_COPY")
    return name


def prepare(cluster: Cluster, env: dict[str, str], rows: int) -> None:
    """The template database: the tables at c000, filled, vacuumed and analyzed."""
    cluster.psql("CREATE DATABASE online_template")
    wall_rss([sys.executable, "-m", "runner", "upgrade", "--to", "c000"],
             runner_env(env, cluster.url("online_template"), "online"))
    cluster.psql(f"""
        INSERT INTO items SELECT g, g % 1000, md5(g::text) FROM generate_series(1, {rows}) g;
        SELECT setval('items_id_seq', {rows});
        INSERT INTO orders SELECT g, (g * 7) % {rows} + 1, CASE WHEN g % 3 = 0 THEN g % {rows} + 1 END,
                                  g % 500 FROM generate_series(1, {rows // 4}) g;
        SELECT setval('orders_id_seq', {rows // 4});""", "online_template")
    cluster.psql("VACUUM ANALYZE", "online_template")


# -- kill -9 mid-backfill ------------------------------------------------------------------------

def kill_case(cluster: Cluster, env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """c001 uninterrupted, and killed with SIGKILL mid-backfill then rerun; no workload (the
    tables must come out identical)."""
    whole, killed = fresh_database(cluster, "whole"), fresh_database(cluster, "killed")
    cmd = [sys.executable, "-m", "runner", "upgrade", "--to", "c001"]
    first = wall_rss(cmd, runner_env(env, cluster.url(whole), "online"))
    proc = subprocess.Popen(cmd, env=runner_env(env, cluster.url(killed), "online"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    at_kill = _wait_for_backfill(cluster, killed, args.rows * KILL_AT, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    after_kill = _backfill_state(cluster, killed)
    rerun = wall_rss(cmd, runner_env(env, cluster.url(killed), "online"))
    resumed = next((e for e in events(rerun["err"]) if e["event"] == "backfill.resume"), None)
    out = {"whole_s": first["s"], "rerun_s": rerun["s"], "at_kill": at_kill, "after_kill": after_kill,
           "resumed_from": resumed and resumed.get("rows_done"),
           "updates": {db: _updates(cluster, db) for db in (whole, killed)},
           "same": _checksum(cluster, whole) == _checksum(cluster, killed),
           "checksum": _checksum(cluster, killed)}
    for db in (whole, killed):
        cluster.psql(f"DROP DATABASE {db} WITH (FORCE)")
    return out


def _wait_for_backfill(cluster: Cluster, name: str, rows: float, proc: subprocess.Popen[bytes]
                       ) -> dict[str, Any]:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        state = _backfill_state(cluster, name)
        if state and state["rows_done"] >= rows:
            return state
        time.sleep(0.05)
    raise SystemExit("the backfill did not get far enough to be killed (or the runner ended first)")


def _backfill_state(cluster: Cluster, name: str) -> dict[str, Any] | None:
    out = cluster.psql("SELECT rows_done || ' ' || batch_size || ' ' || state FROM runner_backfills",
                       name, check=False)
    if not out or " " not in out:
        return None
    done, size, state = out.split()
    return {"rows_done": int(done), "batch_size": int(size), "state": state}


def _updates(cluster: Cluster, name: str) -> int:
    """Row updates of items, committed or rolled back (pg_stat_user_tables.n_tup_upd); read until
    two reads agree (each backend reports its counts when it exits)."""
    last = None
    for _ in range(20):
        n = int(cluster.psql("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'items'", name))
        if n == last:
            return n
        last = n
        time.sleep(0.5)
    return int(last or 0)


def _checksum(cluster: Cluster, name: str) -> str:
    """items' columns (name, type, NOT NULL), constraints and rows, as one digest."""
    return cluster.psql("""
        SELECT md5(
          (SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod) || ' ' || attnotnull,
                             ',' ORDER BY attnum)
           FROM pg_attribute WHERE attrelid = 'items'::regclass AND attnum > 0 AND NOT attisdropped)
          || (SELECT coalesce(string_agg(conname || pg_get_constraintdef(oid), ',' ORDER BY conname), '')
              FROM pg_constraint WHERE conrelid = 'items'::regclass)
          || (SELECT string_agg(h, '' ORDER BY b) FROM (
                SELECT id / 100000 AS b, md5(string_agg(t::text, '|' ORDER BY id)) AS h
                FROM items t GROUP BY 1) x))""", name)


# -- report ----------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rate", type=float, default=250, help="queries/s per client (0: unpaced)")
    ap.add_argument("--baseline", type=float, default=10)
    ap.add_argument("--rollout", type=float, default=4)
    ap.add_argument("--tail", type=float, default=3)
    ap.add_argument("--sides", default="online,plain")
    ap.add_argument("--no-kill", action="store_true", help="skip the kill -9 case")
    ap.add_argument("--durable", action="store_true", help="fsync, synchronous_commit and "
                    "full_page_writes on (the test clusters turn them off)")
    args = ap.parse_args()
    cluster = Cluster("18").init()
    if args.durable:
        with open(cluster.data / "postgresql.conf", "a") as conf:
            conf.write("\nfsync = on\nsynchronous_commit = on\nfull_page_writes = on\n")
    cluster.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "PG"))}
    env.update(BACKUP_MODE="off", PYTHONPATH=str(REPO), LOG_FORMAT="json",
               ONLINE_BACKFILL_PROGRESS_INTERVAL="1s")  # finer points for the 10 % / 90 % rates
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    load0 = os.getloadavg()
    try:
        t0 = time.monotonic()
        prepare(cluster, env, args.rows)
        print(f"template: {args.rows:,} items, {args.rows // 4:,} orders in {time.monotonic() - t0:.0f}s",
              file=sys.stderr)
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            for side in args.sides.split(","):
                results[side] = one_side(cluster, env, side, args, Path(tmp))
                print(f"{side}: done", file=sys.stderr)
        kill = None if args.no_kill else kill_case(cluster, env, args)
    finally:
        cluster.destroy()
    report(args, load0, results, kill)


def report(args: argparse.Namespace, load0: tuple[float, float, float], results: dict[str, Any],
           kill: dict[str, Any] | None) -> None:
    print(f"PostgreSQL 18, {os.cpu_count()} CPUs, {'durable' if args.durable else 'fsync off'}; "
          f"items {args.rows:,} rows, orders {args.rows // 4:,}; {args.clients} clients at "
          f"{args.rate:g} queries/s each (reads 60 %, updates 25 %, inserts 10 % + 5 %); baseline "
          f"{args.baseline:g} s, rollout {args.rollout:g} s; load average at start "
          + "/".join(f"{x:.1f}" for x in load0))
    for side, r in results.items():
        f = r["figures"]
        base = f["baseline"]
        print(f"\n== {side}: pre-deploy {r['pre_s']:.1f} s, post-deploy {r['post_s']:.1f} s; load "
              f"average during it {statistics.mean(r['load'] or [0]):.1f} (max {max(r['load'] or [0]):.1f}); "
              f"baseline {r['qps_baseline']:.0f} queries/s")
        print(f"{'window':<13}{'queries':>9}{'failed':>8}{'longest':>10}{'p99':>10}{'p99.9':>10}"
              f"{'p99/base':>10}")
        for w in ("baseline", "pre-deploy", "rollout", "post-deploy", "after", "chain"):
            x = f[w]
            print(f"{w:<13}{x['queries']:>9}{x['failed']:>8}{x['longest'] * 1000:>8.0f}ms"
                  f"{x['p99'] * 1000:>8.1f}ms{x['p999'] * 1000:>8.1f}ms{x['p99'] / base['p99']:>10.2f}")
        print("revisions: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["revisions"].items())
              + "; " + (", ".join(f"{k} x{v}" for k, v in sorted(r["retries"].items()))
                        or "no lock_timeout retries"))
        for name, b in r["backfills"].items():
            print(f"backfill {name}: {b['rows']:,} rows in {b['seconds']:.1f}s ({b['overall']:,.0f} rows/s); "
                  f"at 10 %: {b['at10']:,.0f} rows/s, at 90 %: {b['at90']:,.0f} rows/s "
                  f"(90 %/10 % = {b['at90'] / b['at10']:.2f}); its server process's CPU per row at "
                  f"10 %: {b['cpu10']:.1f} us, at 90 %: {b['cpu90']:.1f} us")
        if "c001" in r["revisions"] and not r["backfills"]:
            secs = r["revisions"]["c001"]
            print(f"c001 (one ALTER TABLE, the table rewritten): {args.rows / secs:,.0f} rows/s overall; "
                  "no 10 %/90 % figures (one statement)")
        for line in r["slowest"]:
            print(f"  slow: {line}")
        for (kind, code, msg), n in sorted(r["errors"].items(), key=lambda kv: -kv[1]):
            print(f"  failed: {n} x {KINDS[kind]}: {code} {msg}")
    if {"online", "plain"} <= results.keys():
        on, pl = results["online"]["figures"]["chain"], results["plain"]["figures"]["chain"]
        print(f"\nratio online/plain over the chain: failed {on['failed']}/{pl['failed']}, longest "
              f"{on['longest'] / pl['longest']:.3f}, p99 {on['p99'] / pl['p99']:.2f}, p99.9 "
              f"{on['p999'] / pl['p999']:.2f}; migration time (pre + post) "
              f"{_chain_s(results['online']) / _chain_s(results['plain']):.2f}")
    if "online" in results:
        r = results["online"]
        on = r["figures"]["chain"]
        print("targets (online):")
        print(f"  0 failed application queries: {on['failed']} ({_met(on['failed'] == 0)})")
        print(f"  longest application query < 1 s: {on['longest']:.3f} s ({_met(on['longest'] < 1)})")
        for name, b in r["backfills"].items():
            ok = min(b["at10"], b["at90"]) >= 20_000 and abs(b["at90"] / b["at10"] - 1) <= 0.2
            print(f"  backfill {name} >= 20,000 rows/s at 10 % and 90 %, within 20 %: "
                  f"{b['at10']:,.0f} / {b['at90']:,.0f} ({_met(ok)})")
    if kill:
        k = kill
        rows = args.rows
        redone = k["updates"]
        extra = {db: n - rows for db, n in redone.items()}
        whole, killed = extra.values()
        size = k["after_kill"]["batch_size"]
        print(f"\nkill -9 during c001's backfill at {k['after_kill']['rows_done']:,} of {rows:,} rows "
              f"(last batch size {size:,}); the rerun resumed from {k['resumed_from']:,} rows done")
        print(f"  row updates beyond one per row: uninterrupted {whole}, killed + rerun {killed} "
              f"(= rows redone; at most one batch: {_met(0 <= killed <= 2 * size)})")
        print(f"  same final table (columns, constraints, rows): {_met(k['same'])} ({k['checksum']}); "
              f"uninterrupted {k['whole_s']:.1f} s, rerun {k['rerun_s']:.1f} s")


def _chain_s(r: dict[str, Any]) -> float:
    return r["pre_s"] + r["post_s"]


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
