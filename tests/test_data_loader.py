"""TokenLoader end to end: shards written with the format's ShardWriter, read back through Storage."""
import json
import os
import subprocess
import sys
import threading
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shards.format import FormatError, Manifest, read_blocks, read_manifest
from shards.storage import LocalStorage, StorageError
from tests.data_support import BOS, EOS, CountingStorage, plans, take, write_dataset
from trainer.data import DataStateError, PlanError, TokenLoader, cu_seqlens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


BLOCKS = [[5, 5, 3], [4, 4, 4, 2], [7], [6, 6]]  # 46 sequences, uneven shards and blocks


@pytest.fixture
def dataset(tmp_path):
    root = str(tmp_path / "ds")
    return root, write_dataset(root, BLOCKS)


def test_batches_hold_the_tokens_the_plan_names(dataset):
    root, rows_of = dataset
    with TokenLoader(root, seed=3, global_batch=8, layout=4, world_size=2, rank=1) as ld:
        assert (ld.layout, ld.local_batch, ld.steps_per_epoch) == (4, 4, 46 // 4 // 2)
        batches = take(ld, 0, 2 * ld.steps_per_epoch + 1)  # crosses two epoch boundaries
        assert not [t for t in threading.enumerate() if t.name.startswith(("block-fetch", "batch-assemble"))]
    for s, b in enumerate(batches):
        assert (b.step, b.epoch) == (s, s // ld.steps_per_epoch)
        assert b.input_ids.dtype == torch.int64 and b.input_ids.shape == (4, 16) and b.cu_seqlens is None
        expect = np.stack([rows_of[seq] for seq in b.sequences]).astype(np.int64)
        assert np.array_equal(b.input_ids.numpy(), expect)
        plan = ld.plan.step_rows(s, 2, 1)
        assert b.sequences == list(zip(*(a.tolist() for a in ld.plan.sequences(plan.blocks, plan.rows))))


@pytest.mark.parametrize("start", [0, 5, 123])
def test_ranks_together_give_the_single_rank_batch_and_resume_is_exact(dataset, start):
    root, _ = dataset
    with TokenLoader(root, seed=9, global_batch=8, prefetch_steps=2) as one:
        whole = take(one, 0, start + 4)[start:]
        state = one.state_dict(start)
    for world in (2, 4, 8):  # elastic: any world size that divides the layout (8)
        parts = []
        for rank in range(world):
            with TokenLoader(root, seed=9, global_batch=8, layout=state["layout"], world_size=world,
                             rank=rank, prefetch_steps=1) as ld:
                parts.append(take(ld, ld.check_state(state), 4))
        for i, b in enumerate(whole):
            assert all(p[i].step == b.step for p in parts)
            assert torch.equal(torch.cat([p[i].input_ids for p in parts]), b.input_ids)
            assert sum((p[i].sequences for p in parts), []) == b.sequences


@pytest.mark.slow
def test_cli_plan_prints_the_loader_order(dataset):
    root, _ = dataset
    out = subprocess.run([sys.executable, "-m", "trainer.data", "plan", "--shards", root, "--seed", "9",
                          "--global-batch", "8", "--layout", "4", "--world-size", "2", "--rank", "1",
                          "--start-step", "3", "--steps", "4"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = [json.loads(x) for x in out.splitlines()]
    with TokenLoader(root, seed=9, global_batch=8, layout=4, world_size=2, rank=1) as ld:
        batches = take(ld, 3, 4)
    assert [x["step"] for x in lines] == [3, 4, 5, 6] and {x["rank"] for x in lines} == {1}
    assert [x["epoch"] for x in lines] == [b.epoch for b in batches]
    assert [[tuple(p) for p in x["sequences"]] for x in lines] == [b.sequences for b in batches]


@pytest.mark.slow
def test_cli_output_into_a_closed_pipe_is_not_an_error(dataset):
    # `python -m trainer.data plan ... | head`: the pipe closes early; a pipe closed before the command starts makes
    # its first write fail every time. No traceback, not even Python's at-exit flush of stdout.
    root, _ = dataset
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, "-m", "trainer.data", "plan", "--shards", root, "--seed", "0",
                            "--global-batch", "8", "--steps", "50"], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert r.returncode == 0 and "BrokenPipe" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr


@pytest.mark.slow
def test_cli_rejects_bad_arguments_clearly(dataset):
    root, _ = dataset

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "trainer.data", *args], cwd=ROOT, capture_output=True,
                              text=True)
    r = cli("plan", "--shards", root, "--seed", "0", "--global-batch", "8", "--world-size", "3")
    assert r.returncode == 2 and "world size 3 does not divide the layout 8; use 1, 2, 4 or 8 ranks" in r.stderr
    r = cli("plan", "--shards", root, "--seed", "0", "--global-batch", "0")
    assert r.returncode == 2 and "argument --global-batch: 0 is not a positive integer" in r.stderr
    r = cli("stats", "--shards", root + "-missing", "--global-batch", "8")
    assert r.returncode == 2 and "manifest.json not found" in r.stderr
    r = cli("stats", "--shards", "s3://", "--global-batch", "8")  # settings of the storage, not a traceback
    assert r.returncode == 2 and r.stderr.startswith("error: 's3://' is not an s3://bucket/prefix URL"), r.stderr
    r = cli("stats", "--shards", root, "--global-batch", "8", "--prefetch-steps", "2")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout.splitlines()[-1])
    assert (st["steps_per_epoch"], st["dropped_per_epoch"]) == (5, 6)
    assert st["compressed_bytes_per_step_per_rank"] > 0 and st["peak_live_blocks"] <= 13


def block_ids(root):
    """(shard name, byte offset) of each block -> its id in the plan (blocks numbered in manifest order)."""
    ref = read_manifest(LocalStorage(root))
    return {(s.name, b.offset): n for n, (s, b) in
            enumerate((s, b) for s in ref.shards for b in read_blocks(LocalStorage(root), s))}


def test_each_rank_reads_only_blocks_holding_its_rows(dataset):
    root, _ = dataset
    block_of = block_ids(root)
    for rank in range(2):
        st = CountingStorage(root)
        with TokenLoader(st, seed=4, global_batch=8, layout=4, world_size=2, rank=rank, prefetch_steps=2) as ld:
            take(ld, 0, 3)

            def blocks_of(steps):
                return set().union(*(ld.plan.step_rows(s, 2, rank).blocks.tolist() for s in steps))
            taken, window = blocks_of(range(3)), blocks_of(range(3 + 2))  # + the 2 prefetched steps
        read = [block_of[r] for r in st.reads]
        # every block of the steps taken was read; prefetches still queued at close may be cancelled
        assert taken <= set(read) <= window
        # A block is read again only when two of the rank's streams share it (a stream boundary
        # falls inside it) and their uses are further apart than the prefetch window: at most
        # once per stream per epoch, the price of memory bounded by the window.
        assert len(read) - len(set(read)) <= len(ld.plan.rank_streams(2, rank))


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_an_epoch_reads_each_block_once_apart_from_stream_boundaries(dataset, prefetch):
    # Property 9: over one epoch, every block is fetched once, also a block cut by a stream boundary
    # (it serves two streams at steps far apart). prefetch 0 once re-read every shared block at every
    # step: the blocks were freed before the next step claimed them.
    root, _ = dataset
    st = CountingStorage(root)
    with TokenLoader(st, seed=3, global_batch=8, layout=4, prefetch_steps=prefetch) as ld:
        S = ld.steps_per_epoch
        it = ld.iter_batches(0)
        for _ in range(S):
            next(it)
        epoch0 = set().union(*(ld.plan.step_rows(s).blocks.tolist() for s in range(S)))
        nxt = set().union(*(ld.plan.step_rows(S + s).blocks.tolist() for s in range(prefetch + 1)))
    # each of epoch 0's blocks once (blocks cut by a stream boundary are kept until their last use),
    # plus the blocks of the next epoch's first steps that the window planned ahead. Counted per block, not by
    # position: next() queues step S's fills before it waits for step S-1's, so a fetch thread may read a block
    # again for epoch 1 before another thread's last read for epoch 0 (the check by position failed ~1 run in 30)
    assert len(epoch0) <= len(st.reads) <= len(epoch0) + len(nxt)
    block_of = block_ids(root)
    counts = Counter(block_of[r] for r in st.reads)
    assert epoch0 <= set(counts), "every block of epoch 0 read"
    for block, n in counts.items():
        assert n <= (block in epoch0) + (block in nxt), f"block {block} read {n} times"


def test_the_dropped_tail_is_logged_where_it_is(dataset, caplog):
    # N = 46, C = 4 streams of L = 11, k = 2 per step: S = 5 steps use 10 of each stream, and 46 - 44
    # sequences come after the last stream; the log once said "the last 6 sequences"
    root, _ = dataset
    with caplog.at_level("INFO", logger="trainer.data"):
        TokenLoader(root, seed=0, global_batch=8, layout=4).close()
    assert ("5 steps per epoch; 6 sequences of each epoch's order are dropped (2 after the last stream, "
            "1 at the end of each of the 4 streams)") in caplog.text


def test_first_batch_at_step_zero_and_deep_in_training_cost_the_same(tmp_path):
    # uniform blocks of 4 rows, G = C = 8, N = 128: S = 16 divides 10**6, so step 10**6 is at t = 0
    root = str(tmp_path / "uniform")
    write_dataset(root, [[4] * 8] * 4)
    costs = []
    for step in (0, 10**6):
        st = CountingStorage(root)
        with TokenLoader(st, seed=1, global_batch=8, prefetch_steps=2) as ld:
            b = take(ld, step, 1)[0]
            assert b.step == step and b.epoch == step // 16
            costs.append((len(st.reads), ld.plan.hashed))
    assert costs[0] == costs[1] == (8, 32 + 8 * 4)


def corrupt_target(root, shard=1, block=2):
    m = read_manifest(LocalStorage(root))
    return (os.path.join(root, m.shards[shard].name), read_blocks(LocalStorage(root), m.shards[shard])[block],
            m.shards[shard].name)


def run_epoch(root):
    with TokenLoader(root, seed=0, global_batch=4, prefetch_steps=1) as ld:
        take(ld, 0, ld.steps_per_epoch)


def test_a_corrupt_byte_is_an_error_naming_shard_and_block(dataset):
    root, _ = dataset
    path, blk, name = corrupt_target(root)
    with open(path, "r+b") as f:
        f.seek(blk.offset + blk.length // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(FormatError, match=rf"shard {name} \(index 1\) block 2 .*CRC32 mismatch"):
        run_epoch(root)


def test_a_truncated_shard_is_an_error_naming_shard_and_block(dataset):
    root, _ = dataset
    path, blk, name = corrupt_target(root, shard=1, block=3)  # the last block of shard 1
    os.truncate(path, blk.offset + 10)
    with pytest.raises(StorageError, match=rf"shard {name} \(index 1\) block 3 .*short read"):
        run_epoch(root)


@pytest.mark.parametrize("factor", [2, 0.5])
def test_a_manifest_with_another_seq_len_is_named_as_the_cause(dataset, factor):
    # before: "decoded N bytes, expected M" (seq_len doubled) or "zstd frame does not decode" (halved), no cause
    root, _ = dataset
    path = os.path.join(root, "manifest.json")
    with open(path) as f:
        d = json.load(f)
    d["seq_len"] = int(d["seq_len"] * factor)
    with open(path, "w") as f:
        json.dump(d, f)
    with pytest.raises(FormatError, match=rf"seq_len {d['seq_len']} .*the manifest does not describe this shard "
                                          r".*restore the dataset's own manifest.json"):
        run_epoch(root)


def test_an_os_error_reading_a_shard_names_shard_and_block(dataset):
    root, _ = dataset
    path, _, name = corrupt_target(root, shard=1, block=0)
    os.unlink(path)
    os.mkdir(path)  # pread on a folder: EISDIR, an OSError as a failing disk's EIO would be
    with pytest.raises(StorageError, match=rf"shard {name} \(index 1\) block \d .*cannot read \(Is a directory\)"):
        run_epoch(root)


def test_a_missing_manifest_gives_the_format_message(dataset):
    root, _ = dataset
    os.unlink(os.path.join(root, "manifest.json"))
    with pytest.raises(FormatError) as want:
        read_manifest(LocalStorage(root))
    with pytest.raises(FormatError) as got:
        TokenLoader(root, seed=0, global_batch=4)
    assert str(got.value) == str(want.value) and "manifest.json not found" in str(got.value)


def test_cu_seqlens_on_a_hand_made_example():
    tokens = np.array([[5, 1, 7, 7, 1, 2, 9, 9],  # EOS at 1 and 4, BOS at 5 (right after an EOS)
                       [2, 8, 8, 8, 8, 8, 8, 1],  # BOS at the row start, EOS at the row end
                       [8, 8, 8, 2, 8, 8, 8, 8]])  # BOS in the middle
    assert cu_seqlens(tokens, eos_id=1, bos_id=2).tolist() == [0, 2, 5, 8, 16, 19, 24]
    assert cu_seqlens(tokens, eos_id=1, bos_id=None).tolist() == [0, 2, 5, 8, 16, 24]
    assert cu_seqlens(tokens, eos_id=1, bos_id=None).dtype == np.int32
    # one token as both BOS and EOS: documents are "T ... T"; cut only between two T
    same = np.array([[1, 5, 6, 1, 1, 7, 1, 1],
                     [8, 9, 1, 1, 5, 5, 5, 5]])
    assert cu_seqlens(same, eos_id=1, bos_id=1).tolist() == [0, 4, 7, 8, 11, 16]


def test_varlen_batches_carry_document_boundaries(tmp_path):
    root = str(tmp_path / "bos")
    write_dataset(root, BLOCKS, bos=BOS)
    with TokenLoader(root, seed=2, global_batch=8, varlen=True) as ld:
        for b in take(ld, 0, 3):
            cu = b.cu_seqlens
            assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == b.input_ids.numel()
            assert torch.all(cu[1:] > cu[:-1])
            flat = b.input_ids.flatten()
            starts = set(cu[:-1].tolist())
            assert set(range(0, flat.numel(), 16)) <= starts  # every row starts a document
            assert {i + 1 for i in torch.nonzero(flat == EOS).flatten().tolist()} <= set(cu.tolist())
            # no boundary without a reason
            reasons = set(range(0, flat.numel() + 1, 16)) | {i + 1 for i in torch.nonzero(flat == EOS).flatten().tolist()}
            reasons |= set(torch.nonzero(flat == BOS).flatten().tolist())
            assert set(cu.tolist()) == reasons


def test_state_dict_and_its_refusals(dataset, tmp_path):
    root, _ = dataset
    with TokenLoader(root, seed=5, global_batch=8, layout=4) as ld:
        state = ld.state_dict(13)
        assert json.loads(json.dumps(state)) == state
        assert set(state) == {"format_version", "manifest_hash", "seed", "global_batch", "layout", "epoch", "step"}
        assert (state["step"], state["epoch"]) == (13, 13 // ld.steps_per_epoch)
        assert ld.check_state(state) == 13
    other = str(tmp_path / "other")
    write_dataset(other, BLOCKS, seed=1)  # same shape, different tokens: a different manifest
    cases = [
        (dict(shards=other, global_batch=8, layout=4), r"dataset changed \(manifest hash"),
        (dict(shards=root, global_batch=16, layout=4), r"global batch changed \(8 -> 16 sequences\): keep global_batch=8"),
        (dict(shards=root, global_batch=8, layout=8), r"layout changed \(4 -> 8\): the layout is fixed at a run.s first launch; use layout 4"),
    ]
    for kw, msg in cases:
        with TokenLoader(kw.pop("shards"), seed=5, **kw) as ld:
            with pytest.raises(DataStateError, match=msg):
                ld.check_state(state)
    with TokenLoader(root, seed=6, global_batch=8, layout=4) as ld:
        with pytest.raises(DataStateError, match=r"seed changed \(5 -> 6\)"):
            ld.check_state(state)
        with pytest.raises(DataStateError, match=r"lacks \['manifest_hash'\]"):
            ld.check_state({k: v for k, v in state.items() if k != "manifest_hash"})
    # elastic: world sizes dividing the layout accept the state, others are refused at construction
    for world in (1, 2, 4):
        with TokenLoader(root, seed=5, global_batch=8, layout=4, world_size=world, rank=world - 1) as ld:
            assert ld.check_state(state) == 13
    with pytest.raises(PlanError, match=r"world size 8 does not divide the layout 4; use 1, 2 or 4 ranks"):
        TokenLoader(root, seed=5, global_batch=8, layout=4, world_size=8)


@pytest.mark.slow
def test_real_shards_from_shardgen(tmp_path):
    """Shards made by `python -m shardgen` from a tiny corpus, decoded independently with the plain
    recipe (webdataset + zstandard + numpy): the loader delivers exactly the rows the plan names."""
    import webdataset
    import zstandard

    rng = np.random.default_rng(0)
    words = "the of and to a in that is was he for it with as his on be at by i this had not".split()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(6):
        (corpus / f"doc{d}.txt").write_text(" ".join(rng.choice(words, size=int(rng.integers(200, 900)))))
    out, tok = str(tmp_path / "shards"), str(tmp_path / "tok")

    def shardgen(*args):
        subprocess.run([sys.executable, "-m", "shardgen", *args], cwd=ROOT, check=True, capture_output=True)
    shardgen("train-tokenizer", str(corpus), "--output", tok, "--vocab-size", "300")
    shardgen(str(corpus), "-o", out, "-t", tok, "--seq-len", "32", "--workers", "1", "--block-bytes", "512",
             "--shard-bytes", "8000", "-q")
    m = read_manifest(LocalStorage(out))
    assert len(m.shards) > 1
    rows_of = {}
    for i, shard in enumerate(m.shards):
        seq = 0
        for sample in webdataset.WebDataset(os.path.join(out, shard.name), shardshuffle=False):
            rows = np.frombuffer(zstandard.decompress(sample["tokens.zst"]), "<u2").reshape(-1, m.seq_len)
            for r in rows:
                rows_of[(i, seq)] = r
                seq += 1
    with TokenLoader(out, seed=11, global_batch=16, layout=8, world_size=2, rank=0, varlen=True) as ld:
        seen = []
        for b in take(ld, 0, ld.steps_per_epoch):
            assert np.array_equal(b.input_ids.numpy(), np.stack([rows_of[s] for s in b.sequences]))
            assert torch.equal(b.cu_seqlens, torch.from_numpy(cu_seqlens(b.input_ids.numpy(), m.eos_id, m.bos_id)))
            seen += b.sequences
    assert len(seen) == len(set(seen)) == ld.steps_per_epoch * ld.local_batch


def test_many_live_blocks_span_several_slab_chunks(tmp_path):
    # 96 blocks of 2 rows and G = 64 streams: about 70 blocks alive at once, over 3 chunks of 32 slots
    root = str(tmp_path / "small-blocks")
    rows_of = write_dataset(root, [[2] * 24] * 4)
    with TokenLoader(root, seed=8, global_batch=64, prefetch_steps=2) as ld:
        it = ld.iter_batches(0)
        for b in (next(it) for _ in range(2 * ld.steps_per_epoch)):
            assert np.array_equal(b.input_ids.numpy(), np.stack([rows_of[s] for s in b.sequences]))
        assert len(ld._pipelines[0].cache.slab.chunks) >= 3
        it.close()


def test_blocks_live_only_while_a_planned_step_needs_them(dataset):
    """The loader's block cache over many steps: after step s is released, exactly the blocks of the
    planned steps (s, s + d] are alive, each fetched while alive only once."""
    from trainer.data.fetch import BlockCache, BlockIndex

    root, _ = dataset
    m = read_manifest(LocalStorage(root))
    with TokenLoader(root, seed=2, global_batch=8, layout=8, world_size=2, rank=0) as ld:
        plan, d = ld.plan, 3
        fills = []
        cache = BlockCache(BlockIndex(m), lambda b, out: fills.append(b), threads=1)
        submitted = 0
        for s in range(3 * plan.steps_per_epoch):
            while submitted <= s + d:
                _, fut = cache.acquire(plan.step_rows(submitted, 2, 0).blocks, submitted)
                for f in fut:
                    f.result()
                submitted += 1
            cache.release_through(s)
            window = set().union(*(plan.step_rows(t, 2, 0).blocks.tolist() for t in range(s + 1, s + d + 1)))
            assert set(cache._live.tolist()) == window
            assert cache.slab.peak <= len(set().union(*(plan.step_rows(t, 2, 0).blocks.tolist()
                                                        for t in range(0, submitted))))
        cache.close()


def test_bad_start_step_and_use_after_close(dataset):
    root, _ = dataset
    ld = TokenLoader(root, seed=0, global_batch=8)
    with pytest.raises(PlanError, match=r"start step -1 is negative"):
        ld.iter_batches(-1)
    it = ld.iter_batches(0)
    next(it)
    ld.close()
    with pytest.raises(RuntimeError, match=r"TokenLoader was closed"):
        next(it)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(plans(), st.data())
def test_the_block_cache_fetches_only_the_ranks_blocks_and_keeps_what_steps_need(p, data):
    """Over random manifests, layouts, ranks and prefetch depths (the cache's fill only records)."""
    from shards.format import Block, ShardInfo
    from trainer.data.fetch import BlockCache, BlockIndex
    from trainer.data.plan import Plan, divisors

    rows, seed, g, c = p
    world = data.draw(st.sampled_from(divisors(c)))
    rank = data.draw(st.integers(0, world - 1))
    depth = data.draw(st.integers(0, 4))
    keep = data.draw(st.booleans())  # the loader keeps blocks until the plan's last use in the epoch
    shards = [ShardInfo.from_blocks(f"{i:05d}.tar", 0, 0, 0, "", [Block(offset=0, length=1, rows=n, crc32=0) for n in r])
              for i, r in enumerate(rows)]
    m = Manifest(seq_len=4, dtype="uint16", eos_id=0, bos_id=None, tokenizer={}, shards=shards)
    plan = Plan(rows, seed=seed, global_batch=g, layout=c)
    fills = []
    cache = BlockCache(BlockIndex(m), lambda b, out: fills.append(b), threads=1)
    try:
        submitted = 0
        for s in range(2 * plan.steps_per_epoch + 1):
            while submitted <= s + depth:
                step_rows = plan.step_rows(submitted, world, rank)
                before = len(fills)
                last_use = plan.block_last_use(step_rows.epoch, step_rows.blocks, world, rank) if keep else None
                if keep:  # the last use is a step of this epoch at which the rank needs the block
                    assert ((last_use >= submitted) & (last_use // plan.steps_per_epoch == step_rows.epoch)).all()
                slots, futures = cache.acquire(step_rows.blocks, submitted, last_use)
                for f in futures:
                    f.result()
                # new reads are blocks of this step, each once; every block of the step is alive
                assert set(fills[before:]) <= set(step_rows.blocks.tolist())
                assert len(fills[before:]) == len(set(fills[before:]))
                assert np.array_equal(slots, cache.slots_of(step_rows.blocks)) and (slots >= 0).all()
                submitted += 1
            cache.release_through(s)
        streams = len(plan.rank_streams(world, rank))
        assert cache.slab.peak <= min(plan.num_blocks, plan.global_batch // world * (depth + 1) + keep * streams)
        if keep:  # at most once per epoch (a block alive across an epoch boundary is not fetched again)
            S = plan.steps_per_epoch
            per_epoch = [set().union(*(plan.step_rows(t, world, rank).blocks.tolist()
                                       for t in range(e * S, min((e + 1) * S, submitted))))
                         for e in range(-(-submitted // S))]  # every epoch a submitted step reached
            assert len(set(fills)) <= len(fills) <= sum(len(b) for b in per_epoch)
    finally:
        cache.close()
