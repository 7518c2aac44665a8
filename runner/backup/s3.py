"""S3 access for backups: client, key layout, manifests (the commit point), listing, sweeping.

Credentials, region and endpoint come from boto3's default chain (AWS_ENDPOINT_URL_S3, web
identity / IRSA, instance roles); nothing here reads them itself.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions

from runner.config import Settings
from runner.errors import BackupFailed
from runner.redact import redact

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_VERSION = 1
STALE_UPLOAD_AGE = dt.timedelta(hours=24)  # older incomplete uploads under our prefix are ours, dead


@dataclasses.dataclass(frozen=True)
class Location:
    bucket: str
    prefix: str  # no leading or trailing slash; may be ''

    @classmethod
    def parse(cls, uri: str) -> Location:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        return cls(bucket, prefix.strip("/"))

    def database_prefix(self, database: str) -> str:
        """Return the folder of one database's backups: PREFIX/DATABASE/."""
        return f"{self.prefix}/{database}/" if self.prefix else f"{database}/"

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def client(settings: Settings) -> Any:
    """Create an S3 client with the configured checksum policy and bounded retries."""
    cfg = botocore.config.Config(
        request_checksum_calculation=settings.backup_checksum,
        response_checksum_validation=settings.backup_checksum,
        retries={"mode": "standard", "max_attempts": 4},
        connect_timeout=5, read_timeout=60,
        max_pool_connections=16,
    )
    return boto3.session.Session().client("s3", config=cfg)


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
    if isinstance(exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError):
        parts = urlsplit(str(getattr(exc, "kwargs", {}).get("endpoint_url", "")))
        where = f"{parts.scheme}://{parts.netloc}" if parts.netloc else "the S3 endpoint"
        return redact(f"S3 unreachable: cannot connect to {where}; check AWS_ENDPOINT_URL_S3, "
                      "AWS_DEFAULT_REGION and the network")
    return redact(f"S3 error on {where} ({type(exc).__name__}: {exc}): check BACKUP_S3_URI, "
                  "the credentials and the endpoint")


def check_access(s3: Any, loc: Location, database: str) -> None:
    """Fail fast (before pg_dump starts) when the bucket is missing or the credentials are wrong."""
    try:
        s3.list_objects_v2(Bucket=loc.bucket, Prefix=loc.database_prefix(database), MaxKeys=1)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise BackupFailed(describe(exc, loc.uri(loc.database_prefix(database)))) from None


def manifests(s3: Any, loc: Location, database: str) -> list[dict[str, Any]]:
    """Return this database's committed backups (those with a manifest), newest first."""
    found = []
    try:
        for obj in _objects(s3, loc.bucket, loc.database_prefix(database)):
            if obj["Key"].endswith(MANIFEST_SUFFIX):
                found.append(read_manifest(s3, loc.bucket, obj["Key"]))
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise BackupFailed(describe(exc, loc.uri(loc.database_prefix(database)))) from None
    return sorted(found, key=lambda m: (m["created"], m["key"]), reverse=True)


def read_manifest(s3: Any, bucket: str, key: str) -> dict[str, Any]:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    data = json.loads(body)
    if data.get("manifest_version") != MANIFEST_VERSION or "sha256" not in data:
        raise BackupFailed(f"{key} is not a backup manifest this runner understands")
    return data


def write_manifest(s3: Any, loc: Location, manifest: dict[str, Any]) -> str:
    """Write the manifest next to the dump: the backup exists from this moment on."""
    key = manifest["key"] + MANIFEST_SUFFIX
    s3.put_object(Bucket=loc.bucket, Key=key, ContentType="application/json",
                  Body=json.dumps(manifest, indent=2, ensure_ascii=False).encode())
    return key


def sweep_stale_uploads(s3: Any, loc: Location, database: str, log: Any,
                        now: dt.datetime | None = None) -> int:
    """Abort incomplete multipart uploads under our prefix older than a day (killed runs).

    A SIGKILLed or OOM-killed runner cannot abort its upload; the parts cost money until a
    lifecycle rule or this sweep removes them. Best effort: a missing permission only warns.
    """
    now = now or dt.datetime.now(dt.UTC)
    aborted = 0
    try:
        pages = s3.get_paginator("list_multipart_uploads").paginate(
            Bucket=loc.bucket, Prefix=loc.database_prefix(database))
        for page in pages:
            for up in page.get("Uploads", []):
                if now - up["Initiated"] > STALE_UPLOAD_AGE:
                    s3.abort_multipart_upload(Bucket=loc.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    aborted += 1
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        log.warning("backup.sweep", f"could not sweep stale multipart uploads: {describe(exc, 'sweep')}")
        return 0
    if aborted:
        log("backup.sweep", f"aborted {aborted} stale incomplete upload(s) left by killed runs")
    return aborted


def _objects(s3: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])
