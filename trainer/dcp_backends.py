"""How torch.distributed.checkpoint (DCP) writes and reads one checkpoint on each kind of Storage: the only part
of checkpointing that differs by backend. The protocol (discovery, retention, the train_state.json commit
marker, validation, the agreement between ranks) is trainer/checkpoint.py's, written once over Storage.

`dcp_backend(storage, d, threads)` picks the adapter, as `open_storage` picks the storage:
  - LocalDCP: DCP's own file system writer into a directory STEP.tmp, renamed to STEP once train_state.json is
    in it (a directory rename is atomic); files are checked against their CRC32s on load.
  - ObjectStoreDCP: DCP over the Storage (trainer/dcp_storage.py) straight into STEP/: there is no rename, so
    train_state.json, written last, is the only commit; CRC32s are not re-read on load (see checkpoint.py).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem

from shards.storage import LocalStorage, Storage, file_crc32
from trainer.dcp_storage import StorageFileSystem, StorageReader, StorageWriter, WriteGate, remove_stale_staging
from trainer.parallel import Dist

log = logging.getLogger("trainer.checkpoint")
STATE_NAME = "train_state.json"


class _RecordingFileSystem(FileSystem):
    """DCP's local file system, keeping every write error. With thread_count > 1, DCP (torch 2.13) drops
    the exceptions of its extra writer threads: the save returns, its metadata lacks the failed files,
    and only loading would find out. The caller reads `errors` after dcp.save instead.

    And when DCP's main writer thread fails, dcp.save raises without joining the others, which go on writing:
    abort() lets no new file start and waits for those being written, so that removing the failed save's
    directory does not race with them (it left STEP.tmp behind on a busy machine). Both by WriteGate."""

    def __init__(self):
        super().__init__()
        self.gate = WriteGate()

    @property
    def errors(self) -> list[str]:
        return self.gate.errors

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with self.gate.write(str(path), os.path.basename(str(path))):
            with super().create_stream(path, mode) as stream:
                yield stream

    def abort(self, timeout: float = 600.0) -> None:
        self.gate.abort(timeout)


def _dcp_writer(name: str) -> int | None:
    """The rank that wrote a file of DCP's: __<rank>_<n>.distcp; .metadata rank 0 (the coordinator)."""
    m = re.fullmatch(r"__(\d+)_\d+\.distcp", name)
    return int(m.group(1)) if m else 0 if name == ".metadata" else None


class LocalDCP:
    commits_by_rename = True  # a STEP/ directory is a checkpoint (whole, or damaged): STEP.tmp/ is the killed save
    verifies_crc = True

    def __init__(self, storage: LocalStorage, d: Dist, threads: int):
        self.storage, self.d, self.threads = storage, d, threads

    def remove_stale(self) -> None:
        pass

    def entries(self) -> dict[str, bool]:
        """{name: holds train_state.json} of every directory at the root."""
        root = self.storage.root
        names = os.listdir(root) if os.path.isdir(root) else []
        return {n: os.path.isfile(os.path.join(root, n, STATE_NAME)) for n in names
                if os.path.isdir(os.path.join(root, n))}

    def path(self, name: str) -> str:
        return os.path.join(self.storage.root, name)

    def staging(self, name: str) -> str:
        return name + ".tmp"

    def clear(self, name: str) -> None:
        self.remove(name)
        os.makedirs(self.path(name))

    def remove(self, name: str) -> None:
        self.storage.delete(f"{name}/{STATE_NAME}")  # first: never a complete-looking part of a checkpoint
        shutil.rmtree(self.path(name), ignore_errors=True)

    def save(self, state_dict: dict, name: str) -> tuple[dict, list[str]]:
        """DCP-save into NAME; (this rank's files {rel: size, crc32}, write errors DCP dropped). Collective."""
        writer = dcp.FileSystemWriter(self.path(name), thread_count=self.threads)
        writer.fs = fs = _RecordingFileSystem()
        try:
            dcp.save(state_dict, storage_writer=writer)
        except BaseException:
            fs.abort()
            raise
        if fs.errors:
            return {}, fs.errors
        # DCP's files only (top level): other ranks may be writing their RNG files under rng/ meanwhile
        mine = [n for n in os.listdir(self.path(name)) if _dcp_writer(n) == self.d.rank]
        return self._describe(sorted(mine), name), []

    def _describe(self, rels: list[str], name: str) -> dict:
        """Size and CRC32 of files, in threads (zlib releases the GIL on large buffers)."""
        def one(rel):
            p = os.path.join(self.path(name), rel)
            return {"size": os.path.getsize(p), "crc32": file_crc32(p)}
        if len(rels) <= 1 or self.threads <= 1:
            return {rel: one(rel) for rel in rels}
        with ThreadPoolExecutor(min(self.threads, len(rels))) as pool:
            return dict(zip(rels, pool.map(one, rels)))

    def publish(self, staging: str, name: str) -> None:
        """STEP.tmp (train_state.json in it) -> STEP: the rename that makes a local checkpoint whole."""
        if os.path.exists(self.path(name)):  # a rerun that redid this step: replace
            self.remove(name)
        os.replace(self.path(staging), self.path(name))
        fd = os.open(self.storage.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load(self, state_dict: dict, name: str, sizes: dict[str, int]) -> None:
        dcp.load(state_dict, checkpoint_id=self.path(name))

    def crc32(self, name: str) -> int:
        return file_crc32(self.path(name))


class ObjectStoreDCP:
    commits_by_rename = False  # a STEP/ prefix without train_state.json is a killed save
    verifies_crc = False

    def __init__(self, storage: Storage, d: Dist, threads: int):
        self.storage, self.d, self.threads = storage, d, threads

    def remove_stale(self) -> None:
        """The staged uploads of processes of this machine killed mid-save (only of processes no longer running)."""
        try:
            if remove_stale_staging(self.storage):
                log.info("removed the staged files of earlier processes killed while saving to %s", self.storage)
        except OSError as e:
            log.warning("could not clean the staging folder for %s (%s)", self.storage, e)

    def entries(self) -> dict[str, bool]:
        """{name: holds train_state.json} of every top-level prefix, from one listing."""
        out: dict[str, bool] = {}
        for name, _ in self.storage.list_sizes(""):
            top, slash, rest = name.partition("/")
            if slash:
                out[top] = out.get(top, False) or rest == STATE_NAME
        return out

    def path(self, name: str) -> str:
        return self.storage.where(name)

    def staging(self, name: str) -> str:
        return name  # no rename in an object store: train_state.json, written last, is the commit

    def clear(self, name: str) -> None:
        self.remove(name)

    def remove(self, name: str) -> None:
        """Delete every object under NAME/, its train_state.json first, so that a prefix is never a
        complete-looking checkpoint with objects missing."""
        names = [n for n, _ in self.storage.list_sizes(name + "/")]
        state = f"{name}/{STATE_NAME}"
        if state in names:
            self.storage.delete(state)
        rest = [n for n in names if n != state]
        if len(rest) <= 1 or self.threads <= 1:
            for n in rest:
                self.storage.delete(n)
            return
        with ThreadPoolExecutor(min(self.threads * 2, len(rest))) as pool:
            list(pool.map(self.storage.delete, rest))

    def save(self, state_dict: dict, name: str) -> tuple[dict, list[str]]:
        fs = StorageFileSystem(self.storage)
        try:  # collective: DCP gathers every rank's write result and raises the same error on all ranks
            dcp.save(state_dict, storage_writer=StorageWriter(self.path(name), fs, thread_count=self.threads))
        except BaseException:
            fs.abort()  # DCP's other writer threads may still be uploading: stop and wait for them first
            if self.d.distributed:  # DCP raised on every rank: all are here; clean up once all have stopped
                dist.barrier()
            raise
        fs.discard_staged()
        if fs.errors:  # DCP's writer threads other than the first drop their errors: fs has them
            return {}, ["upload failed: " + "; ".join(fs.errors[:3]) +
                        (f" (+{len(fs.errors) - 3} more)" if len(fs.errors) > 3 else "")]
        return {n[len(name) + 1:]: info for n, info in fs.written.items()}, []

    def publish(self, staging: str, name: str) -> None:
        pass

    def load(self, state_dict: dict, name: str, sizes: dict[str, int]) -> None:
        fs = StorageFileSystem(self.storage)
        fs.sizes = {f"{name}/{rel}": size for rel, size in sizes.items()}  # from check()'s listing: no HEADs
        dcp.load(state_dict, storage_reader=StorageReader(self.path(name), fs))

    def crc32(self, name: str) -> int:
        raise NotImplementedError("CRC32s are not re-read from object storage")


def dcp_backend(storage: Storage, d: Dist, threads: int):
    """The DCP adapter for `storage` (from open_storage): LocalDCP for a directory, ObjectStoreDCP otherwise."""
    if isinstance(storage, LocalStorage):
        return LocalDCP(storage, d, threads)
    return ObjectStoreDCP(storage, d, threads)
