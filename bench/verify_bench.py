"""`verify` against plain `alembic upgrade head` of the same chain, and verify's cost of observing
locks and rewrites, side by side.

Chains: the sample migrations (5 revisions), a generated chain of --revisions revisions (default
100: tables, columns, CONCURRENTLY indexes, views, constraints; each with a downgrade that undoes
it) and MLflow's chain (downloaded from PyPI into a temporary directory, see bench/mlflow_chain.py;
--no-mlflow skips it). Alternating runs on one PostgreSQL cluster; medians of wall and CPU time.
  alembic   alembic upgrade head on a fresh database (created untimed; not for MLflow, whose
            chain needs its create_all() first)
  plain     python -m runner verify with VERIFY_LOCKS=off (no observation)
  verify    python -m runner verify (scratch database, every revision up/down/up, fingerprints,
            locks, rewrites and scans observed, models for the sample, one Squawk run)
Goals: verify <= 4x alembic (each revision runs three times, plus fingerprints); the observation
<= 1.2x (verify / plain). On a loaded machine side-by-side medians of runs of a few seconds are
noisy, so each verify run also reports the time it spent observing (summary.observation_s: the
snapshot queries, the samplers and building the findings): "by verify's own account" is
verify / (verify - that), from the same runs.
Usage: .venv/bin/python bench/verify_bench.py [--runs 3] [--revisions 100] [--major 18] [--no-mlflow]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import mlflow_chain  # noqa: E402
from bench.measure import wall_cpu  # noqa: E402
from tests.pgcluster import Cluster  # noqa: E402

GOAL = 4.0
OBSERVATION_GOAL = 1.2
ENV_PY = '''\
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config


def run(connection):
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


if config.attributes.get("connection") is not None:
    run(config.attributes["connection"])
else:
    with engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                            poolclass=pool.NullPool).connect() as connection:
        run(connection)
'''
# (upgrade, downgrade) per kind; {i}: this revision, {t}: the table of its group
KINDS = [
    ('op.execute("CREATE TABLE {t} (id bigint PRIMARY KEY, name text, created_at timestamptz '
     'NOT NULL DEFAULT now())")', 'op.execute("DROP TABLE {t}")'),
    ('op.execute("ALTER TABLE {t} ADD COLUMN note_{i} text")',
     'op.execute("ALTER TABLE {t} DROP COLUMN note_{i}")'),
    ('with op.get_context().autocommit_block():\n        '
     'op.execute("CREATE INDEX CONCURRENTLY ix_{t}_name ON {t} (name)")',
     'with op.get_context().autocommit_block():\n        '
     'op.execute("DROP INDEX CONCURRENTLY ix_{t}_name")'),
    ('op.execute("ALTER TABLE {t} ADD CONSTRAINT ck_{t}_name CHECK (name <> \'\') NOT VALID")',
     'op.execute("ALTER TABLE {t} DROP CONSTRAINT ck_{t}_name")'),
    ('op.execute("CREATE VIEW v_{t} AS SELECT id, name FROM {t}")', 'op.execute("DROP VIEW v_{t}")'),
]


def generated_chain(root: Path, count: int) -> Path:
    """Write an Alembic project of `count` linear revisions; return its alembic.ini."""
    versions = root / "versions"
    versions.mkdir(parents=True)
    (root / "env.py").write_text(ENV_PY)
    for i in range(count):
        up, down = KINDS[i % len(KINDS)]
        t = f"t{i // len(KINDS):03d}"
        parent = f'"g{i - 1:03d}"' if i else "None"
        (versions / f"g{i:03d}.py").write_text(
            f'from alembic import op\n\nrevision = "g{i:03d}"\ndown_revision = {parent}\n\n\n'
            f"def upgrade() -> None:\n    {up.format(i=i, t=t)}\n\n\n"
            f"def downgrade() -> None:\n    {down.format(i=i, t=t)}\n")
    ini = root / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {root}\n")
    return ini


def plain_ini(ini: Path, url: str, work: Path, name: str) -> Path:
    """A copy of ini with sqlalchemy.url, for plain `alembic`."""
    text = ini.read_text().replace("%(here)s", str(ini.parent))
    url = url.replace("postgresql://", "postgresql+psycopg2://").replace("%", "%%")
    out = work / f"{name}-plain.ini"
    out.write_text(text.replace("[alembic]\n", f"[alembic]\nsqlalchemy.url = {url}\n", 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--revisions", type=int, default=100)
    ap.add_argument("--major", default="18")
    ap.add_argument("--no-mlflow", action="store_true", help="skip MLflow's chain (needs PyPI)")
    args = ap.parse_args()
    cluster = Cluster(args.major).init().start()
    work = Path(tempfile.mkdtemp(prefix="verify-bench-"))
    try:
        chains: dict[str, tuple[Path, dict[str, str]]] = {
            "sample (5 revisions)": (REPO / "alembic.ini", {}),
            f"generated ({args.revisions} revisions)": (generated_chain(work / "gen", args.revisions), {})}
        if not args.no_mlflow:
            ini, extra = mlflow_chain.prepare(work / "mlflow")
            chains[f"MLflow ({mlflow_chain.revisions(ini)} revisions)"] = (ini, extra)
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("PG", "AWS_", "BACKUP_", "DATABASE_URL", "VERIFY_"))}
        base.pop("PYTHONDONTWRITEBYTECODE", None)  # every side from cached bytecode
        base.update(PYTHONPATH=str(REPO), VERIFY_DATABASE_URL=cluster.url("postgres"))
        alembic = str(Path(sys.executable).with_name("alembic"))
        print(f"PostgreSQL {args.major}, {args.runs} alternating runs each (medians); load average "
              f"{os.getloadavg()[0]:.1f}")
        print(f"  {'chain':28} {'alembic s':>10} {'plain s':>8} {'verify s':>9} {'verify CPU s':>13} "
              f"{'vs alembic':>11} {'observation':>12}")
        for n, (name, (ini, extra)) in enumerate(chains.items()):
            env = {**base, "ALEMBIC_CONFIG": str(ini), **extra}
            if "PYTHONPATH_PREFIX" in env:
                env["PYTHONPATH"] = f"{env.pop('PYTHONPATH_PREFIX')}:{env['PYTHONPATH']}"
            plain_ini_file = None if extra else plain_ini(ini, cluster.url(f"plain{n}"), work, f"chain{n}")
            sides: dict[str, list[tuple[float, float]]] = {"alembic": [], "plain": [], "verify": []}
            shares: list[float] = []  # verify / (verify - its own observation time), per run
            for run in range(args.runs + 1):  # the first round warms caches and bytecode
                timed = {}
                if plain_ini_file is not None:
                    cluster.psql(f"DROP DATABASE IF EXISTS plain{n} WITH (FORCE)")
                    cluster.psql(f"CREATE DATABASE plain{n}")
                    timed["alembic"] = wall_cpu([alembic, "-c", str(plain_ini_file), "upgrade", "head"],
                                                base, work)
                for side in (("plain", "verify") if run % 2 else ("verify", "plain")):  # neither always first
                    timed[side] = verify(env, "off" if side == "plain" else "error", work / "report.json")
                    if side == "verify" and run:
                        took = timed[side][0]
                        shares.append(took / (took - observation_seconds(work / "report.json")))
                if run:
                    for side, took in timed.items():
                        sides[side].append(took)
            wall = {k: statistics.median(x[0] for x in rs) for k, rs in sides.items() if rs}
            cpu = statistics.median(x[1] for x in sides["verify"])
            observation = wall["verify"] / wall["plain"]
            best = min(x[0] for x in sides["verify"]) / min(x[0] for x in sides["plain"])
            versus = f"{wall['verify'] / wall['alembic']:10.2f}x" if "alembic" in wall else f"{'-':>11}"
            print(f"  {name:28} {wall.get('alembic', float('nan')):10.2f} {wall['plain']:8.2f} "
                  f"{wall['verify']:9.2f} {cpu:13.2f} {versus} {observation:11.2f}x"
                  f"  ({'met' if observation <= OBSERVATION_GOAL else 'NOT met'}: observation goal <= "
                  f"{OBSERVATION_GOAL:g}x; best runs {best:.2f}x; by verify's own account "
                  f"{statistics.median(shares):.3f}x)")
        print(f"load average at the end: {os.getloadavg()[0]:.1f} (2 cores: above 2, other work skews "
              "the medians)")
    finally:
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


def verify(env: dict[str, str], locks: str, report: Path) -> tuple[float, float]:
    """One verify run, its JSON report to a file; exit 13 (findings) is a verdict, not a failure
    of the bench."""
    script = (f'"{sys.executable}" -m runner verify --format json >"{report}"; c=$?; '
              '[ "$c" -eq 13 ] && exit 0; exit "$c"')
    return wall_cpu(["sh", "-c", script], {**env, "VERIFY_LOCKS": locks}, REPO)


def observation_seconds(report: Path) -> float:
    """The seconds verify spent observing in that run, by its own account (summary.observation_s)."""
    return float(json.loads(report.read_text())["summary"].get("observation_s", 0.0))


if __name__ == "__main__":
    main()
