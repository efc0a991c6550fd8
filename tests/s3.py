"""A real S3-protocol server for the tests: moto's standalone server (moto[server]) on a free port of 127.0.0.1,
started and stopped by the tests, never the internet.

    def test_x_s3(s3):                   # conftest's fixture: endpoint set in the environment, one fresh bucket
        root = s3.upload(local_dir, "logs")   # -> "s3://<bucket>/logs"
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server in a child process; `env` is what a client needs to reach it."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the moto S3 server did not start on {self.endpoint}")
                time.sleep(0.1)

    def check_credentials(self, on: bool) -> None:
        """Make the server check keys (moto accepts any by default): then only keys of its IAM users pass."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0" if on else b"inf",
                                         method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=5).read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class Bucket:
    """A fresh bucket on the server, with the environment pointed at it."""

    def __init__(self, server: S3Server):
        import boto3

        self.server, self.name = server, f"t-{uuid.uuid4().hex[:12]}"
        self.client = boto3.client("s3", endpoint_url=server.endpoint, **_keys())
        self.client.create_bucket(Bucket=self.name)
        self.url = f"s3://{self.name}"

    def upload(self, local: Path, prefix: str) -> str:
        """Every file under `local` to s3://bucket/prefix/<same relative path>; returns that location."""
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                self.client.upload_file(str(path), self.name, f"{prefix}/{path.relative_to(local).as_posix()}")
        return f"{self.url}/{prefix}"

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)


def _keys() -> dict:
    return {"aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"], "region_name": "us-east-1"}


def set_env(env: dict, monkeypatch) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
