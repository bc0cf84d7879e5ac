"""Format 2: per-shard summaries in the manifest, each shard's block index in `<shard>.blocks`, read
once when a rank first touches the shard. Format-1 datasets still load and `shardgen upgrade` converts
them (local and S3, real SeaweedFS) without changing a batch or breaking a resume."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest

from shardgen.build import BuildOptions, run_build
from shardgen.cli import main
from shards.format import (INDEX_SUFFIX, FormatError, Manifest, ShardInfo, index_name, read_blocks,
                           read_manifest)
from shards.s3 import S3Storage
from shards.storage import LocalStorage
from tests.shardgen_testlib import make_docs, tiny_tokenizer, write_jsonl
from tests.s3_fixtures import upload_dir
from tests.data_support import write_dataset
from trainer.data import TokenLoader

__all__ = ["tiny_tokenizer"]


def counting(cls):
    """A real storage class whose whole-object reads are recorded by name (the index reads)."""
    class Counting(cls):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.names_read: list[str] = []

        def read(self, name):
            self.names_read.append(name)
            return super().read(name)
    return Counting


def take(root_or_storage, steps, **kw):
    with TokenLoader(root_or_storage, seed=3, global_batch=8, prefetch_steps=1, **kw) as ld:
        it = ld.iter_batches(0)
        out = [(b.input_ids.numpy().copy(), b.sequences) for _, b in zip(range(steps), it)]
        it.close()
        return out, ld.state_dict(steps)


def to_format_1(root: str) -> str:
    """Rewrite a format-2 dataset as format 1 wrote it: every block in manifest.json, no .blocks files."""
    st = LocalStorage(root)
    m = read_manifest(st)
    shards = []
    for s in m.shards:
        blocks = read_blocks(st, s)
        shards.append(ShardInfo.from_blocks(s.name, s.tokens, s.documents, s.bytes, s.sha256, blocks,
                                            with_index=False))
        os.unlink(os.path.join(root, index_name(s.name)))
    old = Manifest(seq_len=m.seq_len, dtype=m.dtype, eos_id=m.eos_id, bos_id=m.bos_id, tokenizer=m.tokenizer,
                   shards=shards, settings=m.settings, stats=m.stats, format_version=1)
    st.put_bytes("manifest.json", old.to_bytes())
    assert "blocks" in json.loads(old.to_bytes())["shards"][0]  # the format-1 layout
    return root


@pytest.fixture
def built(tmp_path, tiny_tokenizer):
    write_jsonl(str(tmp_path / "x.jsonl"), make_docs(60, seed=4))
    out = str(tmp_path / "out")
    run_build(BuildOptions(inputs=[str(tmp_path / "x.jsonl")], output=out, tokenizer=tiny_tokenizer, seq_len=16,
                           block_bytes=256, task_bytes=1500, shard_bytes=2000, workers=1, progress=False,
                           log=io.StringIO()))
    return out


def test_each_shard_has_an_index_that_any_tar_reader_agrees_with(built):
    st = LocalStorage(built)
    m = read_manifest(st)
    assert m.format_version == 2 and len(m.shards) > 3
    assert sorted(n for n in os.listdir(built) if n.endswith(INDEX_SUFFIX)) == sorted(
        index_name(s.name) for s in m.shards)
    raw = json.loads(open(os.path.join(built, "manifest.json")).read())
    assert all(isinstance(row, list) and "blocks" not in raw for row in raw["shards"])  # summaries only
    for s in m.shards:
        with tarfile.open(os.path.join(built, s.name)) as tar:  # the tar holds blocks only
            members = tar.getmembers()
        assert [(b.offset, b.length) for b in read_blocks(st, s)] == [(x.offset_data, x.size) for x in members]
        assert s.block_rows == [b.rows for b in read_blocks(st, s)]


def test_a_rank_reads_the_index_of_each_shard_it_touches_once(tmp_path):
    root = str(tmp_path / "d")
    write_dataset(root, [[4] * 5] * 6)  # 6 shards of 5 blocks
    Counting = counting(LocalStorage)
    st = Counting(root)
    with TokenLoader(st, seed=1, global_batch=8, world_size=2, rank=1, prefetch_steps=0) as ld:
        it = ld.iter_batches(0)
        next(it)
        touched = {ld.index.locate(int(b))[1] for b in ld.plan.step_rows(0, 2, 1).blocks}
        assert ld.index.index_reads == len(touched) < 6
        first = list(st.names_read)
        for _ in range(ld.steps_per_epoch * 2):  # two epochs: every shard touched, each index read once
            next(it)
        it.close()
        assert ld.index.index_reads == 6
    assert first[0] == "manifest.json" and sorted(first[1:]) == sorted(index_name(f"{i:05d}.tar") for i in touched)
    indexes = [n for n in st.names_read if n.endswith(INDEX_SUFFIX)]
    assert len(indexes) == len(set(indexes)) == 6


def test_with_fewer_cached_tables_than_shards_each_index_is_read_once_per_epoch(tmp_path):
    """A table read keeps the entries of every block of that shard this rank reads in the epoch, so a
    small table cache costs no second read of an index within an epoch."""
    root = str(tmp_path / "d")
    write_dataset(root, [[4] * 5] * 6)
    st = counting(LocalStorage)(root)
    with TokenLoader(st, seed=1, global_batch=8, world_size=2, rank=1, prefetch_steps=2) as ld:
        ld.index.cached_shards = 1
        S = ld.steps_per_epoch
        it = ld.iter_batches(0)
        reads = []
        for _ in range(3):
            before = ld.index.index_reads
            for _ in range(S):
                next(it)
            reads.append(ld.index.index_reads - before)
        it.close()
        assert not ld.index._entries  # entries go with the blocks: none left after close
    assert sum(reads) <= 6 * 4  # once per shard and epoch: the 3 taken and the one the prefetch reaches


def test_a_format_1_dataset_loads_and_upgrade_keeps_batches_and_resume(built, capsys):
    want, _ = take(built, 6)
    fresh = read_manifest(LocalStorage(built))
    to_format_1(built)
    v1 = read_manifest(LocalStorage(built))
    assert v1.format_version == 1
    got, state1 = take(built, 6)  # format 1 still loads, same batches
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(got, want))
    assert main(["upgrade", built]) == 0
    assert "format 1 -> 2" in capsys.readouterr().out
    up = read_manifest(LocalStorage(built))
    assert up.upgraded_from == {"format_version": 1, "manifest_sha256": v1.content_hash()}
    assert [s.to_row() for s in up.shards] == [s.to_row() for s in fresh.shards]  # as shardgen writes them
    again, _ = take(built, 6)
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(again, want))
    with TokenLoader(built, seed=3, global_batch=8) as ld:  # a checkpoint of the format-1 run resumes
        assert ld.check_state(state1) == 6
    assert main(["upgrade", built]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["verify", built, "-q"]) == 0


def test_a_damaged_index_names_the_shard_and_the_fix_and_reindex_repairs_it(built, capsys):
    m = read_manifest(LocalStorage(built))
    shard = m.shards[1]
    path = os.path.join(built, index_name(shard.name))
    good = open(path, "rb").read()
    cases = {"truncated": good[:-7], "corrupt": good[:40] + bytes([good[40] ^ 1]) + good[41:], "missing": None}
    for what, data in cases.items():
        if data is None:
            os.unlink(path)
        else:
            open(path, "wb").write(data)
        with pytest.raises(FormatError) as e:
            read_blocks(LocalStorage(built), shard)
        msg = str(e.value)
        assert shard.name in msg and "upgrade DATASET --reindex" in msg, msg
        assert {"truncated": "bytes", "corrupt": "CRC32", "missing": "missing"}[what] in msg
        assert main(["verify", built, "-q"]) == 1
        assert shard.name in capsys.readouterr().err
    assert main(["upgrade", built, "--reindex"]) == 0
    assert open(path, "rb").read() == good
    assert main(["verify", built, "-q"]) == 0
    tar = os.path.join(built, shard.name)  # a shard that changed is not papered over by a new index
    data = bytearray(open(tar, "rb").read())
    b = read_blocks(LocalStorage(built), shard)[0]
    data[b.offset + b.length // 2] ^= 0xFF
    open(tar, "wb").write(bytes(data))
    assert main(["upgrade", built, "--reindex"]) == 1
    assert "regenerate" in capsys.readouterr().err


def test_a_rank_reading_from_s3_gets_each_touched_index_once_and_upgrade_works_there(tmp_path, s3_url, capsys):
    local = str(tmp_path / "d")
    write_dataset(local, [[4] * 5] * 6)
    upload_dir(local, s3_url)
    Counting = counting(S3Storage)
    st = Counting(s3_url)
    try:
        got, _ = take(st, 3, world_size=2, rank=0)
        with TokenLoader(st, seed=3, global_batch=8, world_size=2, rank=0) as ld:
            touched = {ld.index.locate(int(b))[1] for s in range(3) for b in ld.plan.step_rows(s, 2, 0).blocks}
    finally:
        st.close()
    indexes = [n for n in st.names_read if n.endswith(INDEX_SUFFIX)]
    assert len(indexes) == len(set(indexes))  # once each
    assert set(indexes) >= {index_name(f"{i:05d}.tar") for i in touched}
    want, _ = take(local, 3, world_size=2, rank=0)
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(got, want))
    # a format-1 dataset in S3: loads, upgrades in place, same batches
    to_format_1(local)
    url1 = s3_url + "/v1"
    upload_dir(local, url1)
    v1, _ = take(url1, 3, world_size=2, rank=0)
    assert main(["upgrade", url1]) == 0
    assert "format 1 -> 2" in capsys.readouterr().out
    v2, _ = take(url1, 3, world_size=2, rank=0)
    for a, b in zip(v1 + v2, want + want):
        assert np.array_equal(a[0], b[0]) and a[1] == b[1]


def test_a_manifest_of_an_unknown_format_version_is_one_clear_error(built, capsys):
    path = os.path.join(built, "manifest.json")
    d = json.loads(open(path).read())
    d["format_version"] = 99
    open(path, "w").write(json.dumps(d))
    assert main(["verify", built, "-q"]) == 1
    assert "format_version 99 is not supported (this reader knows 1, 2)" in capsys.readouterr().err
