"""TokenLoader: batches of token tensors for one rank, in the plan's order, plus the resumable state.

The plan says which (block, row) each batch row is; the fetch brings the blocks. This module only
wires them: the caller's thread plans steps `prefetch_steps` ahead and submits their block reads,
one assembler thread gathers each step's rows (one numpy fancy index) into an int64 tensor, and
the caller waits only if that step is not ready yet.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from shards.errors import UserError
from shards.format import Manifest, read_manifest
from shards.storage import LocalStorage, Storage
from shards.backends import open_storage
from trainer.data.fetch import BlockCache, BlockIndex, BlockReader
from trainer.data.plan import Plan, PlanError, StepRows

log = logging.getLogger("trainer.data")

# Version of the data order and of this state dict: bump it when the plan's arithmetic changes,
# so a checkpoint is never resumed into a different order without saying so.
STATE_VERSION = 1
LOCAL_FETCH_THREADS, REMOTE_FETCH_THREADS = 4, 16
STATE_KEYS = ("format_version", "manifest_hash", "seed", "global_batch", "layout", "epoch", "step")


class DataStateError(UserError, ValueError):
    """A checkpoint's data state that does not fit this loader. Says what changed and what to do."""


@dataclass
class Batch:
    step: int
    epoch: int
    input_ids: "torch.Tensor"  # int64 [local_batch, seq_len]  # noqa: F821
    cu_seqlens: "torch.Tensor | None"  # int32 [documents + 1] over input_ids.flatten(), when varlen  # noqa: F821
    sequences: list[tuple[int, int]]  # (shard index, sequence index in shard) per row


def plan_for(manifest: Manifest, *, seed: int, global_batch: int, layout: int | None, name: str) -> Plan:
    """The plan of a dataset: the one entry point the loader and the `plan` CLI share."""
    return Plan([[b.rows for b in s.blocks] for s in manifest.shards], seed=seed,
                global_batch=global_batch, layout=layout, name=name)


def cu_seqlens(tokens: np.ndarray, eos_id: int, bos_id: int | None) -> np.ndarray:
    """Document boundaries over tokens.ravel(): every row start, after every EOS, before every BOS."""
    rows, seq_len = tokens.shape
    flat = tokens.ravel()
    cuts = [np.arange(rows + 1, dtype=np.int64) * seq_len]
    if bos_id is not None and bos_id == eos_id:
        # One token both ends and starts documents ("T a b T T c d T"): cut only between two of
        # them, or every separator would become a one-token document.
        cuts.append(np.flatnonzero((flat[:-1] == eos_id) & (flat[1:] == eos_id)) + 1)
    else:
        cuts.append(np.flatnonzero(flat == eos_id) + 1)
        if bos_id is not None:
            cuts.append(np.flatnonzero(flat == bos_id))
    return np.unique(np.concatenate(cuts)).astype(np.int32)


class TokenLoader:
    def __init__(self, shards: str | os.PathLike | Storage, *, seed: int, global_batch: int,
                 layout: int | None = None, world_size: int = 1, rank: int = 0, prefetch_steps: int = 4,
                 varlen: bool = False, fetch_threads: int | None = None):
        self._owns_storage = not isinstance(shards, Storage)
        self.storage = open_storage(os.fspath(shards)) if self._owns_storage else shards
        if fetch_threads is None:  # local reads are CPU-bound (decode); remote ones wait on latency
            fetch_threads = LOCAL_FETCH_THREADS if isinstance(self.storage, LocalStorage) else REMOTE_FETCH_THREADS
        try:
            self.manifest = read_manifest(self.storage)
            self.manifest_hash = self.manifest.content_hash()
            self.plan = plan_for(self.manifest, seed=seed, global_batch=global_batch, layout=layout,
                                 name=str(self.storage))
            self.plan.rank_streams(world_size, rank)
            if prefetch_steps < 0 or fetch_threads < 1:
                raise PlanError(f"prefetch_steps ({prefetch_steps}) must be >= 0 and fetch_threads "
                                f"({fetch_threads}) >= 1")
        except BaseException:
            self._close_storage()
            raise
        self.seed, self.global_batch = int(seed), int(global_batch)
        self.world_size, self.rank = int(world_size), int(rank)
        self.prefetch_steps, self.varlen, self.fetch_threads = int(prefetch_steps), bool(varlen), int(fetch_threads)
        self.index = BlockIndex(self.manifest)
        self._pipelines: list[_Pipeline] = []
        p = self.plan
        log.info("%s: %d sequences in %d blocks; global batch %d, layout %d: %d steps per epoch; %d sequences "
                 "of each epoch's order are dropped (%d after the last stream, %d at the end of each of the %d "
                 "streams)", self.storage, p.num_sequences, p.num_blocks, p.global_batch, p.layout,
                 p.steps_per_epoch, p.dropped_per_epoch, p.num_sequences - p.layout * p.stream_length,
                 p.stream_length - p.steps_per_epoch * p.items_per_stream, p.layout)

    @property
    def layout(self) -> int:
        return self.plan.layout

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def dropped_per_epoch(self) -> int:
        return self.plan.dropped_per_epoch

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world_size

    def iter_batches(self, start_step: int = 0):
        """Batches from `start_step` on, over epochs without end; close the generator to stop."""
        if int(start_step) < 0:
            raise PlanError(f"start step {start_step} is negative")
        return self._batches(int(start_step))

    def _batches(self, start_step: int):
        pipe = _Pipeline(self, start_step)
        self._pipelines.append(pipe)
        try:
            while True:
                yield pipe.next()
        finally:
            pipe.close()
            if pipe in self._pipelines:
                self._pipelines.remove(pipe)

    # --- resumable state
    def state_dict(self, next_step: int) -> dict:
        return {"format_version": STATE_VERSION, "manifest_hash": self.manifest_hash, "seed": self.seed,
                "global_batch": self.global_batch, "layout": self.layout,
                "epoch": int(next_step) // self.steps_per_epoch, "step": int(next_step)}

    def check_state(self, state: dict) -> int:
        """The step to resume at, or DataStateError if `state` was made for another data order."""
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise DataStateError(f"data state lacks {missing}: it is not a TokenLoader.state_dict() "
                                 f"(keys {list(STATE_KEYS)})")
        if state["format_version"] != STATE_VERSION:
            raise DataStateError(f"data state format_version {state['format_version']} is not "
                                 f"{STATE_VERSION}: the data order changed between versions; resume "
                                 f"with the trainer version that wrote the checkpoint, or start a new run")
        changed = []
        if state["manifest_hash"] != self.manifest_hash:
            changed.append(f"the dataset changed (manifest hash {state['manifest_hash'][:12]}... -> "
                           f"{self.manifest_hash[:12]}... at {self.storage}): point the run at the "
                           f"shards it was started on")
        if int(state["seed"]) != self.seed:
            changed.append(f"seed changed ({state['seed']} -> {self.seed}): set the data seed back to "
                           f"{state['seed']}")
        if int(state["global_batch"]) != self.global_batch:
            changed.append(f"global batch changed ({state['global_batch']} -> {self.global_batch} "
                           f"sequences): keep global_batch={state['global_batch']} (change the micro-batch "
                           f"or gradient accumulation instead)")
        if int(state["layout"]) != self.layout:
            changed.append(f"layout changed ({state['layout']} -> {self.layout}): the layout is fixed at a "
                           f"run's first launch; use layout {state['layout']} (trainer: data.layout="
                           f"{state['layout']}, or leave data.layout unset to take the checkpoint's)")
        if changed:
            raise DataStateError("cannot resume this data state: " + "; ".join(changed)
                                 + ". Or start a new run (a fresh data order).")
        step = int(state["step"])
        if step < 0 or int(state["epoch"]) != step // self.steps_per_epoch:
            raise DataStateError(f"data state is inconsistent: step {step} is in epoch "
                                 f"{step // self.steps_per_epoch}, the state says {state['epoch']}")
        return step

    def close(self) -> None:
        for pipe in list(self._pipelines):
            pipe.close()
        self._pipelines.clear()
        self._close_storage()

    def _close_storage(self) -> None:
        if self._owns_storage:
            self.storage.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Pipeline:
    """One run of iter_batches: the window of planned steps, their blocks and their assembly."""

    def __init__(self, loader: TokenLoader, start_step: int):
        self.loader, self.plan = loader, loader.plan
        self.reader = BlockReader(loader.storage, loader.index)
        self.cache = BlockCache(loader.index, self.reader, threads=loader.fetch_threads)
        self._assembler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-assemble")
        self.window: deque[tuple[int, Future]] = deque()
        self.next_step = int(start_step)
        self._finished: int | None = None  # a consumed step whose blocks are not yet released
        self.closed = False

    def next(self) -> Batch:
        if self.closed:
            raise RuntimeError("this TokenLoader was closed; make a new one (or call iter_batches again)")
        while len(self.window) <= self.loader.prefetch_steps:
            self._submit()
        step, fut = self.window.popleft()
        batch = fut.result()
        # Free this step's blocks only once the next step has claimed the ones it shares with it;
        # with no later step planned yet (prefetch_steps=0) that waits for the next _submit.
        self._finished = step
        if self.window:
            self._release_finished()
        return batch

    def _release_finished(self) -> None:
        if self._finished is not None:
            self.cache.release_through(self._finished)
            self._finished = None

    def _submit(self) -> None:
        step, self.next_step = self.next_step, self.next_step + 1
        rows = self.plan.step_rows(step, self.loader.world_size, self.loader.rank)
        keep = self.plan.block_last_use(rows.epoch, rows.blocks, self.loader.world_size, self.loader.rank)
        slots, fetches = self.cache.acquire(rows.blocks, step, keep)
        self._release_finished()
        shard, seq = self.plan.sequences(rows.blocks, rows.rows)
        sequences = list(zip(shard.tolist(), seq.tolist()))
        self.window.append((step, self._assembler.submit(self._assemble, rows, slots, fetches, sequences)))

    def _assemble(self, rows: StepRows, slots: np.ndarray, fetches: list[Future],
                  sequences: list[tuple[int, int]]) -> Batch:
        import torch  # here, so the plan CLI does not pay for importing torch

        # Wait for the blocks first needed at this step; the others were waited for by earlier
        # steps (one assembler thread, steps in order). Re-raises a read or decode error as is.
        for f in fetches:
            f.result()
        m = self.loader.manifest
        tokens = np.empty((len(slots), m.seq_len), dtype=m.np_dtype)
        self.cache.slab.gather(slots, rows.rows, tokens)
        cu = None
        if self.loader.varlen:
            cu = torch.from_numpy(cu_seqlens(tokens, m.eos_id, m.bos_id))
        return Batch(step=rows.step, epoch=rows.epoch, input_ids=torch.from_numpy(tokens.astype(np.int64)),
                     cu_seqlens=cu, sequences=sequences)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for _, fut in self.window:
            fut.cancel()
        self.window.clear()
        self.cache.close()
        self._assembler.shutdown(wait=True, cancel_futures=True)
