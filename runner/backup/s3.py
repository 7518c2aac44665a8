"""S3 access for backups: a bounded client, calls that log while they wait, manifests, listings.

Credentials, region and endpoint come from boto3's default chain (AWS_ENDPOINT_URL_S3, web
identity / IRSA, instance roles); nothing here reads them itself.

A hung endpoint (a stopped process keeps its connections open) must neither hold the migration
lock silently nor outlive RUN_DEADLINE: every request has S3_TIMEOUT to connect and per read,
at most ATTEMPTS attempts, no new attempt once the run is cancelled, and `call()` runs it off
the main thread so the runner logs while it waits and stops on a signal or the deadline.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions

from runner.backup.layout import MANIFEST_SUFFIX, Location, database_of_folder
from runner.backup.manifest import BadManifest, newest, parse
from runner.config import Settings
from runner.errors import BackupFailed
from runner.redact import redact

if TYPE_CHECKING:
    from runner.cancellation import Cancel
    from runner.context import Run

__all__ = ["MANIFEST_SUFFIX", "Location"]
ATTEMPTS = 3  # per request, the first included (botocore standard retry mode)
STALE_UPLOAD_AGE = dt.timedelta(hours=24)  # older incomplete uploads under our prefix are ours, dead
S3_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)
T = TypeVar("T")


class Cancelled(Exception):
    """Raised inside botocore when the run is cancelled: no new attempt starts."""


def client(settings: Settings, cancel: Cancel | None = None) -> Any:
    """Create an S3 client: configured checksum policy, S3_TIMEOUT per connect and read,
    ATTEMPTS attempts per request, none once cancel is set."""
    cfg = botocore.config.Config(
        request_checksum_calculation=settings.backup_checksum,
        response_checksum_validation=settings.backup_checksum,
        retries={"mode": "standard", "total_max_attempts": ATTEMPTS},
        connect_timeout=settings.s3_timeout, read_timeout=settings.s3_timeout,
        max_pool_connections=16,
    )
    s3 = boto3.session.Session().client("s3", config=cfg)
    if cancel is not None:
        def stop_when_cancelled(event_name: str = "", **_: Any) -> None:
            # an abort still goes out: it is what removes a cancelled upload's parts (and so
            # does a delete: it removes the files a cancelled parallel dump had stored)
            if cancel.is_set and not event_name.endswith((".AbortMultipartUpload", ".DeleteObject")):
                raise Cancelled("the run was cancelled")

        s3.meta.events.register("before-send.s3", stop_when_cancelled)
    return s3


class Requests:
    """The S3 requests waiting for an answer (one per thread at a time) and since when, retries
    included: a hung endpoint shows as an old request, a slow pg_dump as none."""

    def __init__(self, s3: Any, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.started: dict[int, float] = {}
        s3.meta.events.register("before-send.s3", self._sent)
        s3.meta.events.register("response-received.s3", self._answered)

    def _sent(self, **_: Any) -> None:
        self.started.setdefault(threading.get_ident(), self.clock())  # a retry keeps the first

    def _answered(self, exception: BaseException | None = None, **_: Any) -> None:
        if exception is None:
            self.started.pop(threading.get_ident(), None)

    def oldest(self) -> float:
        """Seconds the oldest request in flight has waited (0 when none is)."""
        started = list(self.started.values())
        return self.clock() - min(started) if started else 0.0


def wait_log_every(settings: Settings) -> float:
    """Seconds between 'still waiting for S3' lines: half of S3_TIMEOUT, between 1 s and 5 s."""
    return max(1.0, min(5.0, settings.s3_timeout / 2))


def call(run: Run, what: str, fn: Callable[[], T]) -> T:
    """Return fn() (one S3 operation); log every few seconds while it has not answered; raise
    the run's cancellation (signal, deadline) at once instead of waiting for the request."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name="s3-call", daemon=True).start()
    t0, every = run.clock(), wait_log_every(run.settings)
    next_log = t0 + every
    while not done.wait(0.2):
        run.cancel.check()
        if run.clock() >= next_log:
            next_log += every
            run.log.warning("s3.waiting", f"S3 has not answered {what} for "
                            f"{run.clock() - t0:.0f}s; still waiting",
                            s3_timeout_s=run.settings.s3_timeout, attempts=ATTEMPTS)
    run.cancel.check()
    if "error" in box:
        raise box["error"]
    return box["value"]


def describe(exc: BaseException, where: str) -> str:
    """Return one line saying what S3 refused and what to check."""
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        hint = {
            "NoSuchBucket": "create the bucket or fix BACKUP_S3_URI",
            "404": "create the bucket or fix BACKUP_S3_URI",
            "InvalidAccessKeyId": "check the AWS credentials (access key unknown)",
            "SignatureDoesNotMatch": "check the AWS credentials (secret key wrong)",
            "AccessDenied": "grant s3:PutObject, s3:GetObject, s3:ListBucket and "
                            "s3:AbortMultipartUpload on the prefix",
            "403": "check the AWS credentials and the bucket policy",
        }.get(str(code), "check BACKUP_S3_URI, the credentials and the endpoint")
        return redact(f"S3 {code} on {where}: {err.get('Message') or code}; {hint}")
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return ("no AWS credentials found: use IRSA / Pod Identity, or set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY")
    endpoint = _endpoint(exc)
    if _timed_out(exc):  # a hung endpoint: a read, a connect or a request body that never got through
        return redact(f"S3 did not answer {where} within S3_TIMEOUT ({ATTEMPTS} attempts): the "
                      f"endpoint {endpoint} is hung or overloaded; check it (AWS_ENDPOINT_URL_S3) "
                      "and the network, or raise S3_TIMEOUT")
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return redact(f"S3 unreachable: cannot connect to {endpoint}; check AWS_ENDPOINT_URL_S3, "
                      "AWS_DEFAULT_REGION and the network")
    return redact(f"S3 error on {where} ({type(exc).__name__}: {exc}): check BACKUP_S3_URI and the "
                  f"endpoint {endpoint}")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """exc and what it wraps: botocore's `error`, s3transfer's `last_exception`, the exception
    arguments (urllib3's ProtocolError carries the socket's timeout) and the cause chain."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo += [getattr(item, "kwargs", {}).get("error"), getattr(item, "last_exception", None),
                 item.__cause__, item.__context__, *item.args]


def _timed_out(exc: BaseException) -> bool:
    return any(isinstance(e, TimeoutError | botocore.exceptions.ReadTimeoutError
                          | botocore.exceptions.ConnectTimeoutError) for e in _causes(exc))


def _endpoint(exc: BaseException) -> str:
    """scheme://host:port of the S3 endpoint exc is about, or a description of where it is set."""
    for e in _causes(exc):
        parts = urlsplit(str(getattr(e, "kwargs", {}).get("endpoint_url") or ""))
        if parts.hostname:
            port = f":{parts.port}" if parts.port else ""
            return f"{parts.scheme}://{parts.hostname}{port}"
        pool = getattr(e, "pool", None)  # urllib3's own errors (s3transfer passes them on)
        if getattr(pool, "host", None):
            return f"{pool.scheme}://{pool.host}:{pool.port}"
    return "(AWS_ENDPOINT_URL_S3, or AWS's for the bucket's region)"


def check_access(run: Run, s3: Any, loc: Location, database: str) -> None:
    """Fail fast (before pg_dump starts) when the bucket is missing or the credentials are wrong."""
    where = loc.uri(loc.database_prefix(database))
    try:
        # no MaxKeys=1: a truncated listing makes some S3-compatible stores build a continuation
        # token, and at least one (s3rver on Node 20) fails there with a 500
        call(run, f"listing {where}", lambda: s3.list_objects_v2(
            Bucket=loc.bucket, Prefix=loc.database_prefix(database), Delimiter="/"))
    except S3_ERRORS as exc:
        raise BackupFailed(describe(exc, where)) from None


def backups(run: Run, s3: Any, loc: Location, database: str) -> list[dict[str, Any]]:
    """Return the database's committed backups (a valid manifest in its own folder), newest first.

    A manifest that fails its checks is skipped with a warning naming its key: one bad file
    must not hide every other backup of the database.
    """
    prefix = loc.database_prefix(database)
    found = []
    try:
        keys = call(run, f"listing {loc.uri(prefix)}", lambda: [
            o["Key"] for o in _level(s3, loc.bucket, prefix)["Contents"]
            if o["Key"].endswith(MANIFEST_SUFFIX)])
        for key in keys:
            try:
                found.append(read_manifest(run, s3, loc, key, database))
            except BadManifest as exc:
                run.log.warning("backup.manifest", f"skipping {loc.uri(key)}: {exc}", key=key)
    except S3_ERRORS as exc:
        raise BackupFailed(describe(exc, loc.uri(prefix))) from None
    return newest(found)


def databases(run: Run, s3: Any, loc: Location) -> list[str]:
    """Return the databases with a folder directly under the prefix."""
    try:
        folders = call(run, f"listing {loc.uri(loc.root)}",
                       lambda: _level(s3, loc.bucket, loc.root)["CommonPrefixes"])
    except S3_ERRORS as exc:
        raise BackupFailed(describe(exc, loc.uri(loc.root))) from None
    names = (database_of_folder(p[len(loc.root):].rstrip("/")) for p in folders)
    return sorted(n for n in names if n is not None)


def sizes(run: Run, s3: Any, loc: Location, prefix: str) -> dict[str, int]:
    """Return {name: size} of the objects directly below prefix (a directory-format dump's files)."""
    found = call(run, f"listing {loc.uri(prefix)}", lambda: _level(s3, loc.bucket, prefix)["Contents"])
    return {o["Key"][len(prefix):]: o["Size"] for o in found}


def read_manifest(run: Run, s3: Any, loc: Location, key: str, database: str | None = None) -> dict[str, Any]:
    """Read and check the manifest at key; raise BadManifest, or botocore's error."""
    body = call(run, f"reading {loc.uri(key)}",
                lambda: s3.get_object(Bucket=loc.bucket, Key=key)["Body"].read())
    return parse(body, key, loc, database)


def write_manifest(run: Run, s3: Any, loc: Location, manifest: dict[str, Any]) -> str:
    """Write the manifest next to the dump: the backup exists from this moment on."""
    key = manifest["key"] + MANIFEST_SUFFIX
    body = json.dumps(manifest, indent=2, ensure_ascii=False).encode()
    call(run, f"writing {loc.uri(key)}", lambda: s3.put_object(
        Bucket=loc.bucket, Key=key, ContentType="application/json", Body=body))
    return key


def sweep_stale_uploads(s3: Any, loc: Location, database: str, log: Any,
                        now: dt.datetime | None = None) -> int:
    """Abort incomplete multipart uploads in the database's folder older than a day (killed runs).

    A SIGKILLed or OOM-killed runner cannot abort its upload; the parts cost money until a
    lifecycle rule or this sweep removes them. Only the folder's own level: a deeper key belongs
    to someone else. Best effort: a missing permission only warns.
    """
    now = now or dt.datetime.now(dt.UTC)
    prefix = loc.database_prefix(database)
    aborted = 0
    try:
        pages = s3.get_paginator("list_multipart_uploads").paginate(Bucket=loc.bucket, Prefix=prefix)
        for page in pages:
            for up in page.get("Uploads", []):
                if "/" not in up["Key"][len(prefix):] and now - up["Initiated"] > STALE_UPLOAD_AGE:
                    s3.abort_multipart_upload(Bucket=loc.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    aborted += 1
    except S3_ERRORS as exc:
        log.warning("backup.sweep", f"could not sweep stale multipart uploads: {describe(exc, 'sweep')}")
        return 0
    if aborted:
        log("backup.sweep", f"aborted {aborted} stale incomplete upload(s) left by killed runs")
    return aborted


def _level(s3: Any, bucket: str, prefix: str) -> dict[str, list[Any]]:
    """List one level below prefix: the objects there and the folders (not their contents)."""
    contents: list[dict[str, Any]] = []
    folders: list[str] = []
    for page in _pages(s3, bucket, prefix):
        contents.extend(page.get("Contents", []))
        folders.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
    return {"Contents": contents, "CommonPrefixes": folders}


def _pages(s3: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    yield from s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
