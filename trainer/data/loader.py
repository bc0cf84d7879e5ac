"""TokenLoader: batches of token tensors for one rank, in the plan's order, plus the resumable state.

The plan (one dataset) or the mixture (several sources, trainer/data/mixture.py) says which (source,
block, row) each batch row is; the fetch brings the blocks. This module only wires them: the caller's
thread plans steps `prefetch_steps` ahead and submits their block reads, one assembler thread gathers
each step's rows (one numpy fancy index) into an int64 tensor, and the caller waits only if that step
is not ready yet. All sources share one block cache and one fetch pool.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from shards.errors import UserError
from shards.format import Manifest, read_manifest
from shards.storage import Storage
from shards.backends import open_storage
from trainer.data.fetch import BlockCache, BlockIndex, BlockReader
from trainer.data.mixture import MixStep, Mixture, as_fraction
from shards.progress import plural
from trainer.data.plan import BlockLayout, Plan, PlanError

log = logging.getLogger("trainer.data")

# Version of the data order and of this state dict: bump it when the plan's arithmetic changes,
# so a checkpoint is never resumed into a different order without saying so.
STATE_VERSION = 1


class DataStateError(UserError, ValueError):
    """A checkpoint's data state that does not fit this loader. Says what changed and what to do."""


@dataclass
class Batch:
    step: int
    epoch: int
    input_ids: "torch.Tensor"  # int64 [local_batch, seq_len]  # noqa: F821
    cu_seqlens: "torch.Tensor | None"  # int32 [documents + 1] over input_ids.flatten(), when varlen  # noqa: F821
    sequences: list[tuple[int, int]]  # (shard index, sequence index in shard) per row
    sources: list[int] = field(default_factory=list)  # source index per row (all 0 for one dataset)


def block_layout(manifest: Manifest, name: str) -> BlockLayout:
    """Every block's rows from the per-shard summaries (O(shards)), unless a shard's blocks vary."""
    shards = manifest.shards
    if any(s.rows_per_block == 0 for s in shards):
        return BlockLayout.from_lists([s.block_rows for s in shards], name)
    return BlockLayout.from_shards([s.num_blocks for s in shards], [s.rows_per_block for s in shards],
                                   [s.last_block_rows for s in shards], name)


def _order_shape(p: Plan, in_mixture: bool) -> str:
    """How a plan cuts an epoch, for the start-up log. A source of a mixture has streams of its own (the ceiling of
    its share of the mixture's), so its plan's global batch is no batch of the run: it is named in streams."""
    if in_mixture:
        return (f"{plural(p.layout, 'stream')} of {plural(p.items_per_stream, 'sequence')} a slot: "
                f"{plural(p.steps_per_epoch, 'slot')} per stream per epoch")
    return (f"global batch {p.global_batch} in {plural(p.layout, 'stream')}: "
            f"{plural(p.steps_per_epoch, 'step')} per epoch")


def plan_for(manifest: Manifest, *, seed: int, global_batch: int, layout: int | None, name: str) -> Plan:
    """The plan of a dataset: the one entry point the loader and the `plan` CLI share."""
    return Plan(block_layout(manifest, name), seed=seed, global_batch=global_batch, layout=layout, name=name)


@dataclass(frozen=True)
class Source:
    """One dataset of a mixture: a name ([A-Za-z0-9_-]+), where its shards are, its stage-0 weight."""
    name: str
    shards: "str | os.PathLike | Storage"
    weight: float | Fraction = 1


def check_sources_agree(labels: list[str], manifests: list[Manifest],
                        why: str = "mixed sources need the same seq_len and tokenizer") -> None:
    """Sources mixed into one batch need the same seq_len, token dtype and tokenizer (its sha256).
    `labels` name the datasets in the message (e.g. "source 'web'")."""
    def key(m):
        return {"seq_len": m.seq_len, "dtype": m.dtype, "tokenizer sha256": m.tokenizer.get("sha256")}
    first = key(manifests[0])
    for label, m in zip(labels[1:], manifests[1:]):
        for k, v in key(m).items():
            if v != first[k]:
                raise PlanError(f"{label} has {k} {v} but {labels[0]} has {first[k]}: {why}; rebuild one "
                                f"with the other's (python -m shardgen ... --seq-len --tokenizer)")


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
    """Batches for one rank. `shards`: one dataset (a path, s3:// URL or Storage), or a list of Source
    (a mixture, with `stages`: (start_step, weights in source order) from that step on)."""

    def __init__(self, shards: "str | os.PathLike | Storage | list[Source]", *, seed: int, global_batch: int,
                 layout: int | None = None, world_size: int = 1, rank: int = 0, prefetch_steps: int = 4,
                 varlen: bool = False, fetch_threads: int | None = None,
                 stages: "list[tuple[int, list]]" = ()):
        self.mixed = isinstance(shards, (list, tuple))
        sources = list(shards) if self.mixed else [Source("", shards, 1)]
        if not sources:
            raise PlanError("a mixture needs at least one source")
        self.storages: list[Storage] = []
        self._owned: list[Storage] = []
        try:
            for src in sources:
                if isinstance(src.shards, Storage):
                    self.storages.append(src.shards)
                else:
                    self.storages.append(open_storage(os.fspath(src.shards)))
                    self._owned.append(self.storages[-1])
            self.storage = self.storages[0]
            self.names = [src.name or str(st) for src, st in zip(sources, self.storages)]
            if fetch_threads is None:  # what each storage prefers; a remote source's latency decides
                fetch_threads = max(st.fetch_concurrency for st in self.storages)
            self.manifests = [read_manifest(st) for st in self.storages]
            check_sources_agree([f"source {n!r}" for n in self.names], self.manifests)
            for name, st, m in zip(self.names, self.storages, self.manifests):
                if m.format_version < 2:
                    log.warning("%s is a format-%d dataset: its manifest lists every block, so every rank reads "
                                "and hashes all of it at start; `python -m shardgen upgrade %s` makes start-up "
                                "O(shards) (same data, same order, checkpoints still resume)", name,
                                m.format_version, st)
            self.manifest, self.manifest_hashes = self.manifests[0], [m.content_hash() for m in self.manifests]
            self.manifest_hash = self.manifest_hashes[0]
            self.mixture = Mixture([block_layout(m, name) for m, name in zip(self.manifests, self.names)],
                                   [src.weight for src in sources], seed=seed, global_batch=global_batch,
                                   layout=layout, stages=stages, names=self.names)
            self.mixture.rank_slots(world_size, rank)
            if prefetch_steps < 0 or fetch_threads < 1:
                raise PlanError(f"prefetch_steps ({prefetch_steps}) must be >= 0 and fetch_threads "
                                f"({fetch_threads}) >= 1")
        except BaseException:
            self._close_storage()
            raise
        self.plan = self.mixture.plans[0]
        self.stages = [(0, [src.weight for src in sources])] + [(int(a), list(w)) for a, w in stages]
        self.seed, self.global_batch = int(seed), int(global_batch)
        self.world_size, self.rank = int(world_size), int(rank)
        self.prefetch_steps, self.varlen, self.fetch_threads = int(prefetch_steps), bool(varlen), int(fetch_threads)
        self.index = BlockIndex(self.manifests, self.storages)
        self._pipelines: list[_Pipeline] = []
        for name, p in zip(self.names, self.mixture.plans):
            log.info("%s: %s in %s; %s; %s of each epoch's order %s dropped (%d after the last stream, %d at "
                     "the end of %s)", name, plural(p.num_sequences, "sequence"), plural(p.num_blocks, "block"),
                     _order_shape(p, len(self.mixture.plans) > 1), plural(p.dropped_per_epoch, "sequence"),
                     "is" if p.dropped_per_epoch == 1 else "are", p.num_sequences - p.layout * p.stream_length,
                     p.stream_length - p.steps_per_epoch * p.items_per_stream,
                     "the stream" if p.layout == 1 else f"each of the {p.layout} streams")

    @property
    def num_sources(self) -> int:
        return len(self.manifests)

    @property
    def layout(self) -> int:
        return self.mixture.layout

    @property
    def steps_per_epoch(self) -> int:
        """Steps per epoch of the first source (of the dataset, for one)."""
        return self.plan.steps_per_epoch

    @property
    def dropped_per_epoch(self) -> int:
        return self.plan.dropped_per_epoch

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world_size

    def sequences_before(self, step: int) -> list[int]:
        """Sequences of each source in the global batches of steps [0, step): exact, any rank."""
        return [n * self.mixture.items_per_slot for n in self.mixture.slots_before(int(step))]

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
    def _stage_table(self) -> list[dict]:
        return [{"start_step": a, "weights": [str(as_fraction(w)) for w in ws]} for a, ws in self.stages]

    def state_dict(self, next_step: int) -> dict:
        state = {"format_version": STATE_VERSION, "seed": self.seed, "global_batch": self.global_batch,
                 "layout": self.layout, "step": int(next_step)}
        if self.num_sources == 1:  # the one-dataset state of every earlier version
            state.update(manifest_hash=self.manifest_hash, epoch=int(next_step) // self.steps_per_epoch)
        else:
            state.update(sources=[{"name": n, "manifest_hash": h} for n, h in zip(self.names, self.manifest_hashes)],
                         stages=self._stage_table())
        return state

    def check_state(self, state: dict) -> int:
        """The step to resume at, or DataStateError if `state` was made for another data order."""
        mixed = "sources" in state
        keys = ("format_version", "seed", "global_batch", "layout", "step") + (
            ("sources", "stages") if mixed else ("manifest_hash", "epoch"))
        missing = [k for k in keys if k not in state]
        if missing:
            raise DataStateError(f"data state lacks {missing}: it is not a TokenLoader.state_dict() "
                                 f"(keys {list(keys)})")
        if state["format_version"] != STATE_VERSION:
            raise DataStateError(f"data state format_version {state['format_version']} is not "
                                 f"{STATE_VERSION}: the data order changed between versions; resume "
                                 f"with the trainer version that wrote the checkpoint, or start a new run")
        step = int(state["step"])
        if mixed != (self.num_sources > 1):
            was = f"a mixture of {len(state['sources'])} sources" if mixed else "one dataset"
            raise DataStateError(f"cannot resume this data state: the run was started on {was}, the config now "
                                 f"has {plural(self.num_sources, 'source')}: give it the data it was started on, or "
                                 f"start a new run")
        changed = self._changed_sources(state, step) if mixed else []
        if not mixed and not self._same_data(0, state["manifest_hash"]):
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
                           f"run's first launch; use layout {state['layout']} (trainer: data.streams="
                           f"{state['layout']}, or leave data.streams unset to take the checkpoint's)")
        if changed:
            raise DataStateError("cannot resume this data state: " + "; ".join(changed)
                                 + ". Or start a new run (a fresh data order).")
        if step < 0 or (not mixed and int(state["epoch"]) != step // self.steps_per_epoch):
            raise DataStateError(f"data state is inconsistent: step {step} is in epoch "
                                 f"{step // self.steps_per_epoch}, the state says {state['epoch']}")
        return step

    def _same_data(self, source: int, manifest_hash: str) -> bool:
        """A checkpoint's manifest hash names this source's data: its manifest, or the format-1 manifest
        that `shardgen upgrade` converted into it (the same shards, so the same order)."""
        up = self.manifests[source].upgraded_from or {}
        return manifest_hash in (self.manifest_hashes[source], up.get("manifest_sha256"))

    def _changed_sources(self, state: dict, step: int) -> list[str]:
        """What differs from the saved mixture in a way that changes steps before `step`."""
        names = [s["name"] for s in state["sources"]]
        if names != self.names:
            return [f"the sources changed ({', '.join(names)} -> {', '.join(self.names)}): list the sources "
                    f"the run was started with, in the same order"]
        changed = [f"source {n!r} changed (manifest hash {s['manifest_hash'][:12]}... -> {h[:12]}... at {st}): "
                   f"point it at the shards the run was started on"
                   for n, s, h, st in zip(names, state["sources"], self.manifest_hashes, self.storages)
                   if not self._same_data(names.index(n), s["manifest_hash"])]
        # Stages that started before `step` made the steps taken: they must be the same. Later ones may change.
        def taken(table):
            return {int(t["start_step"]): t["weights"] for t in table if int(t["start_step"]) < step}
        was, now = taken(state["stages"]), taken(self._stage_table())
        for start in sorted(set(was) | set(now)):
            label = "the base weights" if start == 0 else f"the stage at step {start}"
            if start not in now:
                changed.append(f"{label} was removed, but steps {start}..{step - 1} were taken with it: put it back")
            elif start not in was:
                changed.append(f"{label} was added, but the run is at step {step}: start it at step {step} or later")
            elif was[start] != now[start]:
                diff = ", ".join(f"{n} {a} -> {b}" for n, a, b in zip(names, was[start], now[start]) if a != b)
                changed.append(f"{label} changed ({diff}) after steps were taken with them: set them back "
                               f"(a new stage starting at step {step} or later may change the mix)")
        return changed

    def close(self) -> None:
        for pipe in list(self._pipelines):
            pipe.close()
        self._pipelines.clear()
        self._close_storage()

    def _close_storage(self) -> None:
        for st in self._owned:
            st.close()
        self._owned = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Pipeline:
    """One run of iter_batches: the window of planned steps, their blocks and their assembly."""

    def __init__(self, loader: TokenLoader, start_step: int):
        self.loader, self.mixture = loader, loader.mixture
        self.reader = BlockReader(loader.storages, loader.index)
        self.offsets = np.asarray(loader.index.offsets[:-1], dtype=np.int64)
        # block id -> (the source epoch its keep-until step was computed for, that step); only blocks
        # not yet past that step are kept, so this holds about the live blocks, not the dataset's
        self._kept_for: dict[int, tuple[int, int]] = {}
        self._kept_size = 1024
        self.cache = BlockCache(loader.index, self.reader, threads=loader.fetch_threads)
        # One source: the index keeps, from each table it reads, the entries of this rank's blocks of the
        # epochs in flight (filled here, in the consumer thread; read by the fetch threads).
        self._rank_blocks: dict[int, np.ndarray] = {}
        if self.mixture.num_sources == 1:
            loader.index.wanted = self._wanted
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
        rows = self.mixture.step_rows(step, self.loader.world_size, self.loader.rank)
        ids = self.offsets[rows.sources] + rows.blocks
        if self.mixture.num_sources == 1:
            self._note_epochs(rows.epochs)
        slots, fetches = self.cache.acquire(ids, step, self._keep_until(rows, ids, step))
        self._release_finished()
        shard, seq = self.mixture.sequences(rows.sources, rows.blocks, rows.rows)
        sequences = list(zip(shard.tolist(), seq.tolist()))
        self.window.append((step, self._assembler.submit(self._assemble, rows, slots, fetches, sequences)))

    def _wanted(self, lo: int, hi: int) -> np.ndarray:
        parts = [ids[np.searchsorted(ids, lo):np.searchsorted(ids, hi)] for ids in list(self._rank_blocks.values())]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def _note_epochs(self, epochs: np.ndarray) -> None:
        for e in np.unique(epochs).tolist():
            if e not in self._rank_blocks:
                ids = self.mixture.plans[0].rank_blocks(e, self.loader.world_size, self.loader.rank)
                kept = {k: v for k, v in self._rank_blocks.items() if k >= e - 1}
                self._rank_blocks = {**kept, e: ids}  # replaced whole: the fetch threads read it
                self.loader.index.retain(self._wanted(0, self.loader.index.num_blocks))

    def _keep_until(self, rows: MixStep, ids: np.ndarray, step: int) -> np.ndarray:
        """Per row, the step until which its block stays alive: its last use in its source's epoch (by
        any rank), so each block is fetched once per epoch however rarely its source is drawn. Worked
        out once per block and epoch; other rows pass `step` (the cache only raises a block's mark)."""
        keep = np.full(len(ids), step, dtype=np.int64)
        kept = self._kept_for
        need = np.array([kept.get(b, (-1, 0))[0] != e for b, e in zip(ids.tolist(), rows.epochs.tolist())],
                        dtype=bool)
        if need.any():
            for i, e in set(zip(rows.sources[need].tolist(), rows.epochs[need].tolist())):
                sel = need & (rows.sources == i) & (rows.epochs == e)
                keep[sel] = self.mixture.block_last_use(i, e, rows.blocks[sel])
            kept.update(zip(ids[need].tolist(), zip(rows.epochs[need].tolist(), keep[need].tolist())))
            if len(kept) > 2 * self._kept_size:  # a block past its last use is not asked for again that epoch
                self._kept_for = {b: eu for b, eu in kept.items() if eu[1] >= step}
                self._kept_size = len(self._kept_for) + 1024
        return keep

    def _assemble(self, rows: MixStep, slots: np.ndarray, fetches: list[Future],
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
        return Batch(step=rows.step, epoch=int(rows.epochs[0]) if len(rows.epochs) else 0,
                     input_ids=torch.from_numpy(tokens.astype(np.int64)), cu_seqlens=cu, sequences=sequences,
                     sources=rows.sources.tolist())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for _, fut in self.window:
            fut.cancel()
        self.window.clear()
        self.cache.close()
        self._assembler.shutdown(wait=True, cancel_futures=True)
        if self.loader.index.wanted == self._wanted:
            self.loader.index.wanted = None
            self.loader.index.retain(np.zeros(0, dtype=np.int64))
