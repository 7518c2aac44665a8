"""`verify` against plain `alembic upgrade head` of the same chain, side by side.

Chains: the sample migrations (5 revisions) and a generated chain of --revisions revisions
(default 100: tables, columns, CONCURRENTLY indexes, views, constraints; each with a downgrade
that undoes it). Alternating runs on one PostgreSQL cluster; medians of wall and CPU time.
  alembic   alembic upgrade head on a fresh database (created untimed)
  verify    python -m runner verify (scratch database, every revision up/down/up, fingerprints,
            models for the sample, one Squawk run)
Goal: verify <= 4x alembic (each revision runs three times, plus fingerprints).
Usage: .venv/bin/python bench/verify_bench.py [--runs 3] [--revisions 100] [--major 18]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.measure import wall_cpu  # noqa: E402
from tests.pgcluster import Cluster  # noqa: E402

GOAL = 4.0
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
    args = ap.parse_args()
    cluster = Cluster(args.major).init().start()
    work = Path(tempfile.mkdtemp(prefix="verify-bench-"))
    try:
        chains = {"sample (5 revisions)": REPO / "alembic.ini",
                  f"generated ({args.revisions} revisions)": generated_chain(work / "gen", args.revisions)}
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("PG", "AWS_", "BACKUP_", "DATABASE_URL", "VERIFY_"))}
        base.pop("PYTHONDONTWRITEBYTECODE", None)  # both sides from cached bytecode
        base.update(PYTHONPATH=str(REPO), VERIFY_DATABASE_URL=cluster.url("postgres"))
        alembic = str(Path(sys.executable).with_name("alembic"))
        print(f"PostgreSQL {args.major}, {args.runs} alternating runs each (medians)")
        print(f"  {'chain':26} {'alembic s':>10} {'verify s':>9} {'verify CPU s':>13} {'ratio':>6}")
        for n, (name, ini) in enumerate(chains.items()):
            plain = plain_ini(ini, cluster.url(f"plain{n}"), work, f"chain{n}")
            sides: dict[str, list[tuple[float, float]]] = {"alembic": [], "verify": []}
            for run in range(args.runs + 1):  # the first round warms caches and bytecode
                cluster.psql(f"DROP DATABASE IF EXISTS plain{n} WITH (FORCE)")
                cluster.psql(f"CREATE DATABASE plain{n}")
                a = wall_cpu([alembic, "-c", str(plain), "upgrade", "head"], base, work)
                v = wall_cpu([sys.executable, "-m", "runner", "verify"], {**base, "ALEMBIC_CONFIG": str(ini)},
                          REPO)
                if run:
                    sides["alembic"].append(a)
                    sides["verify"].append(v)
            wall = {k: statistics.median(x[0] for x in rs) for k, rs in sides.items()}
            cpu = statistics.median(x[1] for x in sides["verify"])
            ratio = wall["verify"] / wall["alembic"]
            print(f"  {name:26} {wall['alembic']:10.2f} {wall['verify']:9.2f} {cpu:13.2f} {ratio:6.2f}"
                  f"  ({'met' if ratio <= GOAL else 'NOT met'}: goal <= {GOAL:g}x)")
    finally:
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
