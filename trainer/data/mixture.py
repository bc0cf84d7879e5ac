"""The mixture order: which source's sequences fill each step, for which rank. Pure arithmetic, no I/O.

Inputs: per source its block row counts, the weights of each stage (stage 0 starts at step 0; a later
stage replaces the weights from its `start_step` on), the seed, the global batch G and the layout C.

- A step has C slots of k = G // C rows. Slot counts per source are apportioned per stage: source i
  gets n_i(s) = X_i(s+1) - X_i(s) slots at step s, X_i(t) being its cumulative slots after t steps
  of the stage. X is closed-form (no replay) and exact: n_i(s) is floor or ceil of q_i = w_i*C every
  step, the n_i sum to C, and |X_i(t) - t*q_i| <= depth/2 (depth = ceil(log2 sources)), so the
  realised share converges to the weight. It comes from a balanced binary tree over the sources:
  the root gets C slots a step; a node splits its count between its two children with a Bresenham
  rounding of its own count of extra (or missed) slots, which keeps both children at floor/ceil.
- Source i is an ordinary `Plan` with C_i = max(1, ceil(q_i at stage 0)) streams and C_i*k rows a
  step (C_i is fixed by the first stage, so a stage added later changes no earlier step). Its m-th
  slot (m counted from the start of the run) is stream m % C_i of its plan's step m // C_i. Slots are
  consumed in increasing m, so each source walks its own epochs (a small source starts its next,
  reshuffled epoch when it runs out) and never repeats a sequence within an epoch.
- The global batch lists sources in config order, each source's slots by stream (then m): a stream
  keeps about the same place in the batch from step to step, so it stays on one rank. Rank r of R
  (R | C) takes slots [r*C/R, (r+1)*C/R). Every step is located directly: resuming at step 10**6
  costs what step 0 costs, on any world size that divides C.

With one source and weight 1 this is exactly `Plan(rows, seed, G, C)`: C_0 = C and slot m of step s
is stream m - s*C of plan step s. With several, source i's plan is seeded with H(seed, TAG, i).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import numpy as np

from shards.progress import plural
from trainer.data.plan import BlockLayout, Plan, PlanError, _or_list, divisors, hash_keys

_TAG_SOURCE = 0x536F75726365  # "Source": keys each source's plan seed in a mixture
NEVER = 1 << 62  # the step at which a paused source's slot is consumed


def as_fraction(w) -> Fraction:
    """A weight as an exact fraction; floats by their shortest repr, so 0.3 is 3/10."""
    if isinstance(w, float):
        return Fraction(repr(w))
    return Fraction(w)


class Apportionment:
    """One stage: cumulative slots X_i(t) of each source after t steps, exact integers."""

    def __init__(self, weights: Sequence, slots: int):
        ws = [as_fraction(w) for w in weights]
        if any(w < 0 for w in ws) or sum(ws) <= 0:
            raise PlanError(f"weights {list(map(float, ws))} must be >= 0 with a positive sum")
        q = [w * slots / sum(ws) for w in ws]
        self.den = math.lcm(*(x.denominator for x in q))
        self.a = [int(x * self.den) for x in q]  # q_i = a_i / den; sum a_i = slots * den
        self.slots = slots
        self.q = q
        # each leaf's path from the root: (parent a, left-child a, went left)
        self.paths: list[list[tuple[int, int, bool]]] = [[] for _ in ws]
        self._build(0, len(ws), [])
        self.depth = max(len(p) for p in self.paths)

    def _build(self, lo: int, hi: int, path: list) -> None:
        if hi - lo == 1:
            self.paths[lo] = path
            return
        mid = (lo + hi) // 2
        parent, left = sum(self.a[lo:hi]), sum(self.a[lo:mid])
        self._build(lo, mid, path + [(parent, left, True)])
        self._build(mid, hi, path + [(parent, left, False)])

    def cumulative(self, source: int, t: int) -> int:
        """X_source(t): slots of `source` in steps [0, t) of this stage."""
        den, x = self.den, t * self.slots
        for parent, left, went_left in self.paths[source]:
            fl_p, f_p = divmod(parent, den)
            fl_l, f_l = divmod(left, den)
            if f_l + (parent - left) % den == f_p:  # no carry: the parent's extra slots are split
                extra = _round_share(x - t * fl_p, f_l, f_p)
                x_left = t * fl_l + extra
            else:  # a carry: the parent's missed slots (floor steps) are split
                missed = _round_share(t * (fl_p + 1) - x, den - f_l, den - f_p)
                x_left = t * (fl_l + 1) - missed
            x = x_left if went_left else x - x_left
        return x


def _round_share(count: int, num: int, den: int) -> int:
    """round(count * num / den), halves down: a Bresenham line, so it steps by 0 or 1 per unit of count."""
    return 0 if num == 0 else (2 * count * num + den) // (2 * den)


@dataclass(frozen=True)
class MixStep:
    """The rows of one step for one rank, in batch-row order."""
    step: int
    sources: np.ndarray  # int64 [rows]: source index
    blocks: np.ndarray  # int64 [rows]: block id in that source's manifest order
    rows: np.ndarray  # int64 [rows]: row inside the block
    epochs: np.ndarray  # int64 [rows]: the source's epoch the row belongs to


class Mixture:
    """The order of several datasets' sequences for one (seed, weights and stages, G, C)."""

    def __init__(self, sources: "Sequence[Sequence[Sequence[int]] | BlockLayout]", weights: Sequence, *, seed: int,
                 global_batch: int, layout: int | None = None, stages: Sequence[tuple[int, Sequence]] = (),
                 names: Sequence[str] | None = None):
        n = len(sources)
        if n < 1:
            raise PlanError("a mixture needs at least one source")
        self.names = list(names) if names is not None else [f"source{i}" for i in range(n)]
        self.global_batch = int(global_batch)
        if self.global_batch < 1:
            raise PlanError(f"global batch {global_batch} must be a positive number of sequences")
        self.layout = self.global_batch if layout is None else int(layout)
        if self.layout < 1 or self.global_batch % self.layout:
            raise PlanError(f"layout {self.layout} must divide the global batch {self.global_batch} "
                            f"(choose one of {_or_list(divisors(self.global_batch))}; default = global batch)")
        self.seed = int(seed)
        self.items_per_slot = self.global_batch // self.layout  # k
        self.stage_starts: list[int] = [0]
        self.stages: list[Apportionment] = []
        for start, ws in [(0, weights)] + [(int(a), w) for a, w in stages]:
            if len(ws) != n:
                raise PlanError(f"stage at step {start} has {plural(len(ws), 'weight')} for {plural(n, 'source')}")
            if self.stages and start <= self.stage_starts[-1]:
                raise PlanError(f"stage start steps must increase: {start} after {self.stage_starts[-1]}")
            try:
                self.stages.append(Apportionment(ws, self.layout))
            except PlanError as e:
                raise PlanError(f"stage at step {start}: {e}") from None
            if self.stages[1:]:
                self.stage_starts.append(start)
        # cumulative slots of each source at each stage's start
        self.stage_base = [[0] * n]
        for j in range(1, len(self.stages)):
            length = self.stage_starts[j] - self.stage_starts[j - 1]
            self.stage_base.append([b + self.stages[j - 1].cumulative(i, length)
                                    for i, b in enumerate(self.stage_base[-1])])
        k = self.items_per_slot
        self.source_streams = [max(1, math.ceil(q)) for q in self.stages[0].q]  # C_i
        self.plans = []
        for i, (rows, c) in enumerate(zip(sources, self.source_streams)):
            try:
                self.plans.append(Plan(rows, seed=self.seed if n == 1 else self.source_seed(i), global_batch=c * k,
                                       layout=c, name=self.names[i]))
            except PlanError as e:
                if n == 1 or "cannot fill" not in str(e):
                    raise
                raise PlanError(f"source {self.names[i]!r} is too small for its weight: each of its epochs must "
                                f"fill {plural(c, 'stream')} of {plural(k, 'sequence')} (ceil of its share of the "
                                f"{plural(self.layout, 'slot')} a step); give it more data or less weight "
                                f"({e})") from None

    def source_seed(self, i: int) -> int:
        return int(hash_keys((self.seed, _TAG_SOURCE), np.array([i], dtype=np.uint64))[0])

    @property
    def num_sources(self) -> int:
        return len(self.plans)

    # --- ranks
    def check_world_size(self, world_size: int) -> None:
        if world_size < 1 or self.layout % world_size:
            raise PlanError(f"world size {world_size} does not divide the layout {self.layout}; "
                            f"use {_or_list(divisors(self.layout))} {'rank' if self.layout == 1 else 'ranks'} "
                            f"(the layout is fixed at the first launch of a run)")

    def rank_slots(self, world_size: int, rank: int) -> range:
        self.check_world_size(world_size)
        if not 0 <= rank < world_size:
            raise PlanError(f"rank {rank} is not in [0, {world_size})")
        per = self.layout // world_size
        return range(rank * per, (rank + 1) * per)

    # --- counts
    def _stage_of(self, step: int) -> int:
        return bisect.bisect_right(self.stage_starts, step) - 1

    def slots_before(self, step: int) -> list[int]:
        """Cumulative slots of each source in steps [0, step)."""
        if step < 0:
            raise PlanError(f"step {step} is negative")
        j = self._stage_of(step)
        t = step - self.stage_starts[j]
        return [b + self.stages[j].cumulative(i, t) for i, b in enumerate(self.stage_base[j])]

    def slot_counts(self, step: int) -> list[int]:
        """Slots of each source at `step` (rows: times items_per_slot)."""
        return [b - a for a, b in zip(self.slots_before(step), self.slots_before(step + 1))]

    def step_of_slot(self, source: int, m: int) -> int:
        """The step at which `source`'s m-th slot is consumed (NEVER if its weight stays 0)."""
        j = len(self.stages) - 1
        while j > 0 and self.stage_base[j][source] > m:
            j -= 1
        base, stage, start = self.stage_base[j][source], self.stages[j], self.stage_starts[j]
        if stage.a[source] == 0:
            return NEVER
        # smallest t with X(t) > m - base; X(t) is within depth/2 of t*q, so start near that
        target = m - base
        hi = max(1, int((target + stage.depth + 1) / stage.q[source]) + 1)
        while stage.cumulative(source, hi) <= target:
            hi *= 2
        lo = 0
        while lo < hi:
            mid = (lo + hi) // 2
            if stage.cumulative(source, mid) > target:
                hi = mid
            else:
                lo = mid + 1
        return start + lo - 1

    # --- steps
    def step_slots(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, m) of the step's C slots in batch order: sources in config order, each source's
        slots by stream, then by m."""
        before, after = self.slots_before(step), self.slots_before(step + 1)
        src, ms = [], []
        for i, (a, b) in enumerate(zip(before, after)):
            m = np.arange(a, b, dtype=np.int64)
            m = m[np.lexsort((m, m % self.source_streams[i]))]
            src.append(np.full(len(m), i, dtype=np.int64))
            ms.append(m)
        return np.concatenate(src), np.concatenate(ms)

    def step_rows(self, step: int, world_size: int = 1, rank: int = 0) -> MixStep:
        slots = self.rank_slots(world_size, rank)
        src, ms = self.step_slots(int(step))
        src, ms = src[slots.start:slots.stop], ms[slots.start:slots.stop]
        k = self.items_per_slot
        n = len(src) * k
        sources, blocks, rows, epochs = (np.empty(n, dtype=np.int64) for _ in range(4))
        sources[:] = np.repeat(src, k)
        # One source: slot j is stream j, so a rank's streams are contiguous and its plan needs only
        # the window of the epoch order that holds them (O(shards) start-up); several: the whole epoch.
        span = self.plans[0].rank_span(world_size, rank) if self.num_sources == 1 else None
        for lo, hi in _runs(src):  # sources come in config order: one run each
            i = int(src[lo])
            plan, c = self.plans[i], self.source_streams[i]
            t, stream = np.divmod(ms[lo:hi], c)
            epoch, tt = np.divmod(t, plan.steps_per_epoch)
            pos = ((stream * plan.stream_length + tt * k)[:, None] + np.arange(k)[None, :]).ravel()
            out = slice(lo * k, hi * k)
            if epoch[0] == epoch[-1] and (epoch == epoch[0]).all():  # the usual case: one epoch
                blocks[out], rows[out] = plan.locate(int(epoch[0]), pos, span)
                epochs[out] = epoch[0]
                continue
            epoch = np.repeat(epoch, k)
            for e in np.unique(epoch).tolist():
                here = np.flatnonzero(epoch == e) + lo * k
                blocks[here], rows[here] = plan.locate(e, pos[epoch == e], span)
                epochs[here] = e
        return MixStep(step=int(step), sources=sources, blocks=blocks, rows=rows, epochs=epochs)

    def block_last_use(self, source: int, epoch: int, blocks: np.ndarray) -> np.ndarray:
        """For blocks of `source` in its `epoch`, a step by which every row of theirs has been consumed
        (by any rank): the step of the last slot of the plan step that last uses them. A reader that
        keeps a block until then fetches it once per epoch, however rarely its source is drawn."""
        plan, c = self.plans[source], self.source_streams[source]
        last = plan.block_last_use(epoch, blocks)
        out = np.empty(len(last), dtype=np.int64)
        memo: dict[int, int] = {}
        for j, t in enumerate(last.tolist()):
            if t not in memo:
                memo[t] = self.step_of_slot(source, t * c + c - 1)
            out[j] = memo[t]
        return out

    def sequences(self, sources: np.ndarray, blocks: np.ndarray, rows: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
        """(shard index in its source's manifest, sequence index inside the shard) of rows."""
        shard, seq = np.empty_like(blocks), np.empty_like(blocks)
        for lo, hi in _runs(sources):  # a step's rows come source by source
            shard[lo:hi], seq[lo:hi] = self.plans[int(sources[lo])].sequences(blocks[lo:hi], rows[lo:hi])
        return shard, seq


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) of each run of equal values."""
    cuts = (np.flatnonzero(np.diff(values)) + 1).tolist()
    return list(zip([0, *cuts], [*cuts, len(values)])) if len(values) else []
