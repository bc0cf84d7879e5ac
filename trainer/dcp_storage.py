"""torch.distributed.checkpoint (DCP) over the project's Storage (shards/storage.py), for checkpoints in S3.

DCP's FileSystemWriter / FileSystemReader take every file operation from a `FileSystemBase`; this one maps
them onto a Storage rooted at the checkpoint directory (`s3://bucket/prefix`):

    create_stream(path, "wb")  a local temporary file (a real file: DCP calls tell() and fsync(fileno()));
                               on close it gets a CRC32 and is uploaded with Storage.put_file (S3Storage: a
                               verified SHA-256 multipart upload), then removed. Names ending in ".tmp" (DCP's
                               `.metadata.tmp`) stay staged until rename() uploads them under the final name:
                               no copy and delete in the store.
    create_stream(path, "rb")  a seekable stream over ranged GETs (Storage.read_range): small reads from aligned
                               1 MiB blocks, the last 8 kept (DCP reads item by item; each item's torch.load reads
                               its start, its end, its start again, then its data: without the blocks kept each
                               item would cost several GETs); a read of a block or more goes straight to one GET
                               (up to 64 MiB) for the bytes no kept block holds. In file order, every byte a
                               rank needs is fetched about once.
    rename                     the upload of a staged ".tmp" file (else read + put + delete)
    mkdir                      nothing (object stores have no directories)

Staged files live in Storage.staging_dir()/ckpt-<pid> (SHARDGEN_STAGING_DIR, else the system temp dir): a rank needs
local space for its share of a checkpoint while it uploads. A process killed mid-save leaves its folder; the next
Checkpointer on that machine removes the folders of processes that no longer run (remove_stale_staging).

Every upload made and every upload that failed is recorded (`written`, `errors`): DCP's writer threads other
than the first drop their exceptions, so the Checkpointer asks `errors` after dcp.save instead of trusting it.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, FileSystemWriter

from shards.rangefile import RangeFile
from shards.storage import Storage, file_crc32, is_s3, unlink_quiet

BLOCK = 1 << 20  # bytes per ranged GET for small reads, aligned
BLOCKS_KEPT = 8  # per open stream
MAX_GET = 64 << 20  # the largest single ranged GET for one large read


class WriteGate:
    """The writes of one DCP save, across DCP's writer threads: how many are under way, the errors of those that
    failed (DCP's writer threads other than the first drop their exceptions: the caller reads `errors` after
    dcp.save), and abort() after a failed save: no write starts after it, and it waits for those under way
    (DCP's main writer thread returns from a failure without joining the others, which would go on writing
    after the failed save's files were removed)."""

    def __init__(self):
        self.errors: list[str] = []  # "name: error" of each failed write
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._writing = 0
        self._aborted = False

    def check(self, what: str) -> None:
        with self._lock:
            self._refuse_if_aborted(what)

    def _refuse_if_aborted(self, what: str) -> None:  # under self._lock
        if self._aborted:
            raise OSError(f"{what}: not written: this save failed already")

    def failed(self, name: str, e: BaseException) -> None:
        with self._lock:
            self.errors.append(f"{name}: {type(e).__name__}: {e}")

    @contextmanager
    def write(self, what: str, name: str):
        """One write: refused (OSError naming `what`) after abort(); its error recorded under `name`."""
        with self._lock:
            self._refuse_if_aborted(what)
            self._writing += 1
        try:
            yield
        except BaseException as e:
            self.failed(name, e)
            raise
        finally:
            with self._lock:
                self._writing -= 1
                self._idle.notify_all()

    def abort(self, timeout: float = 600.0) -> None:
        with self._lock:
            self._aborted = True
            self._idle.wait_for(lambda: self._writing == 0, timeout)


class StorageFileSystem(FileSystemBase):
    """DCP file operations on `storage`; paths are `<storage.url>/<name>` strings."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.root = storage.url.rstrip("/")
        self.written: dict[str, dict] = {}  # name -> {"size", "crc32"} of each finished upload
        self.gate = WriteGate()  # the uploads under way and the errors of those that failed
        self.sizes: dict[str, int] = {}  # known object sizes (from a listing), to skip a HEAD per read
        self._staged: dict[str, str] = {}  # ".tmp" name -> local file, uploaded by rename()
        self._lock = threading.Lock()  # written, _staged

    @property
    def errors(self) -> list[str]:
        return self.gate.errors

    def name(self, path) -> str:
        path = str(path)
        if not path.startswith(self.root + "/"):
            raise ValueError(f"{path} is not under {self.root}")
        return path[len(self.root) + 1:]

    def _stage_file(self, name: str) -> str:
        folder = staging_folder(self.storage)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(name)}.", suffix=".part", dir=folder)
        os.close(fd)
        return tmp

    @contextmanager
    def create_stream(self, path, mode: str):
        name = self.name(path)
        if "r" in mode and "+" not in mode:
            size = self.sizes.get(name)
            if size is None:
                size = self.storage.size(name)
            raw = RangeFile(self.storage, name, size, block=BLOCK, blocks_kept=BLOCKS_KEPT, max_get=MAX_GET)
            with io.BufferedReader(raw, buffer_size=64 << 10) as f:
                yield f
            return
        if "w" not in mode:
            raise ValueError(f"{path}: mode {mode!r} is not supported on {self.root} (write whole objects)")
        local = None
        with self.gate.write(f"{self.root}/{name}", name):
            try:
                local = self._stage_file(name)
                with open(local, mode) as f:
                    yield f
                if name.endswith(".tmp"):
                    with self._lock:
                        self._staged[name] = local
                    return
                self.gate.check(f"{self.root}/{name}")  # not uploaded once the save failed
                self._upload(name, local)
            except BaseException:
                if local is not None:
                    unlink_quiet(local)
                raise

    def abort(self, timeout: float = 600.0) -> None:
        """After a failed save: start no more uploads, wait for those under way (WriteGate), drop staged files."""
        self.gate.abort(timeout)
        self.discard_staged()

    def _upload(self, name: str, local: str) -> None:
        info = {"size": os.path.getsize(local), "crc32": file_crc32(local)}
        self.storage.put_file(name, local)  # consumes the local file
        with self._lock:
            self.written[name] = info

    def concat_path(self, path, suffix: str) -> str:
        return f"{str(path).rstrip('/')}/{suffix}"

    def init_path(self, path) -> str:
        return str(path).rstrip("/")

    def rename(self, path, new_path) -> None:
        src, dst = self.name(path), self.name(new_path)
        with self._lock:
            local = self._staged.pop(src, None)
        try:
            if local is None:  # not staged here: copy through this process, then delete
                local = self._stage_file(dst)
                with open(local, "wb") as f:
                    f.write(self.storage.read(src))
                self._upload(dst, local)
                self.storage.delete(src)
            else:
                self._upload(dst, local)
        except BaseException as e:
            if local is not None:
                unlink_quiet(local)
            self.gate.failed(dst, e)
            raise

    def mkdir(self, path) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return not isinstance(checkpoint_id, Path) and is_s3(str(checkpoint_id))

    def exists(self, path) -> bool:
        name = self.name(path)
        with self._lock:
            if name in self._staged:
                return True
        return self.storage.exists(name)

    def rm_file(self, path) -> None:
        self.storage.delete(self.name(path))

    def ls(self, path) -> list[str]:
        prefix = self.name(path).rstrip("/") + "/"
        return [self.concat_path(self.root, n) for n in self.storage.list(prefix)]

    def discard_staged(self) -> None:
        """Drop staged files never renamed, and this process's staging folder once empty."""
        with self._lock:
            staged, self._staged = list(self._staged.values()), {}
        for local in staged:
            unlink_quiet(local)
        folder = staging_folder(self.storage)
        for empty in (folder, os.path.dirname(folder)):  # then the output's staging folder, if nothing else uses it
            try:
                os.rmdir(empty)
            except OSError:  # not there, or another thread or process is staging a file in it
                break


def staging_folder(storage: Storage, pid: int | None = None) -> str:
    """This process's folder for files on their way up: Storage.staging_dir()/ckpt-<pid> (one per process, so
    that the staged files of a process killed mid-save are known to be stale: see remove_stale_staging)."""
    return os.path.join(storage.staging_dir(), f"ckpt-{pid or os.getpid()}")


def remove_stale_staging(storage: Storage) -> list[str]:
    """Remove the staging folders of processes of this machine that no longer run (killed while saving: their
    staged files would otherwise stay, up to a rank's share of a checkpoint each). Returns what was removed."""
    base, removed = storage.staging_dir(), []
    for entry in os.listdir(base):
        m = re.fullmatch(r"ckpt-(\d+)", entry)
        if not m or _alive(int(m.group(1))):
            continue
        shutil.rmtree(os.path.join(base, entry), ignore_errors=True)
        removed.append(entry)
    try:
        os.rmdir(base)  # made by staging_dir() above: not left behind when empty
    except OSError:
        pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class StorageWriter(FileSystemWriter):
    """FileSystemWriter whose files go to a Storage (see StorageFileSystem)."""

    def __init__(self, path: str, fs: StorageFileSystem, thread_count: int = 1):
        super().__init__(path, single_file_per_rank=True, sync_files=False, thread_count=thread_count,
                         overwrite=True)
        self.fs = fs
        self.path = fs.init_path(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return StorageFileSystem.validate_checkpoint_id(checkpoint_id)


class StorageReader(FileSystemReader):
    """FileSystemReader whose files come from a Storage (see StorageFileSystem)."""

    def __init__(self, path: str, fs: StorageFileSystem):
        super().__init__(path)
        self.fs = fs
        self.path = fs.init_path(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return StorageFileSystem.validate_checkpoint_id(checkpoint_id)
