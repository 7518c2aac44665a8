"""Backups: real PostgreSQL, real pg_dump/pg_restore/psql/zstd, a real S3 server (moto) on loopback.

These run on the newest major: how a backup is taken does not differ between servers. Restores
across servers and client versions are tests/test_restore.py's version matrix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import Database, finish, run_runner, runner_env, start_runner, wait_for
from tests.pgcluster import APP_PASSWORD, PASSWORD, bindir, free_port
from tests.s3_fixtures import AuthS3, S3Server, moto_process, s3_client

MiB = 1 << 20


def backup_env(db: Database, s3: S3Server, bucket: str, **extra: str) -> dict[str, str]:
    """Runner environment with backups required, the client tools matching the server."""
    tools = bindir(db.cluster.major)
    env = dict(BACKUP_MODE="required", BACKUP_S3_URI=f"s3://{bucket}/team/app",
               PG_DUMP_BIN=str(tools / "pg_dump"), PG_RESTORE_BIN=str(tools / "pg_restore"),
               **s3.env())
    return runner_env(db.url, **{**env, **extra})


def digest(db: Database) -> dict[str, str]:
    """Return {table: 'rows:md5 of its ordered rows'} for every user table (not the ledger's: a
    restore keeps the runs recorded since the backup, and records itself)."""
    tables = db.sql("SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables "
                    "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') "
                    "AND table_name NOT LIKE 'runner\\_history%' "
                    "AND table_type = 'BASE TABLE' ORDER BY 1").splitlines()
    return {t: db.sql(f"SELECT count(*) || ':' || md5(coalesce(string_agg(x::text, '|' ORDER BY "
                      f"x::text), '')) FROM {t} x") for t in tables}


def fill(db: Database, mb: int = 0) -> None:
    """Non-ASCII text, large rows, several schemas; plus mb MB of incompressible text."""
    db.sql("""
        CREATE SCHEMA "inventaire_ü";
        CREATE TABLE "inventaire_ü"."articles" (id int PRIMARY KEY, nom text, prix numeric(10,2));
        INSERT INTO "inventaire_ü".articles
            SELECT g, 'Grüße 日本語 ñandú 🎉 ' || g, g * 1.5 FROM generate_series(1, 2000) g;
        CREATE SCHEMA blobs;
        CREATE TABLE blobs.big (id int PRIMARY KEY, body text, raw bytea);
        INSERT INTO blobs.big SELECT g, repeat(md5(g::text), 40000),
            decode(repeat(md5((g * 7)::text), 20000), 'hex') FROM generate_series(1, 12) g;
        INSERT INTO customers (email, name)
            SELECT 'user' || g || '@exämple.org', 'Zoë ' || g FROM generate_series(1, 500) g;
        INSERT INTO orders (customer_id, total_cents) SELECT id, id * 100 FROM customers;
    """)
    if mb:
        db.sql(f"CREATE TABLE public.noise AS SELECT g AS id, "
               f"(SELECT string_agg(md5(random()::text || g || i), '') FROM generate_series(1, 32) i) "
               f"AS body FROM generate_series(1, {mb * 1000}) g")


@pytest.fixture
def at_0002(database: Database) -> Database:
    r = run_runner(["upgrade", "--to", "0002"], runner_env(database.url))
    assert r.code == 0, r.err
    return database


@pytest.mark.parametrize("compression,suffix", [("zstd", ".pgdump.zst"), ("gzip", ".pgdump")])
def test_round_trip_backup_migrate_restore(at_0002: Database, s3_server: S3Server, bucket: str,
                                           compression: str, suffix: str) -> None:
    db = at_0002
    fill(db)
    before = digest(db)
    env = backup_env(db, s3_server, bucket, LOG_FORMAT="json", BACKUP_COMPRESSION=compression)

    r = run_runner(["upgrade"], env)
    assert r.code == 0, r.err
    key = r.summary()["backup"]
    assert key.startswith(f"team/app/{db.name}/") and key.endswith(suffix)
    assert s3_server.keys(bucket) == [key, key + ".manifest.json"]
    assert db.version() == "0005" and "billing.customer_totals" in db.tables()
    got = s3_server.client.get_object(Bucket=bucket, Key=key + ".manifest.json")
    manifest = json.loads(got["Body"].read())
    assert manifest["alembic_revision"] == ["0002"] and manifest["database"] == db.name
    assert manifest["compression"] == compression and len(manifest["sha256"]) == 64
    obj = s3_server.client.head_object(Bucket=bucket, Key=key)
    assert obj["ContentLength"] == manifest["size"]
    # the migration changed data too (0005 fills a new column)
    assert digest(db) != before

    listed = run_runner(["backups"], env)
    assert listed.code == 0, listed.err
    assert key in listed.out and "0002" in listed.out

    refused = run_runner(["restore", "--backup", "latest"], env)
    assert refused.code == 2 and "--yes" in refused.err

    restored = run_runner(["restore", "--backup", "latest", "--yes"], env)
    assert restored.code == 0, restored.err
    assert db.version() == "0002"
    assert digest(db) == before
    assert "billing.customer_totals" not in db.tables()
    # the restored database migrates again, with a second backup
    again = run_runner(["upgrade"], env)
    assert again.code == 0, again.err
    assert len(s3_server.keys(bucket)) == 4


def test_noop_takes_no_backup_and_off_mode_skips(at_0002: Database, s3_server: S3Server,
                                                  bucket: str) -> None:
    db = at_0002
    r = run_runner(["upgrade", "--to", "0002"], backup_env(db, s3_server, bucket))
    assert r.code == 0 and s3_server.keys(bucket) == []
    r = run_runner(["upgrade", "--to", "0003"], backup_env(db, s3_server, bucket, BACKUP_MODE="off"))
    assert r.code == 0 and "backup.skipped" in r.err and s3_server.keys(bucket) == []
    missing = run_runner(["upgrade"], runner_env(db.url, BACKUP_MODE="required"))
    assert missing.code == 2 and "BACKUP_S3_URI" in missing.err
    assert len(missing.lines) == 1 and db.version() == "0003"


def wrapper(tmp_path: Path, db: Database, body: str) -> str:
    """A PG_DUMP_BIN that runs the real pg_dump inside a shell pipeline (for failures on cue)."""
    real = bindir(db.cluster.major) / "pg_dump"
    script = tmp_path / "pg_dump"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        if [ "$1" = "--version" ]; then exec {real} --version; fi
        REAL={real}
        """) + textwrap.dedent(body))
    script.chmod(0o755)
    return str(script)


def test_pg_dump_killed_mid_stream(at_0002: Database, s3_server: S3Server, bucket: str,
                                   tmp_path: Path) -> None:
    db = at_0002
    fill(db, mb=24)
    # 12 MiB of real dump output (more than one 8 MiB part is uploaded), then SIGKILL
    dump = wrapper(tmp_path, db, """\
        "$REAL" "$@" | head -c 12582912
        kill -9 $$
        """)
    r = run_runner(["upgrade"], backup_env(db, s3_server, bucket, PG_DUMP_BIN=dump,
                                           BACKUP_COMPRESSION="none"))
    assert r.code == 5, r.err
    assert "pg_dump exited with signal SIGKILL" in r.err and "nothing was migrated" in r.err
    assert "Traceback" not in r.err
    assert s3_server.keys(bucket) == [] and s3_server.uploads(bucket) == []
    assert db.version() == "0002" and "billing.customer_totals" not in db.tables()


def test_parallel_dump_round_trip(at_0002: Database, s3_server: S3Server, bucket: str,
                                  tmp_path: Path) -> None:
    """BACKUP_JOBS=2: a directory-format dump whose files are shipped as pg_dump closes them
    (large ones through zstd, small ones as they are), each recorded with its digest; nothing
    stays on local disk; it restores both ways; a file changed in S3 is refused."""
    db = at_0002
    fill(db)
    before = digest(db)
    work = tmp_path / "work"
    work.mkdir()
    env = backup_env(db, s3_server, bucket, LOG_FORMAT="json", BACKUP_JOBS="2", BACKUP_WORKDIR=str(work))
    r = run_runner(["upgrade"], env)
    assert r.code == 0, r.err
    key = r.summary()["backup"]
    assert key.endswith(".pgdir") and list(work.iterdir()) == []
    body = s3_server.client.get_object(Bucket=bucket, Key=key + ".manifest.json")["Body"].read()
    manifest = json.loads(body)
    files = manifest["files"]
    assert manifest["format"] == "directory" and {f["compression"] for f in files} == {"zstd", "none"}
    stored = [f"{key}/{f['object']}" for f in files] + [key + ".manifest.json"]
    assert sorted(stored) == s3_server.keys(bucket)
    for jobs in ("1", "2"):
        db.sql("CREATE TABLE marker (x int)")
        restored = run_runner(["restore", "--backup", key, "--yes"], {**env, "RESTORE_JOBS": jobs})
        assert restored.code == 0, restored.err
        assert digest(db) == before and db.version() == "0002"
    large = next(f for f in files if f["compression"] == "zstd")
    s3_server.client.put_object(Bucket=bucket, Key=f"{key}/{large['object']}",
                                Body=b"\0" * large["size"])
    db.sql("CREATE TABLE marker (x int)")
    refused = run_runner(["restore", "--backup", key, "--yes"], env)
    assert refused.code == 5 and "does not match its manifest" in refused.err, refused.err
    assert "public.marker" in db.tables() and list(work.iterdir()) == []


def test_parallel_dump_that_fails_leaves_nothing(at_0002: Database, s3_server: S3Server, bucket: str,
                                                 tmp_path: Path) -> None:
    """pg_dump -Fd fails after its files were shipped: exit 5, nothing migrated, every object it
    stored deleted (without a manifest it never was a backup), nothing left on local disk."""
    db = at_0002
    fill(db)
    work = tmp_path / "work"
    work.mkdir()
    dump = wrapper(tmp_path, db, """\
        "$REAL" "$@" && echo "pg_dump: error: failed on cue" >&2
        exit 1
        """)
    r = run_runner(["upgrade"], backup_env(db, s3_server, bucket, PG_DUMP_BIN=dump, BACKUP_JOBS="2",
                                           BACKUP_WORKDIR=str(work)))
    assert r.code == 5 and "failed on cue" in r.err and "nothing was migrated" in r.err, r.err
    assert s3_server.keys(bucket) == [] and s3_server.uploads(bucket) == []
    assert db.version() == "0002" and list(work.iterdir()) == []
    # SIGTERM once the files are shipped, pg_dump still running: the same cleanup, exit 143
    slow = wrapper(tmp_path, db, """\
        "$REAL" "$@" && echo "pg_dump: done" >&2
        sleep 30
        """)
    env = backup_env(db, s3_server, bucket, PG_DUMP_BIN=slow, BACKUP_JOBS="2", BACKUP_WORKDIR=str(work))
    proc = start_runner(["upgrade"], env)
    wait_for(lambda: any(k.endswith("toc.dat") for k in s3_server.keys(bucket)), timeout=60,
             what="the parallel dump never shipped toc.dat")
    proc.send_signal(signal.SIGTERM)
    done = finish(proc, timeout=60)
    assert done.code == 143, done.err
    assert s3_server.keys(bucket) == [] and db.version() == "0002" and list(work.iterdir()) == []


def cmdlines() -> list[str]:
    """Return every process's command line (what `ps` shows anyone on the host)."""
    out = []
    for proc in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            out.append(proc.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    return out


def test_sigterm_during_backup(at_0002: Database, s3_server: S3Server, bucket: str,
                               tmp_path: Path) -> None:
    db = at_0002
    fill(db, mb=24)
    throttle = "import sys,time\nwhile b := sys.stdin.buffer.read(1 << 20):\n" \
               "    sys.stdout.buffer.write(b); sys.stdout.flush(); time.sleep(0.4)\n"
    (tmp_path / "throttle.py").write_text(throttle)
    dump = wrapper(tmp_path, db, f"""\
        "$REAL" "$@" | python3 {tmp_path / 'throttle.py'}
        """)
    proc = start_runner(["upgrade"], backup_env(db, s3_server, bucket, PG_DUMP_BIN=dump,
                                                BACKUP_COMPRESSION="none"))
    wait_for(lambda: s3_server.uploads(bucket), timeout=30, every=0.2,
             what="the multipart upload never started")
    dumps = [c for c in cmdlines() if "--lock-wait-timeout" in c]
    assert dumps and all("--format=custom" in c for c in dumps)
    assert not any(PASSWORD in c or quote(PASSWORD, safe="") in c for c in dumps), \
        "the password must reach pg_dump through PGPASSWORD, not argv"
    time.sleep(3)  # past the first progress event (every 5 s)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    r = finish(proc, timeout=30)
    assert r.code == 143, r.err
    assert time.monotonic() - t0 < 10
    assert "backup.progress" in r.err and "MB streamed so far" in r.err
    assert s3_server.keys(bucket) == [] and s3_server.uploads(bucket) == []
    assert db.version() == "0002"
    assert db.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
                  "'migration-runner/backup/%'") == "0"


@pytest.mark.parametrize("case", ["unreachable", "no bucket", "wrong secret", "unknown key"])
def test_s3_failures_fail_closed(at_0002: Database, s3_server: S3Server, auth_s3_server: AuthS3,
                                 case: str) -> None:
    db = at_0002
    good = dict(AWS_ENDPOINT_URL_S3=auth_s3_server.endpoint, AWS_ACCESS_KEY_ID=auth_s3_server.access_key,
                AWS_SECRET_ACCESS_KEY=auth_s3_server.secret_key,
                BACKUP_S3_URI=f"s3://{auth_s3_server.bucket}/p")
    bad, expect = {
        "unreachable": ({"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}"}, "S3 unreachable"),
        "no bucket": ({"BACKUP_S3_URI": "s3://no-such-bucket-here/p"}, "NoSuchBucket"),
        "wrong secret": ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "SignatureDoesNotMatch"),
        "unknown key": ({"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY"}, "InvalidAccessKeyId"),
    }[case]
    env = backup_env(db, s3_server, "unused", **{**good, **bad})
    t0 = time.monotonic()
    r = run_runner(["upgrade"], env)
    assert r.code == 5, r.err
    assert time.monotonic() - t0 < 30
    errors = [line for line in r.lines if " ERROR " in line]
    assert len(errors) == 1 and expect in errors[0], r.err
    assert "Traceback" not in r.err and "not-the-secret" not in r.err
    assert db.version() == "0002"
    # the same server and credentials work when nothing is wrong
    if case == "wrong secret":
        ok = run_runner(["backup"], backup_env(db, s3_server, "unused", **good))
        assert ok.code == 0, ok.err


@pytest.mark.pg("18")  # a server newer than the oldest client (PG 15 pg_dump, PG 18 server)
def test_old_pg_dump_refused(at_0002: Database, s3_server: S3Server, bucket: str) -> None:
    db = at_0002
    r = run_runner(["upgrade"], backup_env(db, s3_server, bucket,
                                           PG_DUMP_BIN=str(bindir("15") / "pg_dump")))
    assert r.code == 5, r.err
    assert "older than the server (PostgreSQL 18)" in r.err and "PostgreSQL 18 (or newer) client" in r.err
    assert s3_server.keys(bucket) == [] and db.version() == "0002"


@pytest.mark.parametrize("damage,jobs", [("tampered", "1"), ("tampered", "2"), ("truncated", "2")])
def test_restore_refuses_a_damaged_backup(at_0002: Database, s3_server: S3Server, bucket: str,
                                          damage: str, jobs: str) -> None:
    """Streamed (the digest is checked before the COMMIT) or parallel (before anything else)."""
    db = at_0002
    env = backup_env(db, s3_server, bucket, RESTORE_JOBS=jobs)
    r = run_runner(["backup"], env)
    assert r.code == 0, r.err
    key = s3_server.keys(bucket)[0]
    body = s3_server.client.get_object(Bucket=bucket, Key=key)["Body"].read()
    body = body[:-1] + bytes([body[-1] ^ 1]) if damage == "tampered" else body[: len(body) // 2]
    s3_server.client.put_object(Bucket=bucket, Key=key, Body=body)
    db.sql("CREATE TABLE marker (x int); INSERT INTO marker VALUES (42)")
    r = run_runner(["restore", "--backup", key, "--yes"], env)
    assert r.code == 5, r.err
    assert "does not match its manifest" in r.err and "not touched" in r.err
    assert db.sql("SELECT x FROM marker") == "42" and db.version() == "0002"


def test_restore_only_trusts_manifested_backups(at_0002: Database, s3_server: S3Server,
                                                bucket: str) -> None:
    db = at_0002
    env = backup_env(db, s3_server, bucket)
    orphan = f"team/app/{db.name}/20990101T000000Z-deadbeef.pgdump.zst"
    s3_server.client.put_object(Bucket=bucket, Key=orphan, Body=b"not a dump")
    r = run_runner(["restore", "--backup", orphan, "--yes"], env)
    assert r.code == 2 and "no committed backup" in r.err
    r = run_runner(["restore", "--backup", "latest", "--yes"], env)
    assert r.code == 2 and "nothing to restore" in r.err
    listed = run_runner(["backups"], env)
    assert listed.code == 0 and orphan not in listed.out


def test_five_runners_one_backup(at_0002: Database, s3_server: S3Server, bucket: str) -> None:
    db = at_0002
    env = backup_env(db, s3_server, bucket)
    procs = [start_runner(["upgrade"], env) for _ in range(5)]
    results = [finish(p, timeout=120) for p in procs]
    assert [r.code for r in results] == [0] * 5, [r.err for r in results if r.code]
    assert len([k for k in s3_server.keys(bucket) if k.endswith(".manifest.json")]) == 1
    assert len(s3_server.keys(bucket)) == 2
    assert db.version() == "0005"


def test_failed_restore_rolls_back(at_0002: Database, s3_server: S3Server, bucket: str,
                                   tmp_path: Path) -> None:
    """The restore is one transaction: an error at its very end leaves the database as it was
    (RESTORE_JOBS=1: the streamed restore; a parallel one is in test_restore.py)."""
    db = at_0002
    env = backup_env(db, s3_server, bucket, RESTORE_JOBS="1")
    assert run_runner(["upgrade"], env).code == 0
    db.sql("CREATE TABLE marker (x int); INSERT INTO marker VALUES (42)")
    real = bindir(db.cluster.major) / "pg_restore"
    script = tmp_path / "pg_restore"
    script.write_text(f"#!/bin/bash\nif [ \"$1\" = --version ]; then exec {real} --version; fi\n"
                      f"{real} \"$@\" && echo 'SELECT 1/0;'\n")
    script.chmod(0o755)
    r = run_runner(["restore", "--backup", "latest", "--yes"], {**env, "PG_RESTORE_BIN": str(script)})
    assert r.code == 5, r.err
    assert "division by zero" in r.err and "rolled back" in r.err
    assert db.sql("SELECT x FROM marker") == "42" and db.version() == "0005"
    assert "billing.customer_totals" in db.tables()


def test_pg_dump_does_not_wait_behind_table_locks(at_0002: Database, s3_server: S3Server,
                                                  bucket: str) -> None:
    import psycopg2

    db = at_0002
    holder = psycopg2.connect(db.url)
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE customers IN ACCESS EXCLUSIVE MODE")
        t0 = time.monotonic()
        r = run_runner(["upgrade"], backup_env(db, s3_server, bucket, BACKUP_LOCK_WAIT_TIMEOUT="1s"))
        assert r.code == 5, r.err
        assert time.monotonic() - t0 < 20
        assert "BACKUP_LOCK_WAIT_TIMEOUT" in r.err and "nothing was migrated" in r.err
        assert s3_server.keys(bucket) == [] and s3_server.uploads(bucket) == []
    finally:
        holder.close()
    assert db.version() == "0002"


# -- secrets reach child processes through the environment only (issue 13, item 2) ---------------

def children(pid: int) -> dict[str, tuple[str, str]]:
    """Return {name: (argv, environment)} of pid's child processes, as /proc shows them."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid:
                continue
            d = stat.parent
            found[(d / "comm").read_text().strip()] = (
                (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"),
                (d / "environ").read_bytes().replace(b"\0", b"\n").decode(errors="replace"))
        except (OSError, ValueError, IndexError):
            continue
    return found


def sample(proc: subprocess.Popen, names: set[str]) -> dict[str, tuple[str, str]]:
    """Wait until all the named children run, then return what /proc shows of them."""
    seen: dict[str, tuple[str, str]] = {}

    def all_there() -> bool:
        seen.update(children(proc.pid))
        return names <= set(seen)

    wait_for(all_there, timeout=60, every=0.05, what=f"children {names} never ran together: {set(seen)}")
    return {name: seen[name] for name in names}


def assert_secret_free(seen: dict[str, tuple[str, str]], connects: set[str]) -> None:
    """No password in any argv; in the environment only as PGPASSWORD of the tools that connect."""
    secrets = (PASSWORD, quote(PASSWORD, safe=""))
    for name, (argv, environ) in seen.items():
        assert not any(x in argv for x in secrets), f"the password is in {name}'s argv"
        assert "DATABASE_URL" not in environ and "AWS_SECRET_ACCESS_KEY" not in environ, name
        with_password = [line for line in environ.splitlines() if any(x in line for x in secrets)]
        assert with_password == ([f"PGPASSWORD={PASSWORD}"] if name in connects else []), name


@pytest.mark.parametrize("way", ["user:password@", "?password=", "DATABASE_URL_FILE"])
def test_passwords_reach_children_only_through_the_environment(
        database: Database, s3_server: S3Server, bucket: str, tmp_path: Path, way: str) -> None:
    """Sample /proc of the real pg_dump and zstd (backup), zstd, pg_restore and psql (restore in
    one transaction) while they run, for each way a URL can carry the password (the parallel
    restore's pg_restore: tests/test_restore.py::test_sigterm_mid_parallel_restore)."""
    import psycopg2

    db = database
    url = {"user:password@": db.url, "DATABASE_URL_FILE": db.url,
           "?password=": f"postgresql://admin@127.0.0.1:{db.cluster.port}/{db.name}"
                         f"?password={quote(PASSWORD, safe='')}"}[way]
    env = backup_env(db, s3_server, bucket, RESTORE_JOBS="1")
    if way == "DATABASE_URL_FILE":
        (tmp_path / "url").write_text(url)
        del env["DATABASE_URL"]
        env["DATABASE_URL_FILE"] = str(tmp_path / "url")
    else:
        env["DATABASE_URL"] = url
    # 5 MB of rows: more than the pipes between the restore's stages hold
    db.sql("CREATE SCHEMA late; CREATE TABLE late.bulk AS SELECT g, repeat(md5(g::text), 8) AS body "
           "FROM generate_series(1, 20000) g")
    holder = psycopg2.connect(db.url)
    try:
        with holder.cursor() as cur:  # pg_dump waits at its LOCK TABLE while we look
            cur.execute("LOCK TABLE late.bulk IN ACCESS EXCLUSIVE MODE")
        proc = start_runner(["backup"], env)
        seen = sample(proc, {"pg_dump", "zstd"})
        holder.rollback()
        assert finish(proc).code == 0
        assert_secret_free(seen, connects={"pg_dump"})
        db.sql("DROP SCHEMA late CASCADE")
        with holder.cursor() as cur:  # the restore's CREATE SCHEMA late waits for this one
            cur.execute("CREATE SCHEMA late")
        proc = start_runner(["restore", "--backup", "latest", "--yes"], env)
        seen = sample(proc, {"psql", "pg_restore", "zstd"})
        holder.rollback()
        assert finish(proc).code == 0
        assert_secret_free(seen, connects={"psql"})
    finally:
        holder.close()
    assert db.sql("SELECT count(*) FROM late.bulk") == "20000"


# -- a hung S3 endpoint is bounded and logged (issue 13, item 6) -----------------------------------

def moto_pid(endpoint: str) -> int:
    port = endpoint.rsplit(":", 1)[1]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().split(b"\0")
            if any(a.endswith(b"moto_server") for a in argv) and port.encode() in argv:
                return int(cmdline.parent.name)
    raise AssertionError("moto_server process not found")


@pytest.fixture
def hung_s3() -> Iterator[tuple[S3Server, Callable[[], None]]]:
    """A moto server in its own process, and a function that freezes it (SIGSTOP): its socket
    stays open and accepts connections, nothing answers."""
    with moto_process() as endpoint:
        server = S3Server(endpoint, s3_client(endpoint))
        pid = moto_pid(endpoint)
        try:
            yield server, lambda: os.kill(pid, signal.SIGSTOP)
        finally:
            os.kill(pid, signal.SIGCONT)


def test_hung_s3_mid_upload_is_bounded(at_0002: Database, hung_s3: tuple[S3Server, Callable[[], None]],
                                       tmp_path: Path) -> None:
    db = at_0002
    server, freeze = hung_s3
    bucket = server.create_bucket()
    go = tmp_path / "go"
    dump = wrapper(tmp_path, db, f"""\
        while [ ! -e {go} ]; do sleep 0.05; done
        exec "$REAL" "$@"
        """)
    env = backup_env(db, server, bucket, PG_DUMP_BIN=dump, S3_TIMEOUT="1s")
    proc = start_runner(["upgrade"], env)
    wait_for(lambda: any("--format=custom" in argv for _, argv in children_cmd(proc.pid)), timeout=30,
             what="pg_dump never started")
    freeze()  # S3 answered the checks before the dump; now it hangs with the upload under way
    go.touch()
    t0 = time.monotonic()
    r = finish(proc, timeout=60)
    assert r.code == 5, r.err
    assert time.monotonic() - t0 < 30
    waiting = [line for line in r.lines if "s3.waiting" in line]
    assert waiting and "S3 has not answered an upload request" in waiting[0]
    errors = [line for line in r.lines if " ERROR " in line]
    assert len(errors) == 1 and "S3 did not answer" in errors[0] and "nothing was migrated" in errors[0]
    assert f"endpoint {server.endpoint} is hung" in errors[0] and "credentials" not in errors[0]
    assert db.version() == "0002"
    assert db.sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == "0"


def children_cmd(pid: int) -> list[tuple[str, str]]:
    return [(name, argv) for name, (argv, _) in children(pid).items()]


def test_hung_s3_respects_the_run_deadline(database: Database,
                                           hung_s3: tuple[S3Server, Callable[[], None]]) -> None:
    server, freeze = hung_s3
    bucket = server.create_bucket()
    # the first "still waiting" line comes after S3_TIMEOUT / 2; the deadline leaves room for it
    # on a loaded machine, and 3 attempts of S3_TIMEOUT with their backoff would take longer
    env = backup_env(database, server, bucket, RUN_DEADLINE="6s", S3_TIMEOUT="4s", LOG_FORMAT="json")
    freeze()
    t0 = time.monotonic()
    r = run_runner(["restore", "--backup", "latest", "--yes"], env)
    took = time.monotonic() - t0
    assert r.code == 9, r.err
    assert took < 11, took  # RUN_DEADLINE + its 5 s, from the process's start
    waiting = [json.loads(line) for line in r.lines if '"s3.waiting"' in line]
    assert waiting and "S3 has not answered listing" in waiting[0]["msg"]
    assert r.summary()["exit_code"] == 9


def test_hung_s3_is_named_with_its_timeout_and_endpoint(hung_s3: tuple[S3Server, Callable[[], None]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen endpoint fails a part larger than the socket buffers while it is being sent
    (botocore's ConnectionClosedError around the socket's timeout, not a ReadTimeoutError): the
    line says S3_TIMEOUT and which endpoint, never 'check the credentials'."""
    from runner.backup import s3
    from runner.config import Settings

    server, freeze = hung_s3
    bucket = server.create_bucket()
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    client = s3.client(dataclasses.replace(Settings(), s3_timeout=0.5))
    freeze()
    with pytest.raises(s3.S3_ERRORS) as exc:
        client.put_object(Bucket=bucket, Key="part", Body=os.urandom(32 << 20))
    line = s3.describe(exc.value, f"s3://{bucket}/part")
    assert "within S3_TIMEOUT" in line and f"endpoint {server.endpoint} is hung" in line, line
    assert "credentials" not in line, line


# -- pg_dump's errors say what they are (issue 13, item 13) ----------------------------------------

def test_missing_privilege_is_not_called_a_lock_conflict(database: Database, s3_server: S3Server,
                                                         bucket: str) -> None:
    db = database
    role = f"dumper_{db.name}"
    db.cluster.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{APP_PASSWORD}'")
    try:
        db.sql("CREATE TABLE secret (x int); INSERT INTO secret VALUES (1)")  # no grant to the role
        env = backup_env(db, s3_server, bucket,
                         DATABASE_URL=db.cluster.url(db.name, user=role, password=APP_PASSWORD))
        r = run_runner(["backup"], env)
        assert r.code == 5, r.err
        errors = [line for line in r.lines if " ERROR " in line]
        assert len(errors) == 1 and "permission denied for table secret" in errors[0]
        assert "the role lacks a privilege pg_dump needs" in errors[0]
        assert "BACKUP_LOCK_WAIT_TIMEOUT" not in errors[0] and "conflicting table lock" not in errors[0]
        assert s3_server.keys(bucket) == [] and s3_server.uploads(bucket) == []
    finally:
        db.sql(f"DROP OWNED BY {role}")
        db.cluster.psql(f"DROP ROLE {role}")


# -- pure logic and S3 helpers -------------------------------------------------------------------

def test_part_size_keeps_under_the_part_limit() -> None:
    from runner.backup.take import GROWTH, MAX_PART, MIN_PART, TARGET_PARTS, part_size

    assert part_size(0) == part_size(1 << 30) == MIN_PART
    for size in (20 << 30, 1 << 40, 7 << 40):
        part = part_size(size)
        assert part % MiB == 0 and size * GROWTH / part <= TARGET_PARTS
    assert part_size(1 << 50) == MAX_PART


def test_location_and_key_layout() -> None:
    from runner.backup.s3 import Location

    loc = Location.parse("s3://my-bucket/team/app/")
    assert (loc.bucket, loc.prefix) == ("my-bucket", "team/app")
    assert loc.database_prefix("shop") == "team/app/shop/"
    assert Location.parse("s3://my-bucket").database_prefix("shop") == "shop/"


@pytest.mark.parametrize("command,env,problem", [
    ("upgrade", {}, "BACKUP_S3_URI is not set"),
    ("downgrade", {}, "BACKUP_S3_URI is not set"),
    ("upgrade", {"BACKUP_MODE": "off"}, None),
    ("status", {}, None),
    ("backups", {"BACKUP_MODE": "off"}, "BACKUP_S3_URI is not set"),
    ("upgrade", {"BACKUP_S3_URI": "https://bucket/x"}, "is not an S3 URI"),
    ("upgrade", {"BACKUP_S3_URI": "s3://bkt/x", "BACKUP_MODE": "maybe"}, "BACKUP_MODE"),
    ("backup", {"BACKUP_S3_URI": "s3://bkt/x", "BACKUP_COMPRESSION": "lz4"}, "BACKUP_COMPRESSION"),
    ("backup", {"BACKUP_S3_URI": "s3://bkt/x", "BACKUP_CHECKSUM": "never"}, "BACKUP_CHECKSUM"),
    ("backup", {"BACKUP_S3_URI": "s3://bkt/x", "BACKUP_LOCK_WAIT_TIMEOUT": "soon"},
     "BACKUP_LOCK_WAIT_TIMEOUT"),
])
def test_backup_settings(command: str, env: dict[str, str], problem: str | None) -> None:
    from runner import config
    from runner.errors import ConfigError
    from tests.conftest import REPO

    base = {"DATABASE_URL": "postgresql://u@h/d", "ALEMBIC_CONFIG": str(REPO / "alembic.ini"), **env}
    if problem is None:
        config.load(base, command=command)
        return
    with pytest.raises(ConfigError, match=problem):
        config.load(base, command=command)


def test_sweep_aborts_only_stale_uploads_under_the_prefix(s3_server: S3Server, bucket: str) -> None:
    import datetime as dt
    import io

    from runner.backup.s3 import Location, sweep_stale_uploads
    from runner.log import EventLog

    c = s3_server.client
    mine = c.create_multipart_upload(Bucket=bucket, Key="team/app/shop/old.pgdump.zst")["UploadId"]
    other = c.create_multipart_upload(Bucket=bucket, Key="elsewhere/x")["UploadId"]
    loc, log = Location.parse(f"s3://{bucket}/team/app"), EventLog("text", io.StringIO())
    # moto reports every upload as initiated in 2010, so "too fresh to sweep" is checked by
    # asking about a moment before that
    early = dt.datetime(2010, 1, 1, tzinfo=dt.UTC)
    assert sweep_stale_uploads(c, loc, "shop", log, now=early) == 0
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    assert sweep_stale_uploads(c, loc, "shop", log, now=later) == 1
    assert [u["UploadId"] for u in s3_server.uploads(bucket)] == [other]
    assert mine != other


def test_pg_dump_failures_are_explained() -> None:
    from runner.backup.dump import hint

    denied = ("pg_dump: error: query failed: ERROR:  permission denied for table secret / pg_dump: "
              "detail: Query was: LOCK TABLE public.secret IN ACCESS SHARE MODE")
    assert "lacks a privilege" in hint(denied) and "BACKUP_LOCK_WAIT_TIMEOUT" not in hint(denied)
    waited = ("pg_dump: error: query failed: ERROR:  canceling statement due to statement timeout / "
              "pg_dump: detail: Query was: LOCK TABLE public.customers IN ACCESS SHARE MODE")
    assert "BACKUP_LOCK_WAIT_TIMEOUT" in hint(waited)
    assert hint("pg_dump: error: connection to server failed") == ""


def test_children_get_no_secrets_from_the_runner_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from runner import procs

    for name, value in {"DATABASE_URL": "postgresql://u:pw@h/d", "AWS_SECRET_ACCESS_KEY": "k",
                        "PGPASSWORD": "old", "PGOPTIONS": "-c x=y", "LC_ALL": "C.UTF-8"}.items():
        monkeypatch.setenv(name, value)
    env = procs.child_env(PGPASSWORD="pw")
    assert env["PGPASSWORD"] == "pw" and env["LC_ALL"] == "C.UTF-8" and "PATH" in env
    assert not {"DATABASE_URL", "AWS_SECRET_ACCESS_KEY", "PGOPTIONS"} & set(env)


def test_libpq_tools_get_the_password_in_their_environment_only() -> None:
    import io

    from runner import dburl, procs
    from runner.config import Settings
    from runner.context import Run
    from runner.errors import ConfigError
    from runner.log import EventLog

    def run_for(url: str) -> Run:
        return Run(settings=Settings(database_url=dburl.parse(url)), log=EventLog("text", io.StringIO()),
                   command="backup")

    url = "postgresql://u@h:5433/d?password=p%20w&sslmode=require"
    env, conninfo = procs.libpq_env(run_for(url), "backup")
    assert env["PGPASSWORD"] == "p w" and "p w" not in conninfo and "password" not in conninfo
    assert conninfo == "host='h' port='5433' user='u' dbname='d' sslmode='require'"
    with pytest.raises(ConfigError, match="sslpassword"):
        procs.libpq_env(run_for("postgresql://u@h/d?sslpassword=secret&sslkey=/k"), "backup")
