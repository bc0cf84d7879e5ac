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
"""
from __future__ import annotations

import heapq
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from shards.format import Block, Manifest, decode_block
from shards.storage import Storage, StorageError

SLOTS_PER_CHUNK = 32


class BlockIndex:
    """Global block id -> (shard index, block index in shard, Block) of its source's manifest.

    Several sources (a mixture) share one id space: source i's blocks are ids [offsets[i],
    offsets[i+1]) in its manifest order, so one BlockCache and one slab serve them all."""

    def __init__(self, manifests: Manifest | list[Manifest]):
        self.manifests = [manifests] if isinstance(manifests, Manifest) else list(manifests)
        self.manifest = self.manifests[0]
        self.refs: list[tuple[int, int, Block]] = []
        self.offsets = [0]
        for m in self.manifests:
            self.refs += [(i, j, blk) for i, shard in enumerate(m.shards) for j, blk in enumerate(shard.blocks)]
            self.offsets.append(len(self.refs))
        self.source_of = np.repeat(np.arange(len(self.manifests), dtype=np.int64), np.diff(self.offsets))
        self.max_rows = max((blk.rows for _, _, blk in self.refs), default=1)

    def where(self, storage: Storage, block_id: int) -> str:
        i, j, blk = self.refs[block_id]
        name = self.manifests[int(self.source_of[block_id])].shards[i].name
        return (f"{storage.where(name)}: shard {name} (index {i}) block {j} "
                f"(bytes {blk.offset}-{blk.offset + blk.length - 1})")


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
        i, _, blk = self.index.refs[block_id]
        source = int(self.index.source_of[block_id])
        storage, manifest = self.storages[source], self.index.manifests[source]
        where = self.index.where(storage, block_id)
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
    consumer); only `fill(block_id, slot_view)` runs in the pool. Per-block state lives in arrays
    indexed by block id (a few bytes per block), so a step costs numpy calls, not a loop over rows."""

    def __init__(self, index: BlockIndex, fill: Callable[[int, np.ndarray], None], *, threads: int):
        m = index.manifest
        self.slab = Slab(index.max_rows, m.seq_len, m.np_dtype)
        self._fill = fill
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="block-fetch")
        self._slot = np.full(len(index.refs), -1, dtype=np.int64)  # -1: not alive
        self._last_step = np.full(len(index.refs), -1, dtype=np.int64)  # last acquiring step
        self._live = np.empty(0, dtype=np.int64)  # ids of the blocks alive

    def acquire(self, blocks: np.ndarray, step: int, keep_until: np.ndarray | None = None
                ) -> tuple[np.ndarray, list[Future]]:
        """Slots of `blocks` for `step` (steps come in increasing order) and the futures of the fills
        started for blocks that were not alive. Earlier steps' futures cover the other blocks.
        `keep_until` (per block): keep the block alive until that step even if no step planned so
        far needs it (the plan's last use of a block cut by a stream boundary)."""
        new = np.unique(blocks[self._slot[blocks] < 0])
        futures = []
        for b in new.tolist():
            slot = self.slab.take()
            self._slot[b] = slot
            futures.append(self._pool.submit(self._fill, b, self.slab.view(slot)))
        if len(new):
            self._live = np.concatenate([self._live, new])
        # only ever raised: a block kept for a later step stays kept when an earlier step also needs it
        until = np.full(len(blocks), step, dtype=np.int64) if keep_until is None else np.maximum(step, keep_until)
        np.maximum.at(self._last_step, blocks, until)
        return self._slot[blocks], futures

    def release_through(self, step: int) -> None:
        """Free the blocks that no step after `step` (among those acquired so far) needs."""
        done = self._last_step[self._live] <= step
        if done.any():
            for b in self._live[done].tolist():
                self.slab.give(int(self._slot[b]))
                self._slot[b] = -1
            self._live = self._live[~done]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._slot[:] = -1
        self._live = self._live[:0]
