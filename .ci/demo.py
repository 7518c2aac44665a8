"""Run the migration job against a throwaway PostgreSQL 18 cluster, then remove it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.pgcluster import Cluster  # noqa: E402 - the same throwaway clusters the tests use


def main() -> int:
    cluster = Cluster("18").init().start()
    try:
        cluster.psql("CREATE DATABASE shop")
        env = dict(os.environ, DATABASE_URL=cluster.url("shop"),
                   ALEMBIC_CONFIG=str(REPO / "alembic.ini"), BACKUP_MODE="off")
        print(f"== throwaway PostgreSQL 18 on 127.0.0.1:{cluster.port}, database 'shop'", flush=True)
        code = 0
        for args in (["upgrade"], ["upgrade"], ["status", "--check"]):
            print(f"\n== python -m runner {' '.join(args)}", flush=True)
            code = subprocess.call([sys.executable, "-m", "runner", *args], env=env, cwd=REPO)
            print(f"== exit code {code}", flush=True)
            if code:
                break
        return code
    finally:
        cluster.destroy()


if __name__ == "__main__":
    sys.exit(main())
