"""Which Storage serves a location: `s3://bucket/prefix` -> S3Storage, anything else a local directory.

Kept apart from storage.py (the interface and the local backend) so that nothing below imports upward:
storage <- s3 <- backends.
"""
from __future__ import annotations

from shards.storage import LocalStorage, Storage, is_s3


def open_storage(url: str) -> Storage:
    """`s3://bucket/prefix` -> S3Storage; anything else is a local directory."""
    url = str(url)
    if is_s3(url):
        from shards.s3 import S3Storage  # boto3 is imported only when S3 is used
        return S3Storage(url)
    return LocalStorage(url)
