"""One shardgen run at a time per output (per node of a multi-node build): a second run into the
same output would clear, rewrite or remove the first one's files under it.

Local: an flock on OUT/.shardgen.lock, which names the holder; the kernel drops it when the process
dies, so a killed run never leaves a stale lock. The file is removed at the end of the run.

S3: a lease object OUT/.shardgen.lock (JSON: the run's identity, a token, when it was last renewed),
renewed every HEARTBEAT_SECONDS by a thread and deleted at the end. A lease not renewed for
LEASE_SECONDS belongs to a dead run and is taken over; `--break-lock` takes over a fresh one (only
for a run you know is dead). Two runs starting within the same instant may both see no lease (S3
has no create-if-absent we can rely on everywhere); the renewal notices and the loser stops.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager

from shardgen.output import BuildError, canonical_json
from shards.storage import LocalStorage, Storage, StorageError, unlink_quiet

LOCK_NAME = ".shardgen.lock"
LEASE_SECONDS = 300.0
HEARTBEAT_SECONDS = 30.0


def lock_name(node_rank: int, num_nodes: int) -> str:
    return LOCK_NAME if num_nodes == 1 else f".shardgen-node{node_rank}.lock"


def run_identity() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"


@contextmanager
def output_lock(storage: Storage, name: str = LOCK_NAME, break_lock: bool = False, log=None):
    """Hold the output for this run; refuse (BuildError naming the holder) if another run holds it.
    Yields the S3 lease (None for a local lock)."""
    if isinstance(storage, LocalStorage):
        with _flock(storage.root, name):
            yield
    else:
        with _Lease(storage, name, break_lock, log) as lease:
            yield lease


@contextmanager
def _flock(root: str, name: str):
    if os.path.exists(root) and not os.path.isdir(root):
        raise BuildError(f"--output {root} is a file, not a directory: choose another --output")
    path = os.path.join(root, name)
    try:
        os.makedirs(root, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise BuildError(f"{root}: another shardgen run is writing to it ({holder}); wait for it to "
                                 f"end or stop it, or choose another --output") from None
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the run before removed the file as we locked it: lock the new one
    except OSError as e:
        raise BuildError(f"--output {root}: cannot write there ({e.strerror}): choose another --output or "
                         f"fix its permissions") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, run_identity().encode() + b"\n", 0)
        yield
    finally:
        unlink_quiet(path)  # while still locked: a run waiting on this file sees it gone and takes a new one
        os.close(fd)


class _Lease:
    def __init__(self, storage: Storage, name: str, break_lock: bool, log):
        self.storage, self.name, self.break_lock, self.log = storage, name, break_lock, log
        self.token = uuid.uuid4().hex
        self.identity = run_identity()
        self.lost: str | None = None  # the run that took the lease from us, if one did
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._renew, daemon=True, name="shardgen-lease")

    def _read(self) -> dict | None:
        if not self.storage.exists(self.name):
            return None
        try:
            data = self.storage.read(self.name)
        except StorageError:
            if self.storage.exists(self.name):
                raise
            return None  # deleted between the two calls
        try:
            lease = json.loads(data)
        except ValueError:
            return None  # not a lease of ours: no valid lease
        return lease if isinstance(lease, dict) else None

    def _write(self) -> None:
        self.storage.put_bytes(self.name, canonical_json(
            {"run": self.identity, "token": self.token, "renewed": time.time()}))

    def __enter__(self):
        where = self.storage.where(self.name)
        old = self._read()
        if old is not None:
            age = time.time() - float(old.get("renewed", 0))
            holder = f"{old.get('run', 'unknown run')}, renewed {age:.0f} s ago"
            if age < LEASE_SECONDS and not self.break_lock:
                raise BuildError(f"{self.storage}: another shardgen run holds its lease {where} ({holder}); wait "
                                 f"for it to end or stop it. If that run is dead, rerun with --break-lock, or "
                                 f"wait: a lease not renewed for {LEASE_SECONDS:.0f} s expires")
            if self.log is not None:
                why = "--break-lock" if age < LEASE_SECONDS else "expired"
                print(f"shardgen: taking over the lease {where} ({why}; held by {holder})", file=self.log)
        self._write()
        if (self._read() or {}).get("token") != self.token:
            raise BuildError(f"{self.storage}: another shardgen run took the lease {where} at the same time; "
                             f"wait for it to end or stop it")
        self.thread.start()
        return self

    def _renew(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            try:
                lease = self._read()
                if lease is None or lease.get("token") != self.token:
                    self.lost = f"taken over by {lease.get('run', 'another run')}" if lease else "deleted"
                    return
                self._write()
            except Exception:  # noqa: BLE001 - a failed renewal is retried at the next beat
                continue

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        if self.lost is None and (self._read() or {}).get("token") == self.token:
            self.storage.delete(self.name)
        elif exc[0] is None:
            raise BuildError(f"{self.storage}: this run's lease {self.storage.where(self.name)} was "
                             f"{self.lost or 'taken over'} while it ran: another run may have mixed its files with "
                             f"this one's; stop it, then rerun this one to check and finish the output")
        return False
