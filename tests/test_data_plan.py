"""The data plan (trainer/data/plan.py): properties over random manifests, no I/O.

Manifests are only per-block row counts here (uneven shards and blocks), built in memory.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.data_support import plans, seeds
from trainer.data.plan import Plan, PlanError, divisors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROPS = settings(max_examples=200, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])




def pairs(step_rows, plan):
    shard, seq = plan.sequences(step_rows.blocks, step_rows.rows)
    return list(zip(shard.tolist(), seq.tolist()))


@PROPS
@given(plans(), st.data())
def test_ranks_concatenate_to_the_world_size_one_batch(p, data):
    rows, seed, g, c = p
    plan = Plan(rows, seed=seed, global_batch=g, layout=c)
    for step in data.draw(st.lists(st.integers(0, 3 * plan.steps_per_epoch), min_size=1, max_size=3)):
        whole = plan.step_rows(step)
        assert len(whole.blocks) == g
        for world in divisors(c):
            parts = [plan.step_rows(step, world, r) for r in range(world)]
            assert all(len(x.blocks) == g // world for x in parts)
            assert np.array_equal(np.concatenate([x.blocks for x in parts]), whole.blocks)
            assert np.array_equal(np.concatenate([x.rows for x in parts]), whole.rows)


@PROPS
@given(plans(), st.data())
def test_plan_from_a_start_step_equals_the_continuous_plan(p, data):
    rows, seed, g, c = p
    continuous = Plan(rows, seed=seed, global_batch=g, layout=c)
    world = data.draw(st.sampled_from(divisors(c)))
    rank = data.draw(st.integers(0, world - 1))
    start = data.draw(st.integers(0, 4 * continuous.steps_per_epoch))
    steps = range(start + 3)
    expect = [continuous.step_rows(s, world, rank) for s in steps]
    resumed = Plan(rows, seed=seed, global_batch=g, layout=c)  # fresh: no caches from earlier steps
    for s in range(start, start + 3):
        got = resumed.step_rows(s, world, rank)
        assert got.epoch == expect[s].epoch == s // continuous.steps_per_epoch
        assert np.array_equal(got.blocks, expect[s].blocks) and np.array_equal(got.rows, expect[s].rows)


@PROPS
@given(plans(), st.integers(0, 5))
def test_an_epoch_sees_every_sequence_once_except_the_declared_tail(p, epoch):
    rows, seed, g, c = p
    plan = Plan(rows, seed=seed, global_batch=g, layout=c)
    n = sum(map(sum, rows))
    S = plan.steps_per_epoch
    seen = [pair for s in range(epoch * S, (epoch + 1) * S) for pair in pairs(plan.step_rows(s), plan)]
    assert len(seen) == len(set(seen)) == S * g
    every = {(i, j) for i, shard in enumerate(rows) for j in range(sum(shard))}
    assert set(seen) <= every
    assert len(every - set(seen)) == plan.dropped_per_epoch == n - S * g
    assert plan.dropped_per_epoch < g + c
    # the epoch order is a permutation of all sequences, and steps are slices of it
    order = list(zip(*(a.tolist() for a in plan.sequences(*plan.epoch_order(epoch)))))
    assert sorted(order) == sorted(every)


@PROPS
@given(plans(min_sequences=24), seeds)
def test_different_seeds_and_epochs_give_different_orders(p, other_seed):
    rows, seed, g, c = p
    if other_seed == seed:
        other_seed = seed ^ 1
    a = Plan(rows, seed=seed, global_batch=g, layout=c)
    b = Plan(rows, seed=other_seed, global_batch=g, layout=c)

    def order(plan, e):
        blocks, r = plan.epoch_order(e)
        return list(zip(blocks.tolist(), r.tolist()))
    # 24+ sequences: equal orders by chance have probability below 1/24!, never in practice
    assert order(a, 0) != order(b, 0)
    assert order(a, 0) != order(a, 1)
    assert order(a, 0) == order(Plan(rows, seed=seed, global_batch=g, layout=c), 0)


def test_order_is_pinned():
    """A fixed case, pinned: the order must not change with numpy, Python or platform versions."""
    plan = Plan([[3, 2], [4], [1, 2]], seed=42, global_batch=4, layout=2)
    assert (plan.num_sequences, plan.steps_per_epoch, plan.dropped_per_epoch) == (12, 3, 0)
    assert [pairs(plan.step_rows(s), plan) for s in range(4)] == [
        [(0, 2), (0, 0), (1, 3), (0, 3)],
        [(0, 1), (1, 1), (0, 4), (2, 0)],
        [(1, 2), (1, 0), (2, 2), (2, 1)],
        [(1, 0), (1, 3), (2, 0), (0, 1)],
    ]


@pytest.mark.slow
def test_same_inputs_give_the_same_order_in_a_fresh_process():
    rows = [[5, 3, 7], [2], [6, 6, 1], [4, 4]]
    code = ("import json, sys; from trainer.data.plan import Plan; "
            "p = Plan(json.loads(sys.argv[1]), seed=2**63 + 5, global_batch=6, layout=3); "
            "print(json.dumps([[p.step_rows(s, 3, r).blocks.tolist() + p.step_rows(s, 3, r).rows.tolist() "
            "for r in range(3)] for s in (0, 4, 17, 10**6)]))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(rows)], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    p = Plan(rows, seed=2**63 + 5, global_batch=6, layout=3)
    here = [[p.step_rows(s, 3, r).blocks.tolist() + p.step_rows(s, 3, r).rows.tolist() for r in range(3)]
            for s in (0, 4, 17, 10**6)]
    assert json.loads(out) == here


def test_resume_deep_in_training_costs_what_step_zero_costs():
    # Uniform blocks and stream length a multiple of the block rows: step 0 and step 10**6 (epoch
    # 62500, t = 0) touch the same number of blocks, so the work must match exactly.
    rows = [[4] * 8] * 4  # N = 128, G = C = 8: L = S = 16 and 10**6 % 16 == 0
    costs = []
    for step in (0, 10**6):
        plan = Plan(rows, seed=7, global_batch=8)
        assert plan.steps_per_epoch == 16
        sr = plan.step_rows(step)
        costs.append((plan.hashed, len(set(sr.blocks.tolist()))))
    assert costs[0] == costs[1] == (32 + 8 * 4, 8)


def test_errors_name_the_problem_and_the_fix():
    rows = [[4, 4], [3]]
    with pytest.raises(PlanError, match=r"world size 3 does not divide the layout 8; use 1, 2, 4 or 8 ranks"):
        Plan(rows, seed=0, global_batch=8).check_world_size(3)
    with pytest.raises(PlanError, match=r"ds: 11 sequences cannot fill one global batch of 12"):
        Plan(rows, seed=0, global_batch=12, name="ds")
    with pytest.raises(PlanError, match=r"layout 3 must divide the global batch 10 \(choose one of 1, 2, 5 or 10"):
        Plan(rows, seed=0, global_batch=10, layout=3)
    with pytest.raises(PlanError, match=r"seed -1 is out of range"):
        Plan(rows, seed=-1, global_batch=2)
    # a count of one takes the singular ("1 sequences", "use 1 ranks" before)
    with pytest.raises(PlanError, match=r"ds: 1 sequence cannot fill one global batch of 2"):
        Plan([[1]], seed=0, global_batch=2, name="ds")
    with pytest.raises(PlanError, match=r"world size 2 does not divide the layout 1; use 1 rank \(the layout"):
        Plan(rows, seed=0, global_batch=4, layout=1).check_world_size(2)
    # 11 sequences, G = 8, C = 2: streams of L = 5, k = 4 per step: one step, 3 dropped
    p = Plan(rows, seed=0, global_batch=8, layout=2)
    assert (p.steps_per_epoch, p.dropped_per_epoch) == (1, 3)
    with pytest.raises(PlanError, match=r"rank 2 is not in \[0, 2\)"):
        p.rank_streams(2, 2)


@PROPS
@given(plans(), st.integers(1, 40))
def test_a_tiny_row_table_changes_nothing(p, entries):
    """The row-permutation table is only a cache: cleared often and filled in chunks, same order."""
    rows, seed, g, c = p
    big = Plan(rows, seed=seed, global_batch=g, layout=c)
    small = Plan(rows, seed=seed, global_batch=g, layout=c, row_table_entries=entries)
    for e in (0, 1):
        assert all(np.array_equal(x, y) for x, y in zip(big.epoch_order(e), small.epoch_order(e)))
    for s in range(0, 3 * big.steps_per_epoch, max(1, big.steps_per_epoch // 3)):
        x, y = big.step_rows(s), small.step_rows(s)
        assert np.array_equal(x.blocks, y.blocks) and np.array_equal(x.rows, y.rows)


def reference_epoch_order(rows, seed, epoch):
    """Format 1's plan, written plainly: argsort of every block's key, then each block's rows by theirs."""
    from trainer.data.plan import _TAG_BLOCKS, _TAG_ROWS, hash_keys, splitmix64
    counts = [n for shard in rows for n in shard]
    perm = np.argsort(hash_keys((seed, _TAG_BLOCKS, epoch), np.arange(len(counts), dtype=np.uint64)), kind="stable")
    out = []
    for b in perm.tolist():
        keys = splitmix64(hash_keys((seed, _TAG_ROWS, epoch), np.full(counts[b], b, dtype=np.uint64))
                          ^ np.arange(counts[b], dtype=np.uint64))
        out += [(b, r) for r in np.argsort(keys, kind="stable").tolist()]
    return out


shardgen_like = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=8)


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(shardgen_like, seeds, st.sampled_from([1, 2, 64]), st.sampled_from([0.0, 0.5, 4.0]), st.data())
def test_windows_of_the_order_equal_the_whole_sorted_order(shards, seed, per_bucket, margin, data):
    """The histogram + windows give format 1's order exactly, however many buckets and whatever the first
    guess (margin 0 forces the second pass), for every rank; from summaries as from row lists."""
    from trainer.data import plan as P
    rows = [[r] * (n - 1) + [last] for n, r, last in shards]
    layout = P.BlockLayout.from_shards([n for n, _, _ in shards], [r for _, r, _ in shards], [x for _, _, x in shards])
    n = sum(map(sum, rows))
    g = data.draw(st.integers(1, n))
    c = data.draw(st.sampled_from(divisors(g)))
    c = g if (n // c) // (g // c) == 0 else c
    old = (P._EpochOrder.blocks_per_bucket, P._EpochOrder.guess_margin)
    P._EpochOrder.blocks_per_bucket, P._EpochOrder.guess_margin = per_bucket, margin
    try:
        for plan in (Plan(layout, seed=seed, global_batch=g, layout=c), Plan(rows, seed=seed, global_batch=g, layout=c)):
            epoch = data.draw(st.integers(0, 3))
            ref = reference_epoch_order(rows, seed, epoch)
            world = data.draw(st.sampled_from(divisors(c)))
            rank = data.draw(st.integers(0, world - 1))
            S = plan.steps_per_epoch
            step = epoch * S + data.draw(st.integers(0, S - 1))
            got = plan.step_rows(step, world, rank)
            want = [ref[p] for p in plan.positions(step, world, rank)[1].tolist()]
            assert list(zip(got.blocks.tolist(), got.rows.tolist())) == want
            assert list(zip(*(a.tolist() for a in plan.epoch_order(epoch)))) == ref
    finally:
        P._EpochOrder.blocks_per_bucket, P._EpochOrder.guess_margin = old
