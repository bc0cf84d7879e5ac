"""Shared test setup. Keep caches out of /tmp (see shared notes) and under the test session's dir."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The session-wide local S3 server and its fixtures (s3_server, s3_env, s3_url).
pytest_plugins = ["tests.s3_fixtures"]
