"""TokenLoader over a mixture of datasets written with the format's ShardWriter: tokens, ranks, reads, state."""
import os
from collections import Counter

import numpy as np
import pytest
import torch

from shards.format import Manifest, read_manifest
from shards.storage import LocalStorage
from tests.data_support import CountingStorage, take, write_dataset
from trainer.data import DataStateError, PlanError, Source, TokenLoader

BLOCKS = {"web": [[5, 5, 3], [4, 4, 4, 2], [7], [6, 6]], "code": [[3, 3], [2]], "math": [[4, 4, 4]]}


@pytest.fixture
def sources(tmp_path):
    out = {}
    for seed, (name, blocks) in enumerate(BLOCKS.items()):
        root = str(tmp_path / name)
        out[name] = (root, write_dataset(root, blocks, seed=seed))
    return out


def mix(sources, weights=(0.5, 0.3, 0.2), **kw):
    return [Source(n, sources[n][0], w) for n, w in zip(BLOCKS, weights)]


def test_batches_hold_the_tokens_the_mixture_names(sources):
    with TokenLoader(mix(sources), seed=3, global_batch=10) as ld:
        batches = take(ld, 0, 40)
        counts = [Counter(b.sources) for b in batches]
    names = list(BLOCKS)
    for b in batches:
        expect = np.stack([sources[names[i]][1][seq] for i, seq in zip(b.sources, b.sequences)]).astype(np.int64)
        assert np.array_equal(b.input_ids.numpy(), expect)
    assert all(c == {0: 5, 1: 3, 2: 2} for c in counts)


@pytest.mark.parametrize("start", [0, 7, 1000])
def test_ranks_together_give_the_single_rank_batch_and_resume_is_exact(sources, start):
    stages = [(5, [1, 1, 0]), (20, [0.1, 0.1, 0.8])]
    with TokenLoader(mix(sources), seed=9, global_batch=8, stages=stages, prefetch_steps=2) as one:
        whole = take(one, 0, start + 3)[start:]
        state = one.state_dict(start)
    for world in (2, 4):
        parts = []
        for rank in range(world):
            with TokenLoader(mix(sources), seed=9, global_batch=8, stages=stages, world_size=world, rank=rank,
                             prefetch_steps=1) as ld:
                parts.append(take(ld, ld.check_state(state), 3))
        for i, b in enumerate(whole):
            assert torch.equal(torch.cat([p[i].input_ids for p in parts]), b.input_ids)
            assert sum((p[i].sequences for p in parts), []) == b.sequences
            assert sum((p[i].sources for p in parts), []) == b.sources


def test_each_source_reads_each_block_once_per_epoch(sources, tmp_path):
    """However rarely a source is drawn (math: 1 row in 10), its blocks are read once per epoch."""
    stores = {n: CountingStorage(sources[n][0]) for n in BLOCKS}
    srcs = [Source(n, stores[n], w) for n, w in zip(BLOCKS, (0.6, 0.3, 0.1))]
    with TokenLoader(srcs, seed=1, global_batch=10, prefetch_steps=1) as ld:
        plans = ld.mixture.plans
        steps = 60
        take(ld, 0, steps)
        used = ld.sequences_before(steps)
    for (name, st), plan, n in zip(stores.items(), plans, used):
        epochs = -(-n // (plan.steps_per_epoch * plan.global_batch))  # epochs begun
        per_block = Counter(st.reads)
        # each block at most once per epoch begun, plus one per stream boundary (a cut block)
        assert max(per_block.values()) <= epochs + 1, name
        assert len(st.reads) <= epochs * plan.num_blocks + plan.layout, name


def test_sources_must_agree_on_seq_len_and_tokenizer(sources, tmp_path):
    root = str(tmp_path / "long")
    write_dataset(root, [[4, 4]], seq_len=32)
    with pytest.raises(PlanError, match=r"source 'long' has seq_len 32 but source 'web' has 16: mixed sources"):
        TokenLoader([Source("web", sources["web"][0]), Source("long", root)], seed=0, global_batch=4)
    st = LocalStorage(str(tmp_path / "code"))
    m = read_manifest(st)
    other = Manifest(seq_len=m.seq_len, dtype=m.dtype, eos_id=m.eos_id, bos_id=m.bos_id,
                     tokenizer={**m.tokenizer, "sha256": "f" * 64}, shards=m.shards)
    st.put_bytes("manifest.json", other.to_bytes())
    with pytest.raises(PlanError, match=r"source 'code' has tokenizer sha256 f{64} but source 'web' has 0"):
        TokenLoader([Source("web", sources["web"][0]), Source("code", st.root)], seed=0, global_batch=4)


def test_state_refuses_changes_to_steps_taken_and_accepts_a_later_stage(sources, tmp_path):
    stages = [(10, [1, 1, 1])]
    with TokenLoader(mix(sources), seed=2, global_batch=10, stages=stages) as ld:
        state = ld.state_dict(15)
    assert [s["name"] for s in state["sources"]] == list(BLOCKS)
    assert state["stages"] == [{"start_step": 0, "weights": ["1/2", "3/10", "1/5"]},
                               {"start_step": 10, "weights": ["1", "1", "1"]}]

    def check(weights=(0.5, 0.3, 0.2), stages=stages, seed=2, srcs=None):
        with TokenLoader(srcs or mix(sources, weights), seed=seed, global_batch=10, stages=stages) as ld:
            return ld.check_state(state)
    assert check() == 15
    assert check(stages=stages + [(15, [0, 0, 1])]) == 15  # a stage from the current step on: accepted
    assert check(stages=stages + [(400, [0, 1, 1])]) == 15
    with pytest.raises(DataStateError, match=r"the base weights changed \(web 1/2 -> 2/5, math 1/5 -> 3/10\)"):
        check(weights=(0.4, 0.3, 0.3))
    with pytest.raises(DataStateError, match=r"the stage at step 10 changed \(math 1 -> 2\)"):
        check(stages=[(10, [1, 1, 2])])
    with pytest.raises(DataStateError, match=r"the stage at step 12 was added, but the run is at step 15"):
        check(stages=stages + [(12, [1, 0, 0])])
    with pytest.raises(DataStateError, match=r"the stage at step 10 was removed"):
        check(stages=[])
    with pytest.raises(DataStateError, match=r"seed changed \(2 -> 3\)"):
        check(seed=3)
    with pytest.raises(DataStateError, match=r"the sources changed \(web, code, math -> web, code\)"):
        check(srcs=mix(sources)[:2], stages=[(10, [1, 1])])
    write_dataset(sources["code"][0], [[3, 3], [3]], seed=5)
    with pytest.raises(DataStateError, match=r"source 'code' changed \(manifest hash"):
        check()
    with TokenLoader(sources["web"][0], seed=2, global_batch=10) as one, pytest.raises(
            DataStateError, match=r"started on a mixture of 3 sources, the config now has 1 source"):
        one.check_state(state)


def test_one_source_through_sources_is_the_one_dataset_loader(sources):
    root = sources["web"][0]
    with TokenLoader(root, seed=4, global_batch=8) as a, TokenLoader([Source("web", root)], seed=4,
                                                                     global_batch=8) as b:
        for x, y in zip(take(a, 3, 5), take(b, 3, 5)):
            assert torch.equal(x.input_ids, y.input_ids) and x.sequences == y.sequences
        assert a.state_dict(8) == b.state_dict(8)
        assert set(a.state_dict(8)) == {"format_version", "manifest_hash", "seed", "global_batch", "layout",
                                        "epoch", "step"}
    assert os.path.isdir(root)


@pytest.mark.slow
def test_cli_plan_and_peek_of_a_mixture_config(tmp_path):
    import json
    import subprocess
    import sys

    from tests.train_support import ROOT, make_shards
    a = make_shards(str(tmp_path / "a"), sequences=40, seq_len=32, seed=0)
    b = make_shards(str(tmp_path / "b"), sequences=12, seq_len=32, seed=1)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[data]\nglobal_batch = 4\nseed = 5\n[[data.sources]]\nname = "a"\nshards = "{a}"\nweight = 0.75\n'
                   f'[[data.sources]]\nname = "b"\nshards = "{b}"\nweight = 0.25\n'
                   f'[[data.stages]]\nstart_step = 3\nweights = {{ a = 0, b = 1 }}\n')

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "trainer.data", *args], cwd=ROOT, capture_output=True, text=True)
    r = cli("plan", "--config", str(cfg), "--world-size", "2", "--rank", "1", "--start-step", "1", "--steps", "3")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    with TokenLoader([Source("a", a, 0.75), Source("b", b, 0.25)], seed=5, global_batch=4, stages=[(3, [0, 1])],
                     world_size=2, rank=1) as ld:
        batches = take(ld, 1, 3)
    assert [x["step"] for x in lines] == [1, 2, 3] and {x["rank"] for x in lines} == {1}
    assert [[tuple(p) for p in x["sequences"]] for x in lines] == [x.sequences for x in batches]
    assert [x["sources"] for x in lines] == [["a", "b"], ["a", "b"], ["b", "b"]]
    r = cli("plan", "--config", str(cfg), "data.seed=6")  # overrides as in the trainer
    assert r.returncode == 0 and json.loads(r.stdout)["sources"] == ["a", "a", "a", "b"]

    r = cli("peek", "--config", str(cfg), "--step", "2", "--chars", "20")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()
    assert rows[0].startswith("step 2, rank 0 of 1: 4 rows of 32 tokens; '¦' marks a document boundary")
    assert [x.split(" shard")[0] for x in rows[1:]] == ["[0] a", "[1] a", "[2] a", "[3] b"]
    assert all(" ... " in x for x in rows[1:]) and any("¦" in x for x in rows[1:])
    r = cli("plan", "--config", str(cfg), "--shards", a)
    assert r.returncode == 2 and "not both" in r.stderr


def test_validation_shards_are_checked_against_their_source(sources, tmp_path):
    from trainer.data.sources import check_val_set
    val = str(tmp_path / "val")
    write_dataset(val, [[4]], seq_len=32)
    with TokenLoader(mix(sources), seed=0, global_batch=10) as ld:
        check_val_set(ld, 1, sources["code"][0])  # same seq_len and tokenizer: fine
        with pytest.raises(PlanError, match=r"its val_shards .*/val has seq_len 32 but source 'code' has 16: "
                                            r"validation shards need the seq_len and tokenizer"):
            check_val_set(ld, 1, val)


def test_the_start_up_log_names_each_sources_streams_and_the_table_lines_up(sources, caplog):
    """A source's own plan has ceil(share) streams (5, 3 and 2 of G = C = 10 here): the log once called its
    plan's batch a "global batch" (5 + 3 + 2 against the run's 10) and said "1 sequences"; the table's epochs
    column was %.3g ("0.19", "0.0635": no two points in line)."""
    from trainer.data.sources import _epochs, mixture_table
    with caplog.at_level("INFO", logger="trainer.data"):
        ld = TokenLoader(mix(sources), seed=3, global_batch=10)
    with ld:
        lines, _ = mixture_table(ld, 3, 100.0)
    assert "global batch" not in caplog.text
    # web: 46 sequences in 5 streams of L = 9: 9 slots of each stream an epoch, 1 sequence after the last stream
    assert ("web: 46 sequences in 10 blocks; 5 streams of 1 sequence a slot: 9 slots per stream per epoch; "
            "1 sequence of each epoch's order is dropped (1 after the last stream, 0 at the end of each of the "
            "5 streams)") in caplog.text
    assert "code: 8 sequences in 3 blocks; 3 streams of 1 sequence a slot: 2 slots per stream per epoch; " \
           "2 sequences of each epoch's order are dropped" in caplog.text
    assert lines[0] == "mixture of 3 sources, global batch 10 in 10 streams, 3 steps:"
    rows = lines[2:]
    epochs = [r.split()[-1] for r in rows]
    assert epochs == ["0.333", "1.500", "0.500"]  # 15 of web's 45, 9 of code's 6, 6 of math's 12 an epoch
    assert len({len(r) for r in lines[1:]}) == 1 and len({r.rindex(".") for r in rows}) == 1
    assert (_epochs(0.0001), _epochs(0.0), _epochs(12.34567)) == ("<0.001", "0.000", "12.346")
