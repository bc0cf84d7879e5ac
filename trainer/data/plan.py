"""The data plan: which sequences, in what order, for which rank. Pure arithmetic, no I/O.

Inputs are only the per-block row counts of the manifest (shard by shard), the seed, the global
batch G (sequences per optimizer step) and the layout C (number of streams, fixed at the first
launch, C | G). Notation:

- blocks are flattened in manifest order (shard i, block j) -> global block id b in [0, B);
  a sequence is (shard index, rows of the shard's earlier blocks + row);
- epoch e orders all N sequences: the blocks in a permutation keyed by (seed, e), and inside each
  block its rows in a permutation keyed by (seed, e, b);
- stream c is the contiguous slice [c*L, (c+1)*L) of that order, L = N // C; each step takes
  k = G // C items from every stream, so an epoch has S = L // k steps and drops N - S*G sequences;
- global row c*k + j of step s is epoch position c*L + t*k + j (e = s // S, t = s % S); rank r of R
  gets the streams [r*C/R, (r+1)*C/R), i.e. global rows [r*G/R, (r+1)*G/R).

Any step is located directly (a per-epoch prefix sum + searchsorted): resuming at step 10**6 costs
what step 0 costs. Permutations come from argsort of splitmix64 hashes in numpy uint64 arithmetic,
not from numpy's Generator, whose streams are not promised to stay the same across versions:
H(p1, ..., pn) = m(...m(m(0 ^ p1) ^ p2)... ^ pn) with m the splitmix64 finalizer; block b of epoch e
sorts by H(seed, TAG_BLOCKS, e, b), row r of block b by H(seed, TAG_ROWS, e, b, r); ties (never
seen in practice) keep the lower index first.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from shards.errors import UserError
from shards.progress import plural

_TAG_BLOCKS = 0x426C6F636B73  # "Blocks": keys the block permutation of an epoch
_TAG_ROWS = 0x526F7773  # "Rows": keys the row permutation of one block in an epoch
_U64 = (1 << 64) - 1


class PlanError(UserError, ValueError):
    """Settings that give no valid plan (too few sequences, a layout that does not fit). Names the fix."""


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, elementwise on uint64 (wrapping arithmetic, as in the C original)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash_keys(prefix: Sequence[int], last: np.ndarray) -> np.ndarray:
    """Hash of (prefix..., last[i]) for every i: each part is xor-ed in, then mixed."""
    h = np.zeros(1, dtype=np.uint64)
    for part in prefix:
        h = splitmix64(h ^ np.uint64(int(part) & _U64))
    return splitmix64(h ^ np.asarray(last).astype(np.uint64))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _or_list(xs: list[int]) -> str:
    xs = [str(x) for x in xs]
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " or " + xs[-1]


@dataclass(frozen=True)
class StepRows:
    """The rows of one step for one rank, in batch-row order: global block id and row inside it."""
    step: int
    epoch: int
    blocks: np.ndarray  # int64 [rows]
    rows: np.ndarray  # int64 [rows], row inside the block (not the position in the shard)


class BlockLayout:
    """Every block's row count, in O(shards + exceptions) memory: all blocks hold `base` rows except
    the listed ones (a shardgen dataset: one shorter last block per task). Global block ids run over
    the shards in manifest order; shard i owns ids [first_block[i], first_block[i + 1])."""

    def __init__(self, shard_blocks: np.ndarray, base: int, exc_ids: np.ndarray, exc_rows: np.ndarray):
        self.first_block = np.zeros(len(shard_blocks) + 1, dtype=np.int64)
        np.cumsum(shard_blocks, out=self.first_block[1:])
        order = np.argsort(exc_ids, kind="stable")
        self.base, self.exc_ids, self.exc_rows = int(base), exc_ids[order], exc_rows[order]
        self.exc_delta = self.exc_rows - self.base
        self._exc_cum = np.zeros(len(self.exc_ids) + 1, dtype=np.int64)
        np.cumsum(self.exc_delta, out=self._exc_cum[1:])
        self.num_blocks = int(self.first_block[-1])
        self.num_sequences = self.num_blocks * self.base + int(self._exc_cum[-1])
        self.max_rows = max([self.base] + ([int(self.exc_rows.max())] if len(self.exc_rows) else []))

    @classmethod
    def from_lists(cls, block_rows: Sequence[Sequence[int]], name: str = "dataset") -> "BlockLayout":
        """From every block's rows, shard by shard (O(blocks): tests, tools, format-1 manifests)."""
        counts = np.array([len(x) for x in block_rows], dtype=np.int64)
        rows = np.concatenate([np.asarray(x, dtype=np.int64) for x in block_rows]) if len(counts) else np.zeros(0, np.int64)
        _check_rows(rows, np.repeat(np.arange(len(counts)), counts), name)
        base = _mode(rows, np.ones_like(rows))
        exc = np.flatnonzero(rows != base)
        return cls(counts, base, exc.astype(np.int64), rows[exc])

    @classmethod
    def from_shards(cls, blocks: Sequence[int], rows_per_block: Sequence[int], last_block_rows: Sequence[int],
                    name: str = "dataset") -> "BlockLayout":
        """From per-shard summaries: `blocks[i]` blocks of `rows_per_block[i]` rows, the last of `last_block_rows[i]`."""
        nb, rpb, last = (np.asarray(x, dtype=np.int64) for x in (blocks, rows_per_block, last_block_rows))
        has = nb > 0
        _check_rows(np.r_[rpb[nb > 1], last[has]], np.r_[np.flatnonzero(nb > 1), np.flatnonzero(has)], name)
        base = _mode(np.r_[rpb, last], np.r_[np.maximum(nb - 1, 0), has.astype(np.int64)])
        first = np.r_[0, np.cumsum(nb)[:-1]]
        odd = np.flatnonzero((rpb != base) & (nb > 1))  # whole shards of another block size: rare
        ids = [np.arange(first[i], first[i] + nb[i] - 1) for i in odd]
        vals = [np.full(nb[i] - 1, rpb[i]) for i in odd]
        short = np.flatnonzero(has & (last != base))
        ids.append(first[short] + nb[short] - 1)
        vals.append(last[short])
        return cls(nb, base, np.concatenate(ids).astype(np.int64), np.concatenate(vals).astype(np.int64))

    def rows(self, blocks: np.ndarray) -> np.ndarray:
        """Rows of each global block id."""
        blocks = np.asarray(blocks, dtype=np.int64)
        out = np.full(blocks.shape, self.base, dtype=np.int64)
        if len(self.exc_ids):
            i = np.minimum(np.searchsorted(self.exc_ids, blocks), len(self.exc_ids) - 1)
            hit = self.exc_ids[i] == blocks
            out[hit] = self.exc_rows[i[hit]]
        return out

    def shard(self, blocks: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.first_block, blocks, side="right") - 1

    def rows_before(self, blocks: np.ndarray) -> np.ndarray:
        """Rows of all blocks with a smaller global id."""
        blocks = np.asarray(blocks, dtype=np.int64)
        return blocks * self.base + self._exc_cum[np.searchsorted(self.exc_ids, blocks)]


def _check_rows(rows: np.ndarray, shard: np.ndarray, name: str) -> None:
    bad = np.flatnonzero(rows < 1)
    if len(bad):
        raise PlanError(f"{name}: shard {int(shard[bad[0]])} has a block with {int(rows[bad[0]])} rows; blocks hold "
                        f"at least one")


def _mode(values: np.ndarray, weights: np.ndarray) -> int:
    """The most frequent value (the smallest among ties); 1 if there is none."""
    if not weights.sum():
        return 1
    vals, inv = np.unique(values, return_inverse=True)
    return int(vals[np.argmax(np.bincount(inv, weights=weights))])


class Plan:
    """The order of a dataset's sequences for one (seed, global batch, layout)."""

    def __init__(self, block_rows: "Sequence[Sequence[int]] | BlockLayout", *, seed: int, global_batch: int,
                 layout: int | None = None, name: str = "dataset", row_table_entries: int = 1 << 20):
        if not 0 <= int(seed) <= _U64:
            raise PlanError(f"seed {seed} is out of range: use an integer in [0, 2**64)")
        if int(global_batch) < 1:
            raise PlanError(f"global batch {global_batch} must be a positive number of sequences")
        self.name, self.seed, self.global_batch = name, int(seed), int(global_batch)
        self.layout = self.global_batch if layout is None else int(layout)
        if self.layout < 1 or self.global_batch % self.layout:
            raise PlanError(f"layout {self.layout} must divide the global batch {self.global_batch} "
                            f"(choose one of {_or_list(divisors(self.global_batch))}; default = global batch)")
        self.blocks = block_rows if isinstance(block_rows, BlockLayout) else BlockLayout.from_lists(block_rows, name)
        self.num_blocks = self.blocks.num_blocks
        self.num_sequences = self.blocks.num_sequences
        self.items_per_stream = self.global_batch // self.layout  # k
        self.stream_length = self.num_sequences // self.layout  # L
        self.steps_per_epoch = self.stream_length // self.items_per_stream  # S
        if self.num_sequences < self.global_batch or self.steps_per_epoch == 0:
            raise PlanError(f"{name}: {plural(self.num_sequences, 'sequence')} cannot fill one global batch of "
                            f"{self.global_batch} with layout {self.layout}: use a smaller global batch "
                            f"or more data")
        self.dropped_per_epoch = self.num_sequences - self.steps_per_epoch * self.global_batch
        self.max_block_rows = self.blocks.max_rows
        # Row permutations are cached per window in a table of this many blocks (4 MiB of int32).
        self.row_table_blocks = max(1, row_table_entries // self.max_block_rows)
        self._epochs: OrderedDict[int, _EpochOrder] = OrderedDict()
        self.hashed = 0  # keys hashed so far: a count of the work done, for the O(1)-resume tests

    # --- ranks
    def check_world_size(self, world_size: int) -> None:
        if world_size < 1 or self.layout % world_size:
            raise PlanError(f"world size {world_size} does not divide the layout {self.layout}; "
                            f"use {_or_list(divisors(self.layout))} {'rank' if self.layout == 1 else 'ranks'} "
                            f"(the layout is fixed at the first launch of a run)")

    def rank_streams(self, world_size: int, rank: int) -> range:
        self.check_world_size(world_size)
        if not 0 <= rank < world_size:
            raise PlanError(f"rank {rank} is not in [0, {world_size})")
        per = self.layout // world_size
        return range(rank * per, (rank + 1) * per)

    def rank_span(self, world_size: int, rank: int) -> tuple[int, int]:
        """The epoch positions [lo, hi) a rank reads in an epoch: its streams are contiguous."""
        streams = self.rank_streams(world_size, rank)
        return streams.start * self.stream_length, streams.stop * self.stream_length

    # --- the epoch order
    def epoch(self, epoch: int) -> "_EpochOrder":
        """The epoch's block order (one O(B) hashing pass, O(shards) memory; cached with the next epoch's)."""
        got = self._epochs.get(epoch)
        if got is None:
            got = self._epochs[epoch] = _EpochOrder(self, epoch)
            while len(self._epochs) > 2:  # the current epoch and the next (prefetch crosses over)
                self._epochs.popitem(last=False)
        else:
            self._epochs.move_to_end(epoch)
        return got

    def locate(self, epoch: int, positions: np.ndarray, span: tuple[int, int] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Epoch positions -> (global block id, row inside that block). `span`: the positions the caller
        will ask for in this epoch (a rank's), so that one window of the order serves them all; None:
        the whole epoch (O(blocks) memory, as a mixture of several sources needs)."""
        positions = np.asarray(positions, dtype=np.int64)
        if not len(positions):
            return positions.copy(), positions.copy()
        span = (0, self.num_sequences) if span is None else span  # no hint: one window, the whole epoch
        window = self.epoch(epoch).window(int(positions.min()), int(positions.max()), span)
        blocks, rows = [], []
        for lo in range(0, len(positions), self.row_table_blocks):  # chunks fit the row table
            b, r = window.locate(positions[lo:lo + self.row_table_blocks])
            blocks.append(b)
            rows.append(r)
        return np.concatenate(blocks), np.concatenate(rows)

    def block_last_use(self, epoch: int, blocks: np.ndarray, world_size: int = 1, rank: int = 0) -> np.ndarray:
        """For each block (of `epoch`, used by this rank), the last step of the epoch at which this rank
        needs one of its rows. A block cut by a stream boundary serves the end of one stream and the
        start of the next: its last use is near the epoch's end, so a reader that keeps it until then
        fetches every block once per epoch (no read amplification: docs/architecture.md) at the cost of one block per stream boundary."""
        streams = self.rank_streams(world_size, rank)
        L, k, S = self.stream_length, self.items_per_stream, self.steps_per_epoch
        blocks = np.asarray(blocks, dtype=np.int64)
        first = self.epoch(epoch).first_positions(blocks, self.rank_span(world_size, rank))
        lo = np.maximum(first, streams.start * L)
        hi = np.minimum(first + self.blocks.rows(blocks) - 1, streams.stop * L - 1)
        t = (hi - (hi // L) * L) // k  # the step of the block's last row in the last stream it reaches
        t = np.where(lo // L < hi // L, np.maximum(t, (L - 1) // k), t)  # earlier streams: used to their end
        return epoch * S + np.minimum(t, S - 1)

    def rank_blocks(self, epoch: int, world_size: int = 1, rank: int = 0) -> np.ndarray:
        """The blocks a rank reads in an epoch (and a few around them), sorted by id: its window."""
        lo, hi = self.rank_span(world_size, rank)
        w = self.epoch(epoch).window(lo, hi - 1, (lo, hi))
        return w.ids[w._by_id]

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """All N sequences of an epoch in order, as (block, row). O(N): for tests and tools."""
        return self.locate(epoch, np.arange(self.num_sequences, dtype=np.int64), (0, self.num_sequences))

    # --- steps
    def positions(self, step: int, world_size: int = 1, rank: int = 0) -> tuple[int, np.ndarray]:
        """(epoch, epoch positions of this rank's rows at `step`, in batch-row order)."""
        if step < 0:
            raise PlanError(f"step {step} is negative")
        streams = self.rank_streams(world_size, rank)
        epoch, t = divmod(int(step), self.steps_per_epoch)
        k = self.items_per_stream
        first = np.arange(streams.start, streams.stop, dtype=np.int64) * self.stream_length + t * k
        return epoch, (first[:, None] + np.arange(k, dtype=np.int64)[None, :]).ravel()

    def step_rows(self, step: int, world_size: int = 1, rank: int = 0) -> StepRows:
        epoch, pos = self.positions(step, world_size, rank)
        blocks, rows = self.locate(epoch, pos, self.rank_span(world_size, rank))
        return StepRows(step=int(step), epoch=epoch, blocks=blocks, rows=rows)

    def sequences(self, blocks: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, sequence index inside the shard) of block rows."""
        shard = self.blocks.shard(blocks)
        first = self.blocks.rows_before(blocks) - self.blocks.rows_before(self.blocks.first_block[shard])
        return shard, first + rows


# The epoch order without materialising it. Block keys are distinct (splitmix64 is a bijection of
# uint64 and the block ids differ), so the order is the sorted keys. A histogram of the keys' top
# bits (one hashing pass) gives, per bucket, the blocks and rows of all smaller buckets; the blocks
# of the buckets a rank reads are then collected and sorted: a window of the order, exact.
_CHUNK = 1 << 16  # blocks hashed per numpy call: large enough to amortize it, small enough for the cache
_MAX_BUCKET_BITS = 16


_C1, _C2, _C3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _hash_range(h: np.uint64, lo: int, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """splitmix64(h ^ b) for b in [lo, lo + len(out)), in place: hash_keys of a range with its prefix
    hash h, the same numbers without a new array per operation (the hot loop of an epoch's pass)."""
    out[:] = np.arange(lo, lo + len(out), dtype=np.uint64)
    with np.errstate(over="ignore"):
        out ^= h
        out += _C1
        np.right_shift(out, np.uint64(30), out=tmp)
        out ^= tmp
        out *= _C2
        np.right_shift(out, np.uint64(27), out=tmp)
        out ^= tmp
        out *= _C3
        np.right_shift(out, np.uint64(31), out=tmp)
        out ^= tmp
    return out


class _EpochOrder:
    blocks_per_bucket = 64  # at least, on average (tests lower it to get many buckets from few blocks)
    guess_margin = 4.0  # standard deviations of a bucket's position kept on each side of a first guess

    def __init__(self, plan: Plan, epoch: int):
        self.plan, self.epoch = plan, epoch
        self.prefix = (plan.seed, _TAG_BLOCKS, epoch)
        self.bits = min(_MAX_BUCKET_BITS, (plan.num_blocks // self.blocks_per_bucket).bit_length())
        self.hist: np.ndarray | None = None
        self.windows: list[_Window] = []  # most recent last

    def _top(self, keys: np.ndarray) -> np.ndarray:
        if self.bits == 0:
            return np.zeros(len(keys), dtype=np.intp)
        return (keys >> np.uint64(64 - self.bits)).view(np.int64)  # < 2**16: the same as a signed index

    def _pass(self, lo_bucket: int, hi_bucket: int) -> tuple[np.ndarray, np.ndarray]:
        """Hash every block once; collect (ids, keys) of those in buckets [lo, hi]; histogram if not yet."""
        plan, B = self.plan, self.plan.num_blocks
        nb = 1 << self.bits
        hist = np.zeros(nb, dtype=np.int64) if self.hist is None else None
        everything = lo_bucket <= 0 and hi_bucket >= nb - 1
        ids_out, keys_out = [], []
        h = hash_keys(self.prefix[:-1], np.array([self.prefix[-1]], dtype=np.uint64))[0]
        buf, tmp = np.empty(_CHUNK, dtype=np.uint64), np.empty(_CHUNK, dtype=np.uint64)
        for lo in range(0, B, _CHUNK):
            n = min(_CHUNK, B - lo)
            keys = _hash_range(h, lo, buf[:n], tmp[:n])  # = hash_keys(self.prefix, arange(lo, lo + n))
            if hist is not None or not everything:
                top = self._top(keys)
            if hist is not None:
                hist += np.bincount(top, minlength=nb)
            if everything:
                ids_out.append(np.arange(lo, lo + n, dtype=np.int64))
                keys_out.append(keys.copy())
            else:
                sel = np.flatnonzero((top >= lo_bucket) & (top <= hi_bucket))
                ids_out.append(sel + lo)
                keys_out.append(keys[sel])
        plan.hashed += B
        if hist is not None:
            self._set_hist(hist)
        return (np.concatenate(ids_out or [np.zeros(0, np.int64)]),
                np.concatenate(keys_out or [np.zeros(0, np.uint64)]))

    def _set_hist(self, hist: np.ndarray) -> None:
        layout = self.plan.blocks
        nb = len(hist)
        self.hist = hist
        self.cum_blocks = np.zeros(nb + 1, dtype=np.int64)
        np.cumsum(hist, out=self.cum_blocks[1:])
        delta = np.zeros(nb, dtype=np.int64)  # rows of the exceptions minus base, per bucket
        if len(layout.exc_ids):
            exc_keys = hash_keys(self.prefix, layout.exc_ids.astype(np.uint64))
            self.plan.hashed += len(exc_keys)
            np.add.at(delta, self._top(exc_keys), layout.exc_delta)
        self.cum_rows = self.cum_blocks * layout.base
        self.cum_rows[1:] += np.cumsum(delta)

    def _bucket(self, position: int) -> int:
        return int(np.searchsorted(self.cum_rows, position, side="right")) - 1

    def window(self, lo: int, hi: int, span: tuple[int, int] | None) -> "_Window":
        """A window holding epoch positions lo..hi (inclusive), built to cover `span` if it must be built."""
        if self.hist is not None:
            a, b = self._bucket(lo), self._bucket(hi)
            for w in reversed(self.windows):
                if w.lo_bucket <= a and b <= w.hi_bucket:
                    return w
        s_lo, s_hi = span if span is not None else (lo, hi + 1)
        s_lo, s_hi = min(s_lo, lo), max(s_hi - 1, hi)
        if self.hist is None:  # first pass: guess the span's buckets (keys are uniform), with a margin
            nb, N, B = 1 << self.bits, self.plan.num_sequences, self.plan.num_blocks
            margin = int(self.guess_margin * nb / max(1.0, B ** 0.5))  # sd of a count: sqrt(B)/2 blocks
            guess = (max(0, s_lo * nb // N - margin), min(nb - 1, s_hi * nb // N + margin))
            ids, keys = self._pass(*guess)
            a, b = self._bucket(s_lo), self._bucket(s_hi)
            if guess[0] <= a and b <= guess[1]:
                return self._keep(_Window(self, guess[0], guess[1], ids, keys))
        a, b = self._bucket(s_lo), self._bucket(s_hi)
        return self._keep(_Window(self, a, b, *self._pass(a, b)))

    def _keep(self, w: "_Window") -> "_Window":
        self.windows.append(w)
        del self.windows[:-4]  # a rank needs one per epoch; tools asking for several ranks, a few
        return w

    def first_positions(self, blocks: np.ndarray, span: tuple[int, int]) -> np.ndarray:
        """Epoch position of each block's first row (the blocks lie in `span`'s window)."""
        if not len(blocks):
            return np.zeros(0, dtype=np.int64)
        top = self._top(hash_keys(self.prefix, blocks.astype(np.uint64)))
        a, b = int(top.min()), int(top.max())
        for w in reversed(self.windows):
            if w.lo_bucket <= a and b <= w.hi_bucket:
                return w.first_positions(blocks)
        w = self.window(span[0], span[1] - 1, span)
        if not (w.lo_bucket <= a and b <= w.hi_bucket):  # blocks outside the span: a window just for them
            a, b = min(a, w.lo_bucket), max(b, w.hi_bucket)
            w = self._keep(_Window(self, a, b, *self._pass(a, b)))
        return w.first_positions(blocks)


class _Window:
    """The blocks of buckets [lo_bucket, hi_bucket] in epoch order, their first positions, and a table
    of the row permutations computed so far (window slot -> table row), so a step is located without a
    Python loop over its rows or blocks. The table is cleared when full: it only saves recomputation."""

    def __init__(self, order: _EpochOrder, lo_bucket: int, hi_bucket: int, ids: np.ndarray, keys: np.ndarray):
        plan = order.plan
        self.plan, self.epoch, self.lo_bucket, self.hi_bucket = plan, order.epoch, lo_bucket, hi_bucket
        self.ids = ids[np.argsort(keys)]
        assert len(self.ids) == order.cum_blocks[hi_bucket + 1] - order.cum_blocks[lo_bucket]
        self.starts = np.empty(len(self.ids) + 1, dtype=np.int64)
        self.starts[0] = order.cum_rows[lo_bucket]
        np.cumsum(plan.blocks.rows(self.ids), out=self.starts[1:])
        self.starts[1:] += self.starts[0]
        self._by_id = np.argsort(self.ids)
        self.table_row = np.full(len(self.ids), -1, dtype=np.int64)
        self.table = np.empty((min(plan.row_table_blocks, len(self.ids)), plan.max_block_rows), dtype=np.int32)
        self.used = 0

    def first_positions(self, blocks: np.ndarray) -> np.ndarray:
        slot = self._by_id[np.searchsorted(self.ids, blocks, sorter=self._by_id)]
        return self.starts[slot]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        slot = np.searchsorted(self.starts, positions, side="right") - 1
        blocks = self.ids[slot]
        offsets = positions - self.starts[slot]
        missing = np.unique(slot[self.table_row[slot] < 0])
        if len(missing):
            if self.used + len(missing) > len(self.table):
                self.table_row[:] = -1
                self.used = 0
                missing = np.unique(slot)
            self._add_row_permutations(missing)
        return blocks, self.table[self.table_row[slot], offsets].astype(np.int64)

    def _add_row_permutations(self, slots: np.ndarray) -> None:
        """Rows of each block in the epoch's order: argsort of hashed (seed, e, b, row), stable."""
        plan = self.plan
        blocks = self.ids[slots]
        counts = plan.blocks.rows(blocks)
        first = np.cumsum(counts) - counts
        owner = np.repeat(blocks, counts)
        row = np.arange(owner.size, dtype=np.int64) - np.repeat(first, counts)
        keys = splitmix64(hash_keys((plan.seed, _TAG_ROWS, self.epoch), owner) ^ row.astype(np.uint64))
        plan.hashed += owner.size
        order = np.lexsort((keys, np.repeat(np.arange(len(slots)), counts)))  # by slot, then key; stable
        table_rows = self.used + np.arange(len(slots), dtype=np.int64)
        self.table[np.repeat(table_rows, counts), row] = row[order]
        self.table_row[slots] = table_rows
        self.used += len(slots)
