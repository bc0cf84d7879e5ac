"""The mixture order (trainer/data/mixture.py): properties over random sources, weights and stages, no I/O."""
import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.data.mixture import Apportionment, Mixture, as_fraction
from trainer.data.plan import Plan, PlanError, divisors

PROPS = settings(max_examples=150, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

weight = st.one_of(st.integers(0, 9), st.sampled_from([0.1, 0.25, 0.3, 0.7, 1.5, 1 / 3]))


def weight_lists(n):
    return st.lists(weight, min_size=n, max_size=n).filter(lambda ws: sum(map(as_fraction, ws)) > 0)


@st.composite
def mixtures(draw, max_sources=4, with_stages=True):
    """Sources (block rows), weights, stages, G and C that give a valid mixture."""
    n = draw(st.integers(1, max_sources))
    g = draw(st.integers(1, 12))
    c = draw(st.sampled_from(divisors(g)))
    k = g // c
    weights = draw(weight_lists(n))
    stages = []
    if with_stages:
        start = 0
        for _ in range(draw(st.integers(0, 2))):
            start += draw(st.integers(1, 6))
            stages.append((start, draw(weight_lists(n))))
    q = Apportionment(weights, c).q
    sources = []
    for i in range(n):
        rows = draw(st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=3), min_size=1, max_size=3))
        need = max(1, math.ceil(q[i])) * k  # one plan step of this source
        have = sum(map(sum, rows))
        if have < need:
            rows.append([need - have])
        sources.append(rows)
    return sources, weights, stages, g, c, draw(st.integers(0, 2**64 - 1))


def build(m):
    sources, weights, stages, g, c, seed = m
    return Mixture(sources, weights, seed=seed, global_batch=g, layout=c, stages=stages)


def pairs(mix, s):
    shard, seq = mix.sequences(s.sources, s.blocks, s.rows)
    return list(zip(s.sources.tolist(), shard.tolist(), seq.tolist()))


@PROPS
@given(mixtures(), st.integers(0, 40))
def test_every_step_holds_floor_or_ceil_of_each_weight(m, step):
    mix = build(m)
    sources, g, c = m[0], m[3], m[4]
    k = g // c
    j = mix._stage_of(step)
    stage = mix.stages[j]
    counts = np.bincount(mix.step_rows(step).sources, minlength=len(sources))
    assert counts.sum() == g
    for i, q in enumerate(stage.q):  # q: slots (of k rows) per step
        assert counts[i] in (math.floor(q) * k, math.ceil(q) * k)


@PROPS
@given(mixtures(with_stages=False), st.integers(1, 300))
def test_realised_share_stays_within_the_tree_depth_of_the_weight(m, steps):
    mix = build(m)
    stage, c = mix.stages[0], m[4]
    depth_bound = Fraction(stage.depth, 2)
    got = mix.slots_before(steps)
    for i, q in enumerate(stage.q):
        assert abs(got[i] - steps * q) <= depth_bound  # slots; the share is then within 1/(steps*C)
    assert sum(got) == steps * c


@PROPS
@given(mixtures(), st.data())
def test_ranks_concatenate_to_the_world_size_one_batch_and_resume_is_exact(m, data):
    mix = build(m)
    c = m[4]
    start = data.draw(st.integers(0, 60))
    fresh = build(m)  # no caches: as a resumed process
    for step in (start, start + 1):
        whole = mix.step_rows(step)
        again = fresh.step_rows(step)
        for a, b in ((whole.sources, again.sources), (whole.blocks, again.blocks), (whole.rows, again.rows)):
            assert np.array_equal(a, b)
        for world in divisors(c):
            parts = [mix.step_rows(step, world, r) for r in range(world)]
            for name in ("sources", "blocks", "rows", "epochs"):
                assert np.array_equal(np.concatenate([getattr(p, name) for p in parts]), getattr(whole, name))


@settings(PROPS, max_examples=60)
@given(mixtures(), st.integers(1, 3))
def test_each_source_walks_its_own_epochs(m, epochs):
    """Per source, its rows in consumption order are its plan's epochs one after another: no sequence
    repeats within an epoch, and every epoch but the declared tail is used."""
    mix = build(m)
    n = len(m[0])
    order = {i: [] for i in range(n)}
    step = 0
    while step < 200 and any(len(order[i]) < epochs * mix.plans[i].steps_per_epoch * mix.plans[i].global_batch
                             for i in range(n) if mix.stages[-1].a[i] > 0):
        s = mix.step_rows(step)
        src, ms = mix.step_slots(step)
        # consumption order inside a source is slot order m, not batch order
        rows = pairs(mix, s)
        k = mix.items_per_slot
        for slot in np.argsort(ms, kind="stable"):
            order[int(src[slot])].extend(rows[slot * k:(slot + 1) * k])
        step += 1
    for i, seen in order.items():
        plan = mix.plans[i]
        per_epoch = plan.steps_per_epoch * plan.global_batch
        every = {(i, a, b) for a, shard in enumerate(m[0][i]) for b in range(sum(shard))}
        for e in range(len(seen) // per_epoch):
            chunk = seen[e * per_epoch:(e + 1) * per_epoch]
            assert len(set(chunk)) == len(chunk) and set(chunk) <= every
            assert len(every - set(chunk)) == plan.dropped_per_epoch


@PROPS
@given(mixtures(with_stages=False), st.integers(1, 30), weight_lists(4), st.data())
def test_a_stage_changes_nothing_before_its_start(m, start, new, data):
    sources, weights, _, g, c, seed = m
    new = new[:len(sources)]
    if sum(map(as_fraction, new)) == 0:
        new = [1] * len(sources)
    before = Mixture(sources, weights, seed=seed, global_batch=g, layout=c)
    after = Mixture(sources, weights, seed=seed, global_batch=g, layout=c, stages=[(start, new)])
    for step in range(start):
        x, y = before.step_rows(step), after.step_rows(step)
        assert np.array_equal(x.sources, y.sources) and np.array_equal(x.blocks, y.blocks)
        assert np.array_equal(x.rows, y.rows)
    counts = np.bincount(after.step_rows(start).sources, minlength=len(sources))
    q = after.stages[1].q
    assert all(counts[i] in (math.floor(q[i]) * (g // c), math.ceil(q[i]) * (g // c)) for i in range(len(sources)))


@PROPS
@given(st.lists(st.lists(st.integers(1, 12), min_size=1, max_size=6), min_size=1, max_size=6), st.data())
def test_one_source_is_exactly_the_plan(rows, data):
    """`data.shards` alone keeps today's order: a one-source mixture is the Plan, step for step."""
    n = sum(map(sum, rows))
    g = data.draw(st.integers(1, n))
    c = data.draw(st.sampled_from(divisors(g)))
    if (n // c) // (g // c) == 0:
        c = g
    seed = data.draw(st.integers(0, 2**64 - 1))
    plan = Plan(rows, seed=seed, global_batch=g, layout=c)
    mix = Mixture([rows], [data.draw(st.sampled_from([1, 0.3, 7]))], seed=seed, global_batch=g, layout=c)
    world = data.draw(st.sampled_from(divisors(c)))
    for step in data.draw(st.lists(st.integers(0, 4 * plan.steps_per_epoch), min_size=1, max_size=3)):
        for r in range(world):
            a, b = plan.step_rows(step, world, r), mix.step_rows(step, world, r)
            assert np.array_equal(a.blocks, b.blocks) and np.array_equal(a.rows, b.rows)
            assert (b.epochs == a.epoch).all() and (b.sources == 0).all()


@PROPS
@given(mixtures(), st.data())
def test_step_of_slot_inverts_the_counts(m, data):
    mix = build(m)
    step = data.draw(st.integers(0, 50))
    before, after = mix.slots_before(step), mix.slots_before(step + 1)
    for i in range(len(before)):
        for slot in range(before[i], after[i]):
            assert mix.step_of_slot(i, slot) == step


def test_block_last_use_covers_every_later_use():
    """A block is never needed after the step block_last_use names (so keeping it until then suffices)."""
    sources = [[[5, 3, 7], [4]], [[2, 2, 2, 2, 2]], [[9]]]
    mix = Mixture(sources, [0.5, 0.3, 0.2], seed=3, global_batch=10, stages=[(40, [0.1, 0, 0.9])])
    last_seen = {}
    for step in range(200):
        s = mix.step_rows(step)
        for i, e, b in zip(s.sources.tolist(), s.epochs.tolist(), s.blocks.tolist()):
            last_seen[(i, e, b)] = step
    for (i, e, b), step in last_seen.items():
        bound = mix.block_last_use(i, e, np.array([b]))[0]
        assert bound >= step


def test_resume_deep_in_training_costs_what_step_zero_costs():
    rows = [[4] * 8] * 4  # 128 sequences per source
    for step in (0, 10**6):
        mix = Mixture([rows, rows, rows], [0.5, 0.25, 0.25], seed=7, global_batch=8,
                      stages=[(10, [1, 1, 2])])
        s = mix.step_rows(step)
        # the work: one block permutation per source used, the rows of each block touched; no replay
        touched = set(zip(s.sources.tolist(), s.epochs.tolist(), s.blocks.tolist()))
        assert sum(p.hashed for p in mix.plans) == 32 * len(set(s.sources.tolist())) + 4 * len(touched)
        assert len(touched) <= 8


def test_mixture_order_is_pinned():
    """A fixed case, pinned: the order must not change with numpy, Python or platform versions."""
    mix = Mixture([[[3, 2], [4]], [[2, 2]]], [0.7, 0.3], seed=42, global_batch=4, stages=[(3, [0, 1])])
    got = [pairs(mix, mix.step_rows(s)) for s in range(5)]
    assert [Counter(src for src, _, _ in step) for step in got] == [
        {0: 3, 1: 1}, {0: 3, 1: 1}, {0: 2, 1: 2}, {1: 4}, {1: 4}]
    assert got == [
        [(0, 1, 2), (0, 1, 3), (0, 0, 1), (1, 0, 3)], [(0, 1, 1), (0, 0, 4), (0, 0, 0), (1, 0, 0)],
        [(0, 1, 0), (0, 0, 3), (1, 0, 2), (1, 0, 1)], [(1, 0, 2), (1, 0, 3), (1, 0, 0), (1, 0, 1)],
        [(1, 0, 0), (1, 0, 1), (1, 0, 2), (1, 0, 3)]]


def test_errors_name_the_problem_and_the_fix():
    rows = [[4, 4]]
    with pytest.raises(PlanError, match=r"stage at step 5: weights \[0\.0, 0\.0\] must be >= 0 with a positive sum"):
        Mixture([rows, rows], [1, 1], seed=0, global_batch=4, stages=[(5, [0, 0])])
    with pytest.raises(PlanError, match=r"stage start steps must increase: 5 after 7"):
        Mixture([rows, rows], [1, 1], seed=0, global_batch=4, stages=[(7, [1, 0]), (5, [0, 1])])
    with pytest.raises(PlanError, match=r"world size 3 does not divide the layout 4"):
        Mixture([rows, rows], [1, 1], seed=0, global_batch=4).check_world_size(3)
    with pytest.raises(PlanError, match=r"source 'small' is too small for its weight: each of its epochs must "
                                        r"fill 4 streams of 1 sequence .* \(small: 2 sequences cannot fill"):
        Mixture([rows, [[2]]], [1, 1], seed=0, global_batch=8, names=["big", "small"])
