"""Checkpoints: torch.distributed.checkpoint (DCP) for model + optimizer, JSON for the rest; keep-last-k.

One checkpoint, CHECKPOINT_DIR/step-000100/ (CHECKPOINT_DIR = OUT/ckpt, or checkpoint.dir: a directory or
s3://bucket/prefix):
    .metadata, __<rank>_<n>.distcp  DCP: model and optimizer, sharded by whoever saved; DCP reshards on load,
                                    so a checkpoint loads into single / DDP / FSDP on any number of ranks
    rng/rank-00000.pt               each rank's RNG states (torch, cuda, python, numpy)
    train_state.json                step, loader state, skipped steps, and the size + CRC32 of every file above

The protocol, written once over the Storage interface (shards/storage.py); only how DCP writes and reads
differs by backend (trainer/dcp_backends.py):
  - save: rank 0 clears the step's staging place (a local STEP.tmp/, or STEP/ itself in object storage,
    removing what a killed save or the same step saved before a fallback left there); every rank writes its
    DCP files and its RNG state and reports them (name, size, CRC32) or its failure; rank 0 lists the staging
    place once and checks that every reported file is there with its size and nothing else is, then writes
    train_state.json LAST: it is the commit marker (locally the directory is then renamed STEP.tmp -> STEP).
    A failure on any rank raises the same CheckpointError on every rank, and its files are removed.
  - discovery: a checkpoint is a step-NNNNNN/ holding train_state.json (locally any step-NNNNNN/, as the rename
    committed it: one without train_state.json is damaged and named when it fails to load); a killed save
    (a local step-NNNNNN.tmp/, a prefix without train_state.json in object storage) is never loaded and goes at
    the next prune.
  - retention: keep the newest `keep` up to the one just saved (a newer one is from before a fallback: it did not
    load, and the redone step replaces it).
  - validation (check): train_state.json and one listing: every file it names is there with its recorded size;
    locally also its CRC32 (split across ranks). In object storage the CRC32s are recorded but not re-read:
    that would download every byte once more before the load downloads it again (twice the transfer of a
    resume), while each object's bytes were checked against the local file's SHA-256 when uploaded and the
    store checksums what it keeps; missing or truncated objects and interrupted saves, the listing's sizes and
    the commit marker catch. A checkpoint that fails its checks or does not load is named, and the previous
    one is used.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import warnings
import zlib

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from shards.backends import open_storage
from shards.errors import UserError
from shards.storage import StorageError, is_s3
from shards.progress import plural
from trainer.dcp_backends import STATE_NAME, dcp_backend
from trainer.parallel import Dist

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^step-(\d{6,})$")
LEFTOVER_RE = re.compile(r"^step-\d{6,}\.tmp$")  # a local save killed before its rename

# A single-process run saves without a process group on purpose: DCP's warning about it is noise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                        category=UserWarning)


class CheckpointError(UserError):
    """A checkpoint that is incomplete, damaged or does not fit the model. Names the directory."""


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_s3(root) else os.path.join(root, name)


def _steps(backend) -> tuple[list[str], list[str]]:
    """(checkpoints, oldest first; killed saves) at a checkpoint root. A checkpoint is a step-NNNNNN holding
    train_state.json, or, where a rename commits (locally), any step-NNNNNN: one without it is damaged, named
    when it fails to load. A killed save is a step-NNNNNN.tmp, or a step-NNNNNN prefix without train_state.json
    in object storage."""
    checkpoints, killed = [], []
    for name, committed in backend.entries().items():
        if NAME_RE.match(name) and (committed or backend.commits_by_rename):
            checkpoints.append(name)
        elif LEFTOVER_RE.match(name) or NAME_RE.match(name):
            killed.append(name)
    return sorted(checkpoints, key=lambda n: int(NAME_RE.match(n).group(1))), sorted(killed)


def list_checkpoints(root: str) -> list[str]:
    """Checkpoints under `root` (a directory or s3://bucket/prefix), oldest first, as paths/URLs."""
    storage = open_storage(root)
    try:
        return [_join(root, n) for n in _steps(dcp_backend(storage, Dist(), 1))[0]]
    finally:
        storage.close()


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
    def __init__(self, root: str, keep: int, d: Dist, verify: bool = True, threads: int = 4):
        # threads: DCP writer threads per rank (each writes its own file), CRC and delete threads.
        self.root = root.rstrip("/") if is_s3(root) else root
        self.keep, self.d, self.verify = keep, d, verify
        self.storage = open_storage(self.root)
        self.backend = dcp_backend(self.storage, d, threads)
        self.backend.remove_stale()

    def path(self, name: str) -> str:
        return _join(self.root, name)

    # ------------------------------------------------------------------ agreement between ranks
    def _gather(self, mine):
        """Every rank's `mine`, in rank order (a collective: also a barrier)."""
        if not self.d.distributed:
            return [mine]
        everyone = [None] * self.d.world_size
        dist.all_gather_object(everyone, mine)
        return everyone

    def _agree(self, err: str | None, staging: str, result=None) -> list:
        """Every rank learns whether any rank failed saving: then all raise the same CheckpointError and rank 0
        removes the failed save's files. Returns every rank's `result`."""
        everyone = self._gather((result, err))
        failed = [(rank, e) for rank, (_, e) in enumerate(everyone) if e]
        if failed:
            self._discard(staging)
            where = "; ".join(f"rank {rank}: {e}" for rank, e in failed)
            raise CheckpointError(f"saving checkpoint {self.path(staging.removesuffix('.tmp'))} failed ({where}); "
                                  f"the previous checkpoint is intact. Free space or fix {self.root} (credentials, "
                                  f"bucket, space), then rerun to resume")
        return [r for r, _ in everyone]

    def _discard(self, staging: str) -> None:
        if self.d.is_main:  # a failed save's files only take space: never loaded (no train_state.json)
            try:
                self.backend.remove(staging)
            except (StorageError, OSError) as e:
                log.warning("could not remove the files of the failed save %s (%s); the next save removes them",
                            self.path(staging), e)

    # ------------------------------------------------------------------ save
    def save(self, step: int, model, optimizer, train_state: dict) -> str:
        """Save after `step` optimizer steps. Collective: every rank calls it.

        A failure on any rank (disk full, I/O error, a failed upload) raises CheckpointError on every rank,
        naming the rank and the error: no rank is left waiting for the others. The previous checkpoint is
        untouched."""
        name = step_name(step)
        staging = self.backend.staging(name)
        self._agree(_attempt(lambda: self.backend.clear(staging)) if self.d.is_main else None, staging)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        try:
            mine, errors = self.backend.save({"model": model_sd, "optim": optim_sd}, staging)
        except (Exception, CheckpointException) as e:  # DCP's wrapper is a BaseException: catch it by name
            self._discard(staging)
            raise CheckpointError(f"saving checkpoint {self.path(name)} failed ({_first_cause(e)}); the "
                                  f"previous checkpoint is intact. Free space or fix {self.root} (credentials, "
                                  f"bucket, space), then rerun to resume") from None
        err = "; ".join(errors) or None
        if err is None:
            err = _attempt(lambda: mine.update(self._save_rng(staging)))
        files = {}
        for part in self._agree(err, staging, mine):
            files.update(part)
        err = None
        if self.d.is_main:
            err = _attempt(lambda: self._commit(staging, name, files, dict(train_state, step=step,
                                                                             world_size=self.d.world_size)))
        self._agree(err, staging)
        if self.d.is_main:
            self._prune(name)
        return self.path(name)

    def _save_rng(self, staging: str) -> dict:
        buf = io.BytesIO()
        torch.save(_rng_state(), buf)
        data, rel = buf.getvalue(), f"rng/rank-{self.d.rank:05d}.pt"
        self.storage.put_bytes(f"{staging}/{rel}", data)
        return {rel: {"size": len(data), "crc32": zlib.crc32(data)}}

    def _commit(self, staging: str, name: str, files: dict, state: dict) -> None:
        """Rank 0: the reported files are all there and nothing else is; then train_state.json, last."""
        listed = dict(self._listing(staging))
        for rel in sorted(files):
            if listed.get(rel) != files[rel]["size"]:
                raise StorageError(f"{self.path(staging)}/{rel}: written with {files[rel]['size']} bytes, but "
                                   f"{listed.get(rel, 'it is not there')}")
        unexpected = sorted(set(listed) - set(files))
        if unexpected:
            raise StorageError(f"{self.path(staging)}/{unexpected[0]}: a file no rank of this run wrote (another "
                               f"run saving to the same checkpoint directory?)")
        self.storage.put_bytes(f"{staging}/{STATE_NAME}", json.dumps(dict(state, files=files), indent=1,
                                                                     sort_keys=True).encode())
        self.backend.publish(staging, name)

    def _listing(self, name: str) -> list[tuple[str, int]]:
        prefix = name + "/"
        return [(n[len(prefix):], size) for n, size in self.storage.list_sizes(prefix)]

    def _prune(self, saved: str) -> None:
        # Count only checkpoints up to the one just saved: a newer one is from before a fallback (it did not
        # load) and must not push the new one out; the redone step replaces it. Incomplete ones go.
        try:
            complete, incomplete = _steps(self.backend)
            for name in complete[:complete.index(saved) + 1][:-self.keep] + incomplete:
                self.backend.remove(name)
        except (StorageError, OSError) as e:
            log.warning("pruning old checkpoints in %s failed (%s); the next save tries again", self.root, e)

    # ------------------------------------------------------------------ load
    def _read_state(self, name: str) -> dict:
        return json.loads(self.storage.read(f"{name}/{STATE_NAME}"))

    def latest_loader_state(self) -> dict | None:
        """The loader state of the newest checkpoint with a readable train_state.json (no checksums:
        the run's data settings, such as its layout, are the same in all its checkpoints)."""
        for name in reversed(_steps(self.backend)[0]):
            try:
                return self._read_state(name)["loader"]
            except (StorageError, ValueError, KeyError, TypeError):
                continue
        return None

    def load_latest(self, model, optimizer) -> dict | None:
        """Load the newest checkpoint that is complete and intact; None if there is none at all.

        A damaged one is reported and skipped. If checkpoints exist but none loads, raise."""
        candidates = _steps(self.backend)[0]
        errors = []
        for name in reversed(candidates):
            try:
                return self.load(self.path(name), model, optimizer)
            except CheckpointError as e:
                errors.append(str(e))
                log.error("%s; trying the previous checkpoint", e)
        if candidates:
            raise CheckpointError("no usable checkpoint in " + self.root + ":\n  " + "\n  ".join(errors) +
                                  "\nremove the damaged directories or start a new run.out_dir")
        return None

    def load(self, path: str, model, optimizer=None) -> dict:
        """Load the checkpoint at `path` (a step directory under this root) into model (and optimizer)."""
        name = path.rstrip("/").rsplit("/", 1)[-1]
        state, sizes = self.check(path)
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            to_load = {"model": model_sd, "optim": optim_sd}
        else:
            to_load = {"model": get_model_state_dict(model)}
        err = None
        try:
            self.backend.load(to_load, name, sizes)
        except (Exception, CheckpointException) as e:  # DCP's wrapper is a BaseException: catch it by name
            err = _first_cause(e)
        errors = [e for e in self._gather(err) if e]
        if errors:
            raise CheckpointError(f"checkpoint {path} does not load ({errors[0]})")
        if optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=to_load["model"], optim_state_dict=to_load["optim"])
        else:
            set_model_state_dict(model, to_load["model"], options=StateDictOptions(strict=True))
        rel = f"rng/rank-{self.d.rank:05d}.pt"
        if rel in state.get("files", {}):
            _set_rng_state(torch.load(io.BytesIO(self.storage.read(f"{name}/{rel}")), weights_only=False))
        else:
            log.info("%s: no RNG state for rank %d (saved by %s); keeping this rank's seed",
                     path, self.d.rank, plural(state.get("world_size", -1), "rank"))
        state["path"] = path
        return state

    def check(self, path: str) -> tuple[dict, dict[str, int]]:
        """(train_state, {file: size}) of a complete, intact checkpoint; else CheckpointError naming the problem.
        Every file named in train_state.json must be listed with its size; locally also match its CRC32 (each
        rank checks a share)."""
        name = path.rstrip("/").rsplit("/", 1)[-1]
        problem, state, files, listed = "", {}, {}, {}
        try:
            state = self._read_state(name)
            files = state["files"]
            listed = dict(self._listing(name))
        except (StorageError, ValueError, KeyError, TypeError) as e:
            problem = f"{STATE_NAME} missing or unreadable ({e})"
        check_crc = self.verify and self.backend.verifies_crc
        for i, rel in enumerate(sorted(files)):
            if problem:
                break
            if rel not in listed:
                problem = f"file {rel} is missing"
            elif listed[rel] != files[rel]["size"]:
                problem = f"file {rel} has {listed[rel]} bytes, expected {files[rel]['size']} (truncated?)"
            elif check_crc and i % self.d.world_size == self.d.rank and \
                    self.backend.crc32(f"{name}/{rel}") != files[rel]["crc32"]:
                problem = f"file {rel} fails its CRC32 check (corrupt)"
        problems = [p for p in self._gather(problem) if p]
        if problems:
            raise CheckpointError(f"checkpoint {path} is damaged: {problems[0]}")
        return state, {rel: listed[rel] for rel in files}


def _attempt(action) -> str | None:
    """Run `action`; its I/O error as 'Type: message' for the agreement, None when it worked."""
    try:
        action()
    except (StorageError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _first_cause(e: BaseException) -> str:
    """`Type: first line` of the real error; a CheckpointException wraps each failed rank's exception."""
    failures = getattr(e, "failures", None) if isinstance(e, CheckpointException) else None
    if failures:
        e = next(iter(failures.values()))[0]
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
