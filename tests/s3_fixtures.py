"""pytest fixtures (registered in conftest.py via pytest_plugins): a real S3 server on loopback.

moto's server mode speaks the S3 HTTP protocol; the runner reaches it through the standard
AWS_ENDPOINT_URL_S3 variable, exactly as it would reach any S3-compatible store.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.pgcluster import free_port

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key-s3"
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str
    client: Any = field(repr=False)

    def env(self, **extra: str) -> dict[str, str]:
        """Return the AWS variables that point the runner at this server."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
                "AWS_EC2_METADATA_DISABLED": "true", **extra}

    def create_bucket(self) -> str:
        name = f"backups-{uuid.uuid4().hex[:10]}"
        self.client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(o["Key"] for p in pages for o in p.get("Contents", []))

    def uploads(self, bucket: str) -> list[dict[str, Any]]:
        return self.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY, region_name=REGION)


@contextlib.contextmanager
def moto_s3(request_log: int = logging.WARNING) -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1, in this process, until the block ends (tests and demo)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(request_log)  # one line per request drowns the output
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        yield S3Server(endpoint, s3_client(endpoint))
    finally:
        server.stop()


@contextlib.contextmanager
def moto_process(env: dict[str, str] | None = None) -> Iterator[str]:
    """moto's S3 server in a process of its own on 127.0.0.1; yield its endpoint once it listens."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 for the whole session."""
    with moto_s3() as server:
        yield server


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket for one test."""
    return s3_server.create_bucket()


@dataclass
class AuthS3:
    """An S3 server that checks credentials (moto with IAM auth on) and one valid key pair."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str


@pytest.fixture(scope="session")
def auth_s3_server() -> Iterator[AuthS3]:
    """A second moto server, in its own process, that enforces signatures after setup."""
    import boto3  # like s3_client: only for the tests that use S3

    # the first 4 requests (user, key, policy, bucket) are unauthenticated; then auth is enforced
    with moto_process({"INITIAL_NO_AUTH_ACTION_COUNT": "4", "PATH": "/usr/bin:/bin"}) as endpoint:

        def mk(svc: str, key: str = "setup", secret: str = "setup") -> Any:
            return boto3.session.Session().client(svc, endpoint_url=endpoint, region_name=REGION,
                                                  aws_access_key_id=key, aws_secret_access_key=secret)

        iam = mk("iam")
        iam.create_user(UserName="runner")
        key = iam.create_access_key(UserName="runner")["AccessKey"]
        iam.put_user_policy(UserName="runner", PolicyName="all", PolicyDocument=(
            '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}'))
        mk("s3").create_bucket(Bucket="auth-backups")
        yield AuthS3(endpoint, key["AccessKeyId"], key["SecretAccessKey"], "auth-backups")
