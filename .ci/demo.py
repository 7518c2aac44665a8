"""Run the migration job against a throwaway PostgreSQL 18 cluster and S3 server, then remove them.

The S3 server is moto's, on loopback: the job shows the whole flow wait → lock → backup → migrate.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.pgcluster import Cluster, bindir  # noqa: E402 - the tests' throwaway clusters
from tests.s3_fixtures import S3Server, moto_s3  # noqa: E402


def main() -> int:
    cluster = Cluster("18").init().start()
    try:
        with moto_s3(request_log=logging.ERROR) as s3:
            s3.client.create_bucket(Bucket="backups")
            return run_job(cluster, s3)
    except KeyboardInterrupt:  # Ctrl-C: the runner already stopped (exit 130); clean up quietly
        print("\n== interrupted: removing the throwaway database and S3 server", flush=True)
        return 130
    finally:
        cluster.destroy()


def run_job(cluster: Cluster, s3: S3Server) -> int:
    cluster.psql("CREATE DATABASE shop")
    tools = bindir("18")
    env = dict(os.environ, DATABASE_URL=cluster.url("shop"),
               ALEMBIC_CONFIG=str(REPO / "alembic.ini"), BACKUP_MODE="required",
               BACKUP_S3_URI="s3://backups/demo", PG_DUMP_BIN=str(tools / "pg_dump"),
               PG_RESTORE_BIN=str(tools / "pg_restore"), **s3.env())
    print(f"== throwaway PostgreSQL 18 on 127.0.0.1:{cluster.port}, database 'shop'; "
          f"throwaway S3 at {s3.endpoint}, BACKUP_S3_URI=s3://backups/demo", flush=True)
    code = 0
    for args in (["upgrade"], ["upgrade"], ["status", "--check"], ["backups"]):
        print(f"\n== python -m runner {' '.join(args)}", flush=True)
        code = _call([sys.executable, "-m", "runner", *args], env)
        print(f"== exit code {code}", flush=True)
        if code:
            break
    return code

def _call(args: list[str], env: dict[str, str]) -> int:
    proc = subprocess.Popen(args, env=env, cwd=REPO)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.wait(timeout=30)  # it got the same SIGINT: let it cancel, roll back and exit 130
        raise


if __name__ == "__main__":
    sys.exit(main())
