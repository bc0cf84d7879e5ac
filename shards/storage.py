"""Storage: a local directory or an s3:// prefix behind one small interface.

Names are relative to the root ("manifest.json", "00000-000.tar"). Writes are atomic: a reader
sees a whole object or none (local: write a temporary name, then rename; S3: a PUT is atomic).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import zlib
from urllib.parse import urlparse

from shards.errors import UserError


class StorageError(UserError):
    """An object that cannot be read or written. The message names it and says what to do."""


class S3ConfigError(StorageError, ValueError):
    """A bad s3:// URL or SHARDGEN_S3_* setting: a StorageError, so the CLIs print it as an error line."""


class Storage:
    url: str
    # Concurrent block reads a reader should keep in flight: a remote store waits on latency, so many.
    fetch_concurrency = 16

    def __str__(self) -> str:
        return self.url

    def where(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"

    # --- reading
    def exists(self, name: str) -> bool: raise NotImplementedError
    def size(self, name: str) -> int: raise NotImplementedError
    def read(self, name: str) -> bytes: raise NotImplementedError
    def read_range(self, name: str, offset: int, length: int) -> bytes: raise NotImplementedError
    def list(self, prefix: str = "") -> list[str]: raise NotImplementedError

    def list_sizes(self, prefix: str = "") -> list[tuple[str, int]]:
        """(name, size) of every object under `prefix`, sorted; stores whose listing carries sizes
        override it, so listing N inputs is not N more requests."""
        return [(n, self.size(n)) for n in self.list(prefix)]

    # --- writing
    def put_bytes(self, name: str, data: bytes) -> None: raise NotImplementedError
    def put_file(self, name: str, local_path: str) -> None:
        """Publish a finished local file under `name`, atomically; the local file is consumed."""
        raise NotImplementedError
    def delete(self, name: str) -> None: raise NotImplementedError

    def staging_dir(self) -> str:
        """A local directory for files being built before put_file (same filesystem when local)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalStorage(Storage):
    fetch_concurrency = 4  # local reads are CPU-bound (decompression): about the cores a rank can spare
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.url = self.root
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def exists(self, name):
        return os.path.exists(self._path(name))

    def size(self, name):
        try:
            return os.path.getsize(self._path(name))
        except FileNotFoundError:
            raise StorageError(f"{self.where(name)}: no such file") from None

    def read(self, name):
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise StorageError(f"{self.where(name)}: no such file") from None
        except OSError as e:
            raise StorageError(f"{self.where(name)}: cannot read ({e.strerror})") from None

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            with self._lock:
                fd = self._fds.get(name)
                if fd is None:
                    try:
                        fd = os.open(self._path(name), os.O_RDONLY)
                    except FileNotFoundError:
                        raise StorageError(f"{self.where(name)}: no such file (deleted after the manifest "
                                           f"was written? regenerate the shards)") from None
                    self._fds[name] = fd
        return fd

    def read_range(self, name, offset, length):
        data = os.pread(self._fd(name), length, offset)  # thread-safe: no shared file position
        if len(data) != length:
            raise StorageError(f"{self.where(name)}: short read at bytes {offset}-{offset + length - 1} "
                               f"(got {len(data)} of {length}; truncated shard? run `python -m shardgen verify`)")
        return data

    def list(self, prefix=""):
        out = []
        for dirpath, _, files in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            for f in files:
                name = f if rel == "." else os.path.join(rel, f)
                if name.startswith(prefix):
                    out.append(name)
        return sorted(out)

    def put_bytes(self, name, data):
        path = self._path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(name)}.", suffix=".tmp", dir=os.path.dirname(path))
        try:
            os.fchmod(fd, 0o644)  # mkstemp makes 0600; a dataset is read by other users and processes too
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            unlink_quiet(tmp)
            raise

    def put_file(self, name, local_path):
        path = self._path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.replace(local_path, path)
        except OSError:  # another filesystem: copy beside the target, then rename
            tmp = path + f".{os.getpid()}.tmp"
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, path)
            os.unlink(local_path)

    def delete(self, name):
        unlink_quiet(self._path(name))

    def staging_dir(self):
        os.makedirs(self.root, exist_ok=True)
        return self.root

    def close(self):
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def unlink_quiet(path: str) -> None:
    """Remove a file that may already be gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def file_crc32(path: str) -> int:
    """CRC32 of a file, read 8 MiB at a time (zlib releases the GIL on large buffers)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    u = urlparse(str(url))
    if "@" in u.netloc or ":" in u.netloc:  # never echo what may be a secret
        shown = f"s3://***@{u.netloc.rsplit('@', 1)[-1]}{u.path}"
        raise S3ConfigError(f"{shown}: put credentials in AWS_* variables or a profile, not in the URL")
    if u.scheme != "s3" or not u.netloc:
        raise S3ConfigError(f"{url!r} is not an s3://bucket/prefix URL")
    return u.netloc, u.path.lstrip("/")
