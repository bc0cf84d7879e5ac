"""One local SeaweedFS S3 server for the whole test session (started on free ports, always stopped).

Tests ask for `s3_env` (the server, with AWS_* variables pointing at it and the user's own AWS
configuration hidden) or `s3_url` (a fresh empty bucket, as `s3://bucket/prefix`). If the server
cannot start, every S3 test fails with the tail of its log: nothing is skipped.
"""
from __future__ import annotations

import itertools
import os
import re
import secrets
import shutil

import pytest

from shards.s3server import AWS_VARS, S3Server, S3ServerError

_bucket_numbers = itertools.count()
_SESSION = secrets.token_hex(3)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(str(tmp_path_factory.mktemp("s3server")))
    try:
        server.start()
    except S3ServerError as e:
        pytest.fail(f"the local S3 server (SeaweedFS) did not start: {e}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


def s3_client_env(server: S3Server, isolated_dir: str) -> dict[str, str]:
    """os.environ for a client of `server` only: the user's ~/.aws and AWS_* settings are hidden."""
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARS and not k.startswith("SHARDGEN_S3_")}
    env.update(server.env())
    env["AWS_CONFIG_FILE"] = os.path.join(isolated_dir, "no-aws-config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.path.join(isolated_dir, "no-aws-credentials")
    env["SHARDGEN_S3_RETRY_BUDGET"] = "30"
    return env


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    if s3_server.pid() is None:  # a fault test that failed mid-way may have left it stopped
        s3_server.start()
    env = s3_client_env(s3_server, str(tmp_path))
    for k in list(os.environ):
        if k not in env:
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return s3_server


def bucket_name(test_name: str) -> str:
    """Unique to this test session too: an s3:// URL names a local staging folder (S3Storage.staging_dir),
    so the same test in two sessions on one machine (CI jobs, xdist workers) must not share a URL."""
    stem = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"t{next(_bucket_numbers)}-{_SESSION}-{stem}"


@pytest.fixture
def s3_url(s3_env, request) -> str:
    """A new, empty bucket for this test, as s3://<bucket>/data."""
    bucket = bucket_name(request.node.name)
    s3_env.create_bucket(bucket)
    return f"s3://{bucket}/data"


def upload_dir(local_root: str, url: str) -> None:
    """Copy a local dataset directory to `url` through S3Storage, the manifest last (as shardgen does)."""
    from shards.s3 import S3Storage
    st = S3Storage(url)
    names = sorted(os.listdir(local_root))
    try:
        for name in [n for n in names if n != "manifest.json"] + [n for n in names if n == "manifest.json"]:
            staged = os.path.join(st.staging_dir(), name)
            shutil.copyfile(os.path.join(local_root, name), staged)
            try:
                st.put_file(name, staged)
            finally:
                if os.path.exists(staged):  # a failed upload leaves it
                    os.unlink(staged)
    finally:
        st.close()
