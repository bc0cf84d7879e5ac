"""Shared test setup. Keep caches out of /tmp (see shared notes) and under the test session's dir."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The session-wide local S3 server and its fixtures (s3_server, s3_env, s3_url).
pytest_plugins = ["tests.s3_fixtures"]


@pytest.fixture(scope="session")
def staging_root(tmp_path_factory):
    """S3 staging folders (S3Storage.staging_dir) of this session, its subprocesses included, go here, not
    into the shared /tmp."""
    root = str(tmp_path_factory.mktemp("staging"))
    old = os.environ.get("SHARDGEN_STAGING_DIR")
    os.environ["SHARDGEN_STAGING_DIR"] = root
    yield root
    if old is None:
        os.environ.pop("SHARDGEN_STAGING_DIR", None)
    else:
        os.environ["SHARDGEN_STAGING_DIR"] = old


@pytest.fixture(autouse=True)
def no_staging_left_behind(staging_root):
    """Whatever makes a staging folder removes it, on failure too: a test that leaves one fails."""
    before = set(os.listdir(staging_root))
    yield
    left = sorted(set(os.listdir(staging_root)) - before)
    assert not left, f"S3 staging folder(s) left behind in {staging_root}: {left}"
