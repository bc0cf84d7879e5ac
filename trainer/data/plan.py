"""The data plan: which sequences, in what order, for which rank. Pure arithmetic, no I/O.

Inputs are only the per-block row counts of the manifest (shard by shard), the seed, the global
batch G (sequences per optimizer step) and the layout C (number of streams, fixed at the first
launch, C | G). Notation as in DESIGN.md:

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


class Plan:
    """The order of a dataset's sequences for one (seed, global batch, layout)."""

    def __init__(self, block_rows: Sequence[Sequence[int]], *, seed: int, global_batch: int,
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
        rows, shard_of, first_seq = [], [], []
        for i, shard in enumerate(block_rows):
            start = 0
            for n in shard:
                if int(n) < 1:
                    raise PlanError(f"{name}: shard {i} has a block with {n} rows; blocks hold at least one")
                rows.append(int(n))
                shard_of.append(i)
                first_seq.append(start)
                start += int(n)
        self.block_rows = np.asarray(rows, dtype=np.int64)
        self.block_shard = np.asarray(shard_of, dtype=np.int64)
        self.block_first_sequence = np.asarray(first_seq, dtype=np.int64)
        self.num_blocks = len(rows)
        self.num_sequences = int(self.block_rows.sum()) if rows else 0
        self.items_per_stream = self.global_batch // self.layout  # k
        self.stream_length = self.num_sequences // self.layout  # L
        self.steps_per_epoch = self.stream_length // self.items_per_stream  # S
        if self.num_sequences < self.global_batch or self.steps_per_epoch == 0:
            raise PlanError(f"{name}: {self.num_sequences} sequences cannot fill one global batch of "
                            f"{self.global_batch} with layout {self.layout}: use a smaller global batch "
                            f"or more data")
        self.dropped_per_epoch = self.num_sequences - self.steps_per_epoch * self.global_batch
        self.max_block_rows = int(self.block_rows.max())
        # Row permutations are cached per epoch in a table of this many blocks (4 MiB of int32).
        self.row_table_blocks = max(1, row_table_entries // self.max_block_rows)
        self._epochs: OrderedDict[int, _EpochOrder] = OrderedDict()
        self.hashed = 0  # keys hashed so far: a count of the work done, for the O(1)-resume tests

    # --- ranks
    def check_world_size(self, world_size: int) -> None:
        if world_size < 1 or self.layout % world_size:
            raise PlanError(f"world size {world_size} does not divide the layout {self.layout}; "
                            f"use {_or_list(divisors(self.layout))} ranks (the layout is fixed at the "
                            f"first launch of a run)")

    def rank_streams(self, world_size: int, rank: int) -> range:
        self.check_world_size(world_size)
        if not 0 <= rank < world_size:
            raise PlanError(f"rank {rank} is not in [0, {world_size})")
        per = self.layout // world_size
        return range(rank * per, (rank + 1) * per)

    # --- the epoch order
    def epoch(self, epoch: int) -> "_EpochOrder":
        """The epoch's block order (O(B) once, then cached with the next epoch's)."""
        got = self._epochs.get(epoch)
        if got is None:
            got = self._epochs[epoch] = _EpochOrder(self, epoch)
            while len(self._epochs) > 2:  # the current epoch and the next (prefetch crosses over)
                self._epochs.popitem(last=False)
        else:
            self._epochs.move_to_end(epoch)
        return got

    def locate(self, epoch: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Epoch positions -> (global block id, row inside that block)."""
        order = self.epoch(epoch)
        blocks, rows = [], []
        for lo in range(0, max(1, len(positions)), self.row_table_blocks):  # chunks fit the table
            b, r = order.locate(positions[lo:lo + self.row_table_blocks])
            blocks.append(b)
            rows.append(r)
        return np.concatenate(blocks), np.concatenate(rows)

    def block_last_use(self, epoch: int, blocks: np.ndarray, world_size: int = 1, rank: int = 0) -> np.ndarray:
        """For each block (of `epoch`, used by this rank), the last step of the epoch at which this rank
        needs one of its rows. A block cut by a stream boundary serves the end of one stream and the
        start of the next: its last use is near the epoch's end, so a reader that keeps it until then
        fetches every block once per epoch (property 9) at the cost of one block per stream boundary."""
        order = self.epoch(epoch)
        streams = self.rank_streams(world_size, rank)
        L, k, S = self.stream_length, self.items_per_stream, self.steps_per_epoch
        blocks = np.asarray(blocks, dtype=np.int64)
        first = order.starts[order.inverse[blocks]]
        lo = np.maximum(first, streams.start * L)
        hi = np.minimum(first + self.block_rows[blocks] - 1, streams.stop * L - 1)
        t = (hi - (hi // L) * L) // k  # the step of the block's last row in the last stream it reaches
        t = np.where(lo // L < hi // L, np.maximum(t, (L - 1) // k), t)  # earlier streams: used to their end
        return epoch * S + np.minimum(t, S - 1)

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """All N sequences of an epoch in order, as (block, row). O(N): for tests and tools."""
        return self.locate(epoch, np.arange(self.num_sequences, dtype=np.int64))

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
        blocks, rows = self.locate(epoch, pos)
        return StepRows(step=int(step), epoch=epoch, blocks=blocks, rows=rows)

    def sequences(self, blocks: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, sequence index inside the shard) of block rows."""
        return self.block_shard[blocks], self.block_first_sequence[blocks] + rows


class _EpochOrder:
    """One epoch: the block permutation, each permuted block's first position, and a table of the
    row permutations computed so far (block -> table row), so a step is located without a Python
    loop over its rows or blocks. The table is cleared when full: it only saves recomputation."""

    def __init__(self, plan: Plan, epoch: int):
        self.plan, self.epoch = plan, epoch
        keys = hash_keys((plan.seed, _TAG_BLOCKS, epoch), np.arange(plan.num_blocks, dtype=np.uint64))
        plan.hashed += plan.num_blocks
        self.perm = np.argsort(keys, kind="stable")
        self.starts = np.zeros(plan.num_blocks + 1, dtype=np.int64)
        np.cumsum(plan.block_rows[self.perm], out=self.starts[1:])
        self.table_row = np.full(plan.num_blocks, -1, dtype=np.int64)
        self.table = np.empty((plan.row_table_blocks, plan.max_block_rows), dtype=np.int32)
        self.used = 0
        self._inverse: np.ndarray | None = None

    @property
    def inverse(self) -> np.ndarray:
        """Slot of each block in this epoch's permutation (O(B) once, only if asked for)."""
        if self._inverse is None:
            self._inverse = np.empty_like(self.perm)
            self._inverse[self.perm] = np.arange(len(self.perm))
        return self._inverse

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        slot = np.searchsorted(self.starts, positions, side="right") - 1
        blocks = self.perm[slot]
        offsets = positions - self.starts[slot]
        missing = np.unique(blocks[self.table_row[blocks] < 0])
        if len(missing):
            if self.used + len(missing) > len(self.table):
                self.table_row[:] = -1
                self.used = 0
                missing = np.unique(blocks)
            self._add_row_permutations(missing)
        return blocks, self.table[self.table_row[blocks], offsets].astype(np.int64)

    def _add_row_permutations(self, blocks: np.ndarray) -> None:
        """Rows of each block in the epoch's order: argsort of hashed (seed, e, b, row), stable."""
        plan = self.plan
        counts = plan.block_rows[blocks]
        first = np.cumsum(counts) - counts
        owner = np.repeat(blocks, counts)
        row = np.arange(owner.size, dtype=np.int64) - np.repeat(first, counts)
        keys = splitmix64(hash_keys((plan.seed, _TAG_ROWS, self.epoch), owner) ^ row.astype(np.uint64))
        plan.hashed += owner.size
        order = np.lexsort((keys, owner))  # by block (ascending, as `blocks`), then key; stable
        table_rows = self.used + np.arange(len(blocks), dtype=np.int64)
        self.table[np.repeat(table_rows, counts), row] = row[order]
        self.table_row[blocks] = table_rows
        self.used += len(blocks)
