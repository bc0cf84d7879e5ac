"""Checkpoints: torch.distributed.checkpoint (DCP) for model + optimizer, JSON for the rest; atomic; keep-last-k.

Layout of one checkpoint, OUT/ckpt/step-000100/:
    .metadata, __<rank>_0.distcp   DCP: model and optimizer, sharded by whoever saved; DCP reshards on load,
                                   so a checkpoint loads into single / DDP / FSDP on any number of ranks
    rng/rank-00000.pt              each rank's RNG states (torch, cuda, python, numpy)
    train_state.json               step, loader state, skipped steps, and the size + CRC32 of every file above

Written under step-000100.tmp; once every rank has written, rank 0 writes train_state.json and renames the directory,
so a directory without `.tmp` is complete. A checkpoint that fails its checks or does not load is
reported by name and the previous one is used.

In object storage (checkpoint.dir = s3://bucket/prefix; `ObjectStoreCheckpointer`, DCP over shardgen's Storage
through trainer/dcp_storage.py) the layout is the same, s3://bucket/prefix/step-000100/..., but there is no
directory to rename. So:
  - rank 0 first deletes whatever a killed save, or the same step saved before a fallback, left under the
    step's prefix (train_state.json first); every rank then uploads its files (each staged in a local temp
    file, uploaded with a SHA-256 the store verifies and compared with the local file afterwards);
  - every rank reports its uploads (name, size, CRC32 of the local file) or its failure; rank 0 lists the
    prefix once and checks that every reported object is there with its size and nothing else is;
  - rank 0 writes train_state.json last: it is the commit marker. A step prefix without it is not a checkpoint
    (never loaded; deleted by the next prune), so a save killed or failed at any point leaves no
    complete-looking checkpoint, and a failure on any rank raises the same CheckpointError on every rank.
Checking a checkpoint in object storage (check()) uses one listing: every file named in train_state.json must be
there with its recorded size. The CRC32s are recorded but not verified there: verifying them means downloading
every byte once more before the load downloads it again (twice the transfer of a resume, for a large model
minutes), while what a CRC32 would catch is already covered: each object's bytes were checked against the
local file's SHA-256 when uploaded, and the store checksums what it keeps. What is left to catch, missing or
truncated objects and interrupted saves, the listing's sizes and the commit marker catch; and an object that
does not load is reported and the previous checkpoint used, as locally.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from shards.errors import UserError
from shards.storage import StorageError, is_s3
from shards.backends import open_storage
from shards.storage import file_crc32
from trainer.parallel import Dist

log = logging.getLogger(__name__)
STATE_NAME = "train_state.json"
NAME_RE = re.compile(r"^step-(\d{6,})$")


# A single-process run saves without a process group on purpose: DCP's warning about it is noise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                        category=UserWarning)


class _RecordingFileSystem(FileSystem):
    """DCP's local file system, keeping every write error. With thread_count > 1, DCP (torch 2.13) drops
    the exceptions of its extra writer threads: the save returns, its metadata lacks the failed files,
    and only loading would find out. The Checkpointer reads `errors` after dcp.save instead."""

    def __init__(self):
        super().__init__()
        self.errors: list[str] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        try:
            with super().create_stream(path, mode) as stream:
                yield stream
        except BaseException as e:
            with self._lock:
                self.errors.append(f"{os.path.basename(str(path))}: {type(e).__name__}: {e}")
            raise


class CheckpointError(UserError):
    """A checkpoint that is incomplete, damaged or does not fit the model. Names the directory."""


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:06d}")


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoint directories (no .tmp suffix), oldest first. In object storage (s3://): the
    step-NNNNNN/ prefixes that hold a train_state.json, as URLs."""
    if is_s3(root):
        root = root.rstrip("/")
        return [f"{root}/{n}" for n in _object_store_steps(open_storage(root))[0]]
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(root) if (m := NAME_RE.match(n))]
    return [os.path.join(root, n) for _, n in sorted(found)]


def _data_files(path: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(path):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), path)
            if rel != STATE_NAME:
                out.append(rel)
    return sorted(out)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    def __new__(cls, root: str, *args, **kwargs):
        # Checkpointer("s3://...") is an ObjectStoreCheckpointer, so that every caller (the loop, export,
        # tests) gets the right one from the path alone.
        if cls is Checkpointer and is_s3(str(root)):
            cls = ObjectStoreCheckpointer
        return super().__new__(cls)

    def __init__(self, root: str, keep: int, d: Dist, verify: bool = True, threads: int = 4):
        # threads: DCP writer threads per rank (each writes its own file) and CRC threads.
        self.root, self.keep, self.d, self.verify, self.threads = root, keep, d, verify, threads

    # ------------------------------------------------------------------ save
    def save(self, step: int, model, optimizer, train_state: dict) -> str:
        """Save after `step` optimizer steps. Collective: every rank calls it.

        A failure on any rank (disk full, I/O error) raises CheckpointError on every rank, naming the
        rank and the error: no rank is left waiting for the others. The previous checkpoint is untouched."""
        final = step_dir(self.root, step)
        tmp = final + ".tmp"
        err = None
        if self.d.is_main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
            except OSError as e:
                err = f"{type(e).__name__}: {e}"
        self._agree(err, tmp)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        writer = dcp.FileSystemWriter(tmp, thread_count=self.threads)
        writer.fs = fs = _RecordingFileSystem()
        try:  # collective: DCP gathers every rank's write result and raises the same error on all ranks
            dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=writer)
        except (Exception, CheckpointException) as e:  # DCP's wrapper is a BaseException: catch it by name
            self._cleanup(tmp)
            raise CheckpointError(f"saving checkpoint {final} failed ({_first_cause(e)}); the previous "
                                  f"checkpoint is intact. Free space or fix {self.root}, then rerun to "
                                  f"resume") from None
        # Each rank checksums the files it wrote; rank 0 collects them into train_state.json.
        mine, err = {}, "; ".join(fs.errors) or None  # writes that failed in DCP's other writer threads
        try:
            if err is None:
                torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank-{self.d.rank:05d}.pt"))
                mine = self._describe_all(tmp, [f for f in _data_files(tmp) if self._owner(f) == self.d.rank])
        except OSError as e:
            err = f"{type(e).__name__}: {e}"
        files = self._gather(mine, err, tmp)
        err = None
        if self.d.is_main:
            try:
                missing = sorted(set(_data_files(tmp)) - set(files))
                files.update(self._describe_all(tmp, missing))  # written by nobody we know of (.metadata)
                state = dict(train_state, step=step, world_size=self.d.world_size, files=files)
                with open(os.path.join(tmp, STATE_NAME), "w") as f:
                    json.dump(state, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                if os.path.exists(final):  # a rerun that redid this step: replace
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(self.root)
            except OSError as e:
                err = f"{type(e).__name__}: {e}"
        self._agree(err, tmp)
        if self.d.is_main:
            self._prune(final)
        return final

    def _gather(self, mine: dict, err: str | None, where: str) -> dict:
        """The files every rank wrote (name -> size and CRC32), merged; raises on every rank if any failed."""
        everyone = [(mine, err)]
        if self.d.distributed:
            everyone = [None] * self.d.world_size
            dist.all_gather_object(everyone, (mine, err))
        self._raise_if_failed([e for _, e in everyone], where)
        files = {}
        for part, _ in everyone:
            files.update(part)
        return files

    def _agree(self, err: str | None, tmp: str) -> None:
        """A collective check: every rank learns whether any rank failed (and acts as a barrier)."""
        errors = [err]
        if self.d.distributed:
            errors = [None] * self.d.world_size
            dist.all_gather_object(errors, err)
        self._raise_if_failed(errors, tmp)

    def _raise_if_failed(self, errors: list, tmp: str) -> None:
        failed = [(rank, e) for rank, e in enumerate(errors) if e]
        if failed:
            self._cleanup(tmp)
            where = "; ".join(f"rank {rank}: {e}" for rank, e in failed)
            raise CheckpointError(f"saving checkpoint {tmp.removesuffix('.tmp')} failed ({where}); the "
                                  f"previous checkpoint is intact. Free space or fix {self.root}, then rerun "
                                  f"to resume")

    def _cleanup(self, tmp: str) -> None:
        if self.d.is_main:  # a failed save's partial files only take space: never loaded (.tmp)
            shutil.rmtree(tmp, ignore_errors=True)

    def _describe_all(self, root: str, rels: list[str]) -> dict:
        """Size and CRC32 of files, in threads (zlib releases the GIL on large buffers)."""
        if len(rels) <= 1 or self.threads <= 1:
            return {rel: self._describe(root, rel) for rel in rels}
        with ThreadPoolExecutor(min(self.threads, len(rels))) as pool:
            return dict(zip(rels, pool.map(lambda rel: self._describe(root, rel), rels)))

    def _owner(self, rel: str) -> int:
        m = re.match(r"^__(\d+)_\d+\.distcp$", rel) or re.match(r"^rng/rank-(\d+)\.pt$", rel)
        return int(m.group(1)) if m else 0

    @staticmethod
    def _describe(root: str, rel: str) -> dict:
        p = os.path.join(root, rel)
        return {"size": os.path.getsize(p), "crc32": file_crc32(p)}

    def _prune(self, saved: str) -> None:
        # Count only checkpoints up to the one just saved: a newer one is from before a fallback (it did
        # not load) and must not push the new one out; the redone step replaces it.
        found = list_checkpoints(self.root)
        for path in found[:found.index(saved) + 1][:-self.keep]:
            shutil.rmtree(path, ignore_errors=True)
        for n in os.listdir(self.root):  # leftovers of runs killed while saving
            if n.endswith(".tmp") and os.path.isdir(os.path.join(self.root, n)):
                shutil.rmtree(os.path.join(self.root, n), ignore_errors=True)

    # ------------------------------------------------------------------ load
    def latest_loader_state(self) -> dict | None:
        """The loader state of the newest checkpoint with a readable train_state.json (no checksums:
        the run's data settings, such as its layout, are the same in all its checkpoints)."""
        for path in reversed(list_checkpoints(self.root)):
            try:
                return self._read_state(path)["loader"]
            except (OSError, StorageError, json.JSONDecodeError, KeyError, TypeError):
                continue
        return None

    def _read_state(self, path: str) -> dict:
        with open(os.path.join(path, STATE_NAME)) as f:
            return json.load(f)

    def load_latest(self, model, optimizer) -> dict | None:
        """Load the newest checkpoint that is complete and intact; None if there is none at all.

        A damaged one is reported and skipped. If checkpoints exist but none loads, raise."""
        candidates = list_checkpoints(self.root)
        errors = []
        for path in reversed(candidates):
            try:
                return self.load(path, model, optimizer)
            except CheckpointError as e:
                errors.append(str(e))
                log.error("%s; trying the previous checkpoint", e)
        if candidates:
            raise CheckpointError("no usable checkpoint in " + self.root + ":\n  " + "\n  ".join(errors) +
                                  "\nremove the damaged directories or start a new run.out_dir")
        return None

    def load(self, path: str, model, optimizer=None) -> dict:
        state = self.check(path)
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            to_load = {"model": model_sd, "optim": optim_sd}
        else:
            to_load = {"model": get_model_state_dict(model)}
        ok, err = 1, ""
        try:
            self._dcp_load(to_load, path)
        except (Exception, CheckpointException) as e:  # DCP's wrapper is a BaseException: catch it by name
            ok, err = 0, _first_cause(e)
        if not _all_ok(ok, self.d):
            raise CheckpointError(f"checkpoint {path} does not load ({err or 'failed on another rank'})")
        if optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=to_load["model"], optim_state_dict=to_load["optim"])
        else:
            set_model_state_dict(model, to_load["model"], options=StateDictOptions(strict=True))
        rng = self._rng_of(path, state)
        if rng is not None:
            _set_rng_state(rng)
        else:
            log.info("%s: no RNG state for rank %d (saved by %d ranks); keeping this rank's seed",
                     path, self.d.rank, state.get("world_size", -1))
        state["path"] = path
        return state

    def _dcp_load(self, to_load: dict, path: str) -> None:
        dcp.load(to_load, checkpoint_id=path)

    def _rng_of(self, path: str, state: dict) -> dict | None:
        rng = os.path.join(path, "rng", f"rank-{self.d.rank:05d}.pt")
        return torch.load(rng, weights_only=False) if os.path.exists(rng) else None

    def check(self, path: str) -> dict:
        """Completeness and checksums, split across ranks; raises CheckpointError naming the problem."""
        problem = ""
        try:
            with open(os.path.join(path, STATE_NAME)) as f:
                state = json.load(f)
            files = state["files"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            state, files, problem = {}, {}, f"{STATE_NAME} missing or unreadable ({e})"
        names = sorted(files)
        for i, rel in enumerate(names):
            if problem:
                break
            if i % self.d.world_size != self.d.rank and not rel.startswith(".metadata"):
                continue
            p = os.path.join(path, rel)
            if not os.path.exists(p):
                problem = f"file {rel} is missing"
            elif os.path.getsize(p) != files[rel]["size"]:
                problem = f"file {rel} has {os.path.getsize(p)} bytes, expected {files[rel]['size']} (truncated?)"
            elif self.verify and file_crc32(p) != files[rel]["crc32"]:
                problem = f"file {rel} fails its CRC32 check (corrupt)"
        if not _all_ok(0 if problem else 1, self.d):
            raise CheckpointError(f"checkpoint {path} is damaged: {problem or 'a check failed on another rank'}")
        return state


class ObjectStoreCheckpointer(Checkpointer):
    """Checkpoints under an s3://bucket/prefix (see the module docstring): train_state.json, written last by
    rank 0, is the commit marker; checks use one listing's sizes."""

    def __init__(self, root: str, keep: int, d: Dist, verify: bool = True, threads: int = 4):
        super().__init__(root.rstrip("/"), keep, d, verify, threads)
        self.storage = open_storage(self.root)
        from trainer.dcp_storage import remove_stale_staging
        try:  # staged uploads of processes killed mid-save (only those of processes that no longer run)
            if remove_stale_staging(self.storage):
                log.info("removed the staged files of earlier processes killed while saving to %s", self.root)
        except OSError as e:
            log.warning("could not clean the staging folder for %s (%s)", self.root, e)

    def _prefix(self, path: str) -> str:
        """'step-000100/' for s3://bucket/prefix/step-000100."""
        return path[len(self.root) + 1:].rstrip("/") + "/"

    # ------------------------------------------------------------------ save
    def save(self, step: int, model, optimizer, train_state: dict) -> str:
        from trainer.dcp_storage import StorageFileSystem, StorageWriter
        final = step_dir(self.root, step)
        prefix = self._prefix(final)
        err = None
        if self.d.is_main:  # leftovers of a killed save, or this step saved before a fallback: not a checkpoint now
            try:
                self._delete_objects(prefix, [n for n, _ in self.storage.list_sizes(prefix)])
            except (StorageError, OSError) as e:
                err = f"{type(e).__name__}: {e}"
        self._agree(err, final)
        fs = StorageFileSystem(self.storage)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        try:  # collective: DCP gathers every rank's write result and raises the same error on all ranks
            dcp.save({"model": model_sd, "optim": optim_sd},
                     storage_writer=StorageWriter(final, fs, thread_count=self.threads))
        except (Exception, CheckpointException) as e:  # DCP's wrapper is a BaseException: catch it by name
            fs.abort()  # DCP's other writer threads may still be uploading: stop and wait for them first
            if self.d.distributed:  # DCP raised on every rank: all are here; clean up once all have stopped
                dist.barrier()
            self._cleanup(final)
            raise CheckpointError(f"saving checkpoint {final} failed ({_first_cause(e)}); the previous "
                                  f"checkpoint is intact. Fix {self.root} (credentials, bucket, space), then "
                                  f"rerun to resume") from None
        fs.discard_staged()
        # Each rank reports its uploads (DCP's writer threads other than the first drop their errors: fs has them).
        mine, err = {}, None
        if fs.errors:
            err = "upload failed: " + "; ".join(fs.errors[:3]) + (f" (+{len(fs.errors) - 3} more)"
                                                                  if len(fs.errors) > 3 else "")
        else:
            try:
                buf = io.BytesIO()
                torch.save(_rng_state(), buf)
                rng, rel = buf.getvalue(), f"rng/rank-{self.d.rank:05d}.pt"
                self.storage.put_bytes(prefix + rel, rng)
                mine = {n[len(prefix):]: info for n, info in fs.written.items()}
                mine[rel] = {"size": len(rng), "crc32": zlib.crc32(rng)}
            except (StorageError, OSError) as e:
                err = f"{type(e).__name__}: {e}"
        files = self._gather(mine, err, final)
        err = None
        if self.d.is_main:
            try:
                listed = {n[len(prefix):]: size for n, size in self.storage.list_sizes(prefix)}
                for rel in sorted(files):
                    if listed.get(rel) != files[rel]["size"]:
                        raise StorageError(f"{self.storage.where(prefix + rel)}: uploaded with {files[rel]['size']} "
                                           f"bytes, but the store lists {listed.get(rel, 'no such object')}")
                unexpected = sorted(set(listed) - set(files))
                if unexpected:
                    raise StorageError(f"{self.storage.where(prefix + unexpected[0])}: an object no rank of this "
                                       f"run wrote (another run saving to the same checkpoint.dir?)")
                state = dict(train_state, step=step, world_size=self.d.world_size, files=files)
                self.storage.put_bytes(prefix + STATE_NAME, json.dumps(state, indent=1, sort_keys=True).encode())
            except (StorageError, OSError) as e:
                err = f"{type(e).__name__}: {e}"
        self._agree(err, final)
        if self.d.is_main:
            self._prune(final)
        return final

    def _cleanup(self, tmp: str) -> None:
        if self.d.is_main:  # a failed save's objects: train_state.json (if any) first, so it is never complete
            try:
                prefix = self._prefix(tmp)
                self._delete_objects(prefix, [n for n, _ in self.storage.list_sizes(prefix)])
            except (StorageError, OSError) as e:
                log.warning("could not remove the objects of the failed save %s (%s); the next save removes them",
                            tmp, e)

    def _delete_objects(self, prefix: str, names: list[str]) -> None:
        """Delete `names` (all under one step prefix): its train_state.json first, so that a prefix is never a
        complete-looking checkpoint with objects missing."""
        state = prefix + STATE_NAME
        if state in names:
            self.storage.delete(state)
        rest = [n for n in names if n != state]
        if len(rest) <= 1 or self.threads <= 1:
            for n in rest:
                self.storage.delete(n)
            return
        with ThreadPoolExecutor(min(self.threads * 2, len(rest))) as pool:
            list(pool.map(self.storage.delete, rest))

    def _prune(self, saved: str) -> None:
        # As locally: count only checkpoints up to the one just saved; prefixes without train_state.json go.
        try:
            complete, objects = _object_store_steps(self.storage)
            found = [step_dir(self.root, int(NAME_RE.match(n).group(1))) for n in complete]
            doomed = [self._prefix(p) for p in found[:found.index(saved) + 1][:-self.keep]]
            doomed += [f"{n}/" for n in objects if n not in complete]
            for prefix in doomed:
                self._delete_objects(prefix, objects[prefix.rstrip("/")])
        except (StorageError, OSError) as e:
            log.warning("pruning old checkpoints in %s failed (%s); the next save tries again", self.root, e)

    # ------------------------------------------------------------------ load
    def _read_state(self, path: str) -> dict:
        return json.loads(self.storage.read(self._prefix(path) + STATE_NAME))

    def check(self, path: str) -> dict:
        """train_state.json and one listing: every file it names is there with its size (no CRC32: see the
        module docstring). Every rank checks (one request each); raises CheckpointError naming the problem."""
        prefix, problem, state = self._prefix(path), "", {}
        try:
            state = self._read_state(path)
            files = state["files"]
            names = sorted(files)
        except (StorageError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            state, files, names, problem = {}, {}, [], f"{STATE_NAME} missing or unreadable ({e})"
        listed = {}
        if not problem:
            try:
                listed = {n[len(prefix):]: size for n, size in self.storage.list_sizes(prefix)}
            except StorageError as e:
                problem = f"cannot list it ({e})"
        for rel in names:
            if problem:
                break
            if rel not in listed:
                problem = f"file {rel} is missing"
            elif listed[rel] != files[rel]["size"]:
                problem = f"file {rel} has {listed[rel]} bytes, expected {files[rel]['size']} (truncated?)"
        if not _all_ok(0 if problem else 1, self.d):
            raise CheckpointError(f"checkpoint {path} is damaged: {problem or 'a check failed on another rank'}")
        self._sizes = {prefix + rel: size for rel, size in listed.items()}
        return state

    def _dcp_load(self, to_load: dict, path: str) -> None:
        from trainer.dcp_storage import StorageFileSystem, StorageReader
        fs = StorageFileSystem(self.storage)
        fs.sizes = dict(getattr(self, "_sizes", {}))
        dcp.load(to_load, storage_reader=StorageReader(path, fs))

    def _rng_of(self, path: str, state: dict) -> dict | None:
        rel = f"rng/rank-{self.d.rank:05d}.pt"
        if rel not in state.get("files", {}):
            return None
        return torch.load(io.BytesIO(self.storage.read(self._prefix(path) + rel)), weights_only=False)


def _object_store_steps(storage) -> tuple[list[str], dict[str, list[str]]]:
    """One listing of a checkpoint root in object storage: (complete step names, oldest first;
    {step name: its object names}) for every step-NNNNNN/ prefix."""
    objects: dict[str, list[str]] = {}
    for name, _ in storage.list_sizes(""):
        top, slash, _rest = name.partition("/")
        if slash and NAME_RE.match(top):
            objects.setdefault(top, []).append(name)
    complete = [top for top, names in objects.items() if f"{top}/{STATE_NAME}" in names]
    return sorted(complete, key=lambda n: int(NAME_RE.match(n).group(1))), objects


def _first_cause(e: BaseException) -> str:
    """`Type: first line` of the real error; a CheckpointException wraps each failed rank's exception."""
    failures = getattr(e, "failures", None) if isinstance(e, CheckpointException) else None
    if failures:
        e = next(iter(failures.values()))[0]
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _all_ok(ok: int, d: Dist) -> bool:
    if not d.distributed:
        return bool(ok)
    t = torch.tensor([ok], dtype=torch.int64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
