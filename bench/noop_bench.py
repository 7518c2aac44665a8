"""No-op runs side by side: the Python floor, the runner's fast path, its full path, plain Alembic.

On a database already at head, alternating, same run:
  floor            python -c: import psycopg2, connect, SELECT version_num FROM alembic_version
  upgrade          python -m runner upgrade (the fast path: facts recorded for these scripts)
  wait             python -m runner wait --until-head (the fast path)
  upgrade, full    python -m runner upgrade with FAST_PATH=off (runs env.py, like before)
  alembic          alembic upgrade head
Prints medians of wall and CPU time and the ratios against the floor and against Alembic.
Targets: the fast no-op upgrade and wait <= 2x the floor and <= 0.4x plain Alembic.
Usage: .venv/bin/python bench/noop_bench.py [--runs 15] [--major 18]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.measure import wall_cpu  # noqa: E402
from tests.pgcluster import Cluster  # noqa: E402

FLOOR = ("import os, psycopg2\n"
         "c = psycopg2.connect(os.environ['DATABASE_URL']); c.autocommit = True\n"
         "cur = c.cursor(); cur.execute('SELECT version_num FROM alembic_version'); cur.fetchall()\n"
         "c.close()\n")
TARGET_FLOOR, TARGET_ALEMBIC = 2.0, 0.4


def scripts_with_facts(work: Path, env: dict[str, str], url: str) -> Path:
    """Copy the sample migrations, record their facts (as the image does) and an alembic.ini for
    plain Alembic; return the runner's alembic.ini."""
    shutil.copy(REPO / "alembic.ini", work / "alembic.ini")
    shutil.copytree(REPO / "migrations", work / "migrations",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "runner.fastpath", "record", "--strict"], env=env,
                   cwd=work, check=True)
    text = (work / "alembic.ini").read_text().replace("[alembic]\n", "[alembic]\nsqlalchemy.url = "
                                                      + url.replace("postgresql://", "postgresql+psycopg2://")
                                                      .replace("%", "%%") + "\n", 1)
    (work / "alembic-plain.ini").write_text(text)
    return work / "alembic.ini"


def check_fast_path(runner: list[str], env: dict[str, str], cwd: Path) -> None:
    """Refuse to time a 'fast' run that is not one (an import trace shows SQLAlchemy)."""
    proc = subprocess.run(runner, env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, cwd=cwd,
                          capture_output=True, text=True, check=True)
    if "sqlalchemy" in proc.stderr or "fastpath.skipped" in proc.stderr:
        sys.exit(f"the fast path was not taken by {' '.join(runner[2:])}: {proc.stderr[-500:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--major", default="18")
    args = ap.parse_args()
    cluster = Cluster(args.major).init().start()
    work = Path(tempfile.mkdtemp(prefix="noop-bench-"))
    try:
        cluster.psql("CREATE DATABASE bench")
        url = cluster.url("bench")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "AWS_", "BACKUP_"))}
        env.update(DATABASE_URL=url, BACKUP_MODE="off", PYTHONPATH=str(REPO))
        # every side runs from cached bytecode, as in the image; a shell that sets this would
        # time the compiler instead (about 1.4 s of every full run)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["ALEMBIC_CONFIG"] = str(scripts_with_facts(work, env, url))
        py = sys.executable
        sides = {
            "floor (psycopg2)": [py, "-c", FLOOR],
            "upgrade (fast path)": [py, "-m", "runner", "upgrade"],
            "wait --until-head (fast)": [py, "-m", "runner", "wait", "--until-head"],
            "upgrade, FAST_PATH=off": [py, "-m", "runner", "upgrade"],
            "alembic upgrade head": [str(Path(py).with_name("alembic")), "-c",
                                     str(work / "alembic-plain.ini"), "upgrade", "head"],
        }
        envs = {name: env for name in sides}
        envs["upgrade, FAST_PATH=off"] = {**env, "FAST_PATH": "off"}
        subprocess.run(sides["upgrade, FAST_PATH=off"], env=env, cwd=work, check=True,
                       capture_output=True)  # to head
        for name in ("upgrade (fast path)", "wait --until-head (fast)"):
            check_fast_path(sides[name], env, work)
        for name, cmd in sides.items():  # warm up: page cache, bytecode
            wall_cpu(cmd, envs[name], work)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        for _ in range(args.runs):
            for name, cmd in sides.items():
                results[name].append(wall_cpu(cmd, envs[name], work))
        report(results, args)
    finally:
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict[str, list[tuple[float, float]]], args: argparse.Namespace) -> None:
    wall = {n: statistics.median(r[0] for r in rs) for n, rs in results.items()}
    cpu = {n: statistics.median(r[1] for r in rs) for n, rs in results.items()}
    floor, alembic = "floor (psycopg2)", "alembic upgrade head"
    print(f"PostgreSQL {args.major}, database at head, {args.runs} alternating runs each (medians)")
    print(f"  {'':26} {'wall ms':>8} {'CPU ms':>8} {'/ floor':>8} {'/ alembic':>10}")
    for name in results:
        print(f"  {name:26} {wall[name] * 1000:8.1f} {cpu[name] * 1000:8.1f} "
              f"{wall[name] / wall[floor]:8.2f} {wall[name] / wall[alembic]:10.2f}")
    for name in ("upgrade (fast path)", "wait --until-head (fast)"):
        ok = wall[name] <= TARGET_FLOOR * wall[floor] and wall[name] <= TARGET_ALEMBIC * wall[alembic]
        print(f"  {name}: {wall[name] / wall[floor]:.2f}x the floor (target <= {TARGET_FLOOR:g}), "
              f"{wall[name] / wall[alembic]:.2f}x Alembic (target <= {TARGET_ALEMBIC:g}): "
              f"{'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
