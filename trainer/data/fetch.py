"""The fetch: block bytes from a Storage, decoded, held while a planned step still needs them.

One read per block (`read_range` of its tar member data: a pread locally, a ranged GET on S3),
decoded with the format's `decode_block` (length, CRC32 and zstd checked) in a small thread pool;
zstd releases the GIL, so decoding runs in parallel with the training step. Decoded rows go into
slots of fixed-size arrays so that a whole batch is gathered with one fancy index per slab chunk.

Memory is bounded by what is planned, not by the dataset: a block lives from the step that first
needs it (at most `prefetch_steps` ahead) until the last planned step that needs it has been
assembled; its slot is then reused. Slots are handed out lowest first, so the memory touched is the
peak number of blocks alive at once: about one block per local stream, twice that for the few steps
around an epoch boundary, never more than local_batch x (prefetch_steps + 1) blocks plus one per
local stream (the blocks kept for a later stream, below).

A block that a stream boundary cuts in two serves the end of one stream and the start of the next,
at steps far apart: the loader keeps it alive until its last use in the epoch (`Plan.block_last_use`),
so each block is fetched once per epoch, for at most one extra block per stream boundary of memory.

A mixture shares one cache and one slab (slots of the largest block of any source; sources have one
seq_len and dtype). Source i reads through its own C_i = ceil(w_i * C) streams (its stage-0 weight),
and each block is kept until its last use in its source's epoch (`Mixture.block_last_use`), so a
rarely drawn source keeps its current blocks between draws instead of fetching them again. Live
blocks <= sum over sources of (its streams this rank reads, twice near an epoch boundary) + local_batch
x (prefetch_steps + 1): the streams sum to about C + sources, so about one dataset's memory, not one
per source.
"""
from __future__ import annotations

import heapq
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from shards.format import Block, Manifest, block_at, decode_block, read_block_index
from shards.storage import Storage, StorageError

SLOTS_PER_CHUNK = 32


class BlockIndex:
    """Global block id -> (shard index, block index in shard, Block) of its source's manifest.

    Several sources (a mixture) share one id space: source i's blocks are ids [offsets[i],
    offsets[i+1]) in its manifest order, so one BlockCache and one slab serve them all.

    A shard's block table is read the first time one of its blocks is asked for: one read of its
    `.blocks` file (format 2; a format-1 manifest carries the tables). Whole tables are kept for the
    `cached_shards` shards used most recently (80 KiB each for 4,096 blocks). A rank of many reads
    a few blocks of most shards each epoch, so with `wanted` set (the reader's blocks of the epochs
    in flight, by id range) a table read also keeps the entries of every block of that shard the
    reader will want (a few bytes each), until `forget`: each index is then read once per epoch
    however many shards there are, and memory is the rank's blocks, not the dataset's."""

    def __init__(self, manifests: Manifest | list[Manifest], storages: Storage | list[Storage] | None = None,
                 cached_shards: int = 64):
        self.manifests = [manifests] if isinstance(manifests, Manifest) else list(manifests)
        self.manifest = self.manifests[0]
        self.storages = storages if isinstance(storages, list) else [storages] * len(self.manifests)
        self.cached_shards = max(1, cached_shards)
        # first global id of every shard of every source, then the end: [sum of shards + 1]
        counts = [s.num_blocks for m in self.manifests for s in m.shards]
        self.first_block = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self.first_block[1:])
        shard_offsets = np.cumsum([0] + [len(m.shards) for m in self.manifests])
        self.shard_offsets = shard_offsets  # source i's shards are [shard_offsets[i], shard_offsets[i+1])
        self.offsets = [int(self.first_block[k]) for k in shard_offsets]
        self.num_blocks = self.offsets[-1]
        rows = [r for m in self.manifests for s in m.shards
                for r in ([s.rows_per_block, s.last_block_rows] + (s.varying_rows or []))]
        self.max_rows = max(rows, default=1)
        self.index_reads = 0  # `.blocks` files read: one per shard touched (while it stays cached)
        self._tables: OrderedDict[int, np.ndarray] = OrderedDict()
        self.wanted: Callable[[int, int], np.ndarray] | None = None  # (lo, hi) -> sorted ids wanted in [lo, hi)
        self._entries: dict[int, Block] = {}
        self._read_locks = [threading.Lock() for _ in range(64)]
        self._lock = threading.Lock()

    def locate(self, block_id: int) -> tuple[int, int, int]:
        """(source, shard index in its manifest, block index in the shard)."""
        k = int(np.searchsorted(self.first_block, block_id, side="right")) - 1
        source = int(np.searchsorted(self.shard_offsets, k, side="right")) - 1
        return source, k - int(self.shard_offsets[source]), int(block_id - self.first_block[k])

    def table(self, source: int, i: int) -> np.ndarray:
        """Shard i's block table, read once while it stays cached (concurrent callers wait for one read)."""
        key = int(self.shard_offsets[source]) + i
        with self._lock:
            got = self._tables.get(key)
            if got is not None:
                self._tables.move_to_end(key)
                return got
        with self._read_locks[key % len(self._read_locks)]:
            with self._lock:
                got = self._tables.get(key)
            if got is None:
                shard = self.manifests[source].shards[i]
                got = read_block_index(self.storages[source], shard)
                with self._lock:
                    self.index_reads += shard.blocks is None
                    self._tables[key] = got
                    while len(self._tables) > self.cached_shards:
                        self._tables.popitem(last=False)
            return got

    def block(self, block_id: int) -> tuple[int, int, int, Block]:
        """(source, shard index, block index in shard, Block); may read the shard's table."""
        source, i, j = self.locate(block_id)
        got = self._entries.get(block_id)
        if got is not None:
            return source, i, j, got
        table = self.table(source, i)
        if self.wanted is not None:
            k = int(self.shard_offsets[source]) + i
            lo = int(self.first_block[k])
            ids = self.wanted(lo, int(self.first_block[k + 1]))
            self._entries.update((b, block_at(table, b - lo)) for b in ids.tolist())
        return source, i, j, block_at(table, j)

    def forget(self, block_ids) -> None:
        """Drop the kept entries of blocks the reader is done with (until they are wanted again)."""
        for b in block_ids:
            self._entries.pop(b, None)

    def retain(self, wanted: np.ndarray) -> None:
        """Keep only the entries of `wanted` ids (sorted): when the epochs in flight change."""
        ids = np.fromiter(list(self._entries), dtype=np.int64)
        i = np.minimum(np.searchsorted(wanted, ids), max(0, len(wanted) - 1))
        gone = ids if not len(wanted) else ids[wanted[i] != ids]
        self.forget(gone.tolist())

    def where(self, storage: Storage, block_id: int, blk: Block | None = None) -> str:
        source, i, j = self.locate(block_id)
        name = self.manifests[source].shards[i].name
        span = f" (bytes {blk.offset}-{blk.offset + blk.length - 1})" if blk is not None else ""
        return f"{storage.where(name)}: shard {name} (index {i}) block {j}{span}"


class Slab:
    """Fixed-shape slots [max_rows, seq_len] in chunks that are allocated on first use."""

    def __init__(self, max_rows: int, seq_len: int, dtype: np.dtype):
        self.shape, self.dtype = (SLOTS_PER_CHUNK, max_rows, seq_len), dtype
        self.chunks: list[np.ndarray] = []
        self._free: list[int] = []  # a heap: lowest slot first
        self._next = 0
        self.peak = 0

    @property
    def slot_bytes(self) -> int:
        return self.shape[1] * self.shape[2] * self.dtype.itemsize

    def take(self) -> int:
        if self._free:
            slot = heapq.heappop(self._free)
        else:
            slot, self._next = self._next, self._next + 1
            if slot // SLOTS_PER_CHUNK >= len(self.chunks):
                self.chunks.append(np.empty(self.shape, self.dtype))
        self.peak = max(self.peak, self._next - len(self._free))
        return slot

    def give(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def view(self, slot: int) -> np.ndarray:
        return self.chunks[slot // SLOTS_PER_CHUNK][slot % SLOTS_PER_CHUNK]

    def gather(self, slots: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        """out[i] = row rows[i] of slot slots[i]; one fancy index per chunk involved."""
        chunk, idx = np.divmod(slots, SLOTS_PER_CHUNK)
        if len(self.chunks) == 1:
            out[:] = self.chunks[0][idx, rows]
            return
        for c in np.unique(chunk):
            sel = chunk == c
            out[sel] = self.chunks[c][idx[sel], rows[sel]]


class BlockReader:
    """Reads one block (one `read_range`) and decodes it into a slot. Runs in the pool threads.
    `storage`: one Storage, or one per source of the index."""

    def __init__(self, storage: Storage | list[Storage], index: BlockIndex):
        self.storages = [storage] if isinstance(storage, Storage) else list(storage)
        self.storage, self.index = self.storages[0], index
        self.blocks_read = 0
        self.bytes_read = 0
        self.bytes_by_source = [0] * len(self.storages)
        self._lock = threading.Lock()

    def __call__(self, block_id: int, out: np.ndarray) -> None:
        source, i, _ = self.index.locate(block_id)
        storage, manifest = self.storages[source], self.index.manifests[source]
        try:
            _, _, _, blk = self.index.block(block_id)  # the first block of a shard reads its table
        except StorageError as e:
            raise StorageError(f"{self.index.where(storage, block_id)}: {e}") from None
        where = self.index.where(storage, block_id, blk)
        try:
            data = storage.read_range(manifest.shards[i].name, blk.offset, blk.length)
        except StorageError as e:
            raise StorageError(f"{where}: {e}") from None
        except OSError as e:  # a local read that fails below the Storage layer (EIO, a folder in its place)
            raise StorageError(f"{where}: cannot read ({e.strerror or e})") from e
        with self._lock:
            self.blocks_read += 1
            self.bytes_read += len(data)
            self.bytes_by_source[source] += len(data)
        out[:blk.rows] = decode_block(data, blk, manifest, where)


class BlockCache:
    """Which blocks are alive, in which slot, until which step. Driven by one thread (the loader's
    consumer); only `fill(block_id, slot_view)` runs in the pool. The state of the live blocks lives
    in arrays sorted by block id (a few bytes per live block, nothing per dataset block), so a step
    costs numpy calls, not a loop over rows."""

    def __init__(self, index: BlockIndex, fill: Callable[[int, np.ndarray], None], *, threads: int):
        m = index.manifest
        self.index = index
        self.slab = Slab(index.max_rows, m.seq_len, m.np_dtype)
        self._fill = fill
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="block-fetch")
        self._live = np.empty(0, dtype=np.int64)  # ids of the blocks alive, sorted
        self._slot = np.empty(0, dtype=np.int64)  # their slots
        self._last_step = np.empty(0, dtype=np.int64)  # the last step that needs each

    def _find(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = np.searchsorted(self._live, blocks)
        hit = i < len(self._live)
        hit[hit] = self._live[i[hit]] == blocks[hit]
        return i, hit

    def acquire(self, blocks: np.ndarray, step: int, keep_until: np.ndarray | None = None
                ) -> tuple[np.ndarray, list[Future]]:
        """Slots of `blocks` for `step` (steps come in increasing order) and the futures of the fills
        started for blocks that were not alive. Earlier steps' futures cover the other blocks.
        `keep_until` (per block): keep the block alive until that step even if no step planned so
        far needs it (the plan's last use of a block cut by a stream boundary)."""
        blocks = np.asarray(blocks, dtype=np.int64)
        _, hit = self._find(blocks)
        new = np.unique(blocks[~hit])
        futures, slots = [], []
        for b in new.tolist():
            slot = self.slab.take()
            slots.append(slot)
            futures.append(self._pool.submit(self._fill, b, self.slab.view(slot)))
        if len(new):
            live = np.concatenate([self._live, new])
            order = np.argsort(live, kind="stable")
            self._live = live[order]
            self._slot = np.concatenate([self._slot, np.asarray(slots, dtype=np.int64)])[order]
            self._last_step = np.concatenate([self._last_step, np.full(len(new), -1, dtype=np.int64)])[order]
        i, _ = self._find(blocks)
        # only ever raised: a block kept for a later step stays kept when an earlier step also needs it
        until = np.full(len(blocks), step, dtype=np.int64) if keep_until is None else np.maximum(step, keep_until)
        np.maximum.at(self._last_step, i, until)
        return self._slot[i], futures

    def release_through(self, step: int) -> None:
        """Free the blocks that no step after `step` (among those acquired so far) needs."""
        done = self._last_step <= step
        if done.any():
            for slot in self._slot[done].tolist():
                self.slab.give(int(slot))
            self.index.forget(self._live[done].tolist())
            keep = ~done
            self._live, self._slot, self._last_step = self._live[keep], self._slot[keep], self._last_step[keep]

    def slots_of(self, blocks: np.ndarray) -> np.ndarray:
        """Slot of each block (-1: not alive)."""
        i, hit = self._find(np.asarray(blocks, dtype=np.int64))
        if not len(self._slot):
            return np.full(len(i), -1, dtype=np.int64)
        return np.where(hit, self._slot[np.minimum(i, len(self._slot) - 1)], -1)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.index.forget(self._live.tolist())
        self._live = self._live[:0]
        self._slot = self._slot[:0]
        self._last_step = self._last_step[:0]
