"""shardgen verify / inspect / merge commands, plain readers (tar, webdataset), and the trained
tokenizer as transformers loads it."""
import io
import json
import os
import re
import tarfile

import numpy as np
import pytest

from shardgen.build import BuildOptions, run_build
from shardgen.cli import main
from shardgen.output import BuildError
from shards.format import FormatError, encode_block_index, index_name, read_blocks
from shards.storage import LocalStorage
from shardgen.verify import verify
from tests.shardgen_testlib import make_docs, read_dataset, tiny_tokenizer, write_jsonl

__all__ = ["tiny_tokenizer"]
SEQ = 16


@pytest.fixture
def dataset(tmp_path, tiny_tokenizer):
    write_jsonl(str(tmp_path / "x.jsonl"), make_docs(40, seed=9))
    out = tmp_path / "out"
    run_build(BuildOptions(inputs=[str(tmp_path / "x.jsonl")], output=str(out), tokenizer=tiny_tokenizer,
                           seq_len=SEQ, block_bytes=256, task_bytes=2000, workers=1, progress=False,
                           log=io.StringIO()))
    return out


def blocks_of(dataset, shard):
    return read_blocks(LocalStorage(str(dataset)), shard)


def test_verify_passes_a_good_dataset(dataset, capsys):
    assert main(["verify", str(dataset), "-q"]) == 0
    assert "OK:" in capsys.readouterr().out


def test_verify_names_the_block_with_a_flipped_byte(dataset, capsys):
    m, _ = read_dataset(str(dataset))
    shard = m.shards[1]
    b = blocks_of(dataset, shard)[2]
    path = dataset / shard.name
    data = bytearray(path.read_bytes())
    data[b.offset + b.length // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=rf"{shard.name} block 2: CRC32 mismatch"):
        verify(LocalStorage(str(dataset)), progress=False)
    assert main(["verify", str(dataset), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"{shard.name} block 2: CRC32 mismatch" in err
    assert "regenerate the dataset" in err and "run `python -m shardgen verify`" not in err  # verify does not send you to verify


def test_verify_reads_each_shard_byte_once(dataset, monkeypatch):
    import shardgen.verify

    class Counting(LocalStorage):
        bytes_read = 0

        def read_range(self, name, offset, length):
            Counting.bytes_read += length
            return super().read_range(name, offset, length)

    m = verify(Counting(str(dataset)), progress=False)
    # checksums, sha256 and tar headers from one read (it was the blocks twice, then every header again)
    assert Counting.bytes_read == m.totals()["bytes"]


def _rewrite(dataset, shard_index, offset, data: bytes):
    """Put `data` at `offset` of a shard and make the manifest's sha256 agree: only the structure is wrong."""
    import hashlib
    mpath = dataset / "manifest.json"
    d = json.loads(mpath.read_bytes())
    shard = d["shards"][shard_index]
    cols = d["shard_columns"]
    path = dataset / shard[cols.index("name")]
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))
    shard[cols.index("sha256")] = hashlib.sha256(raw).hexdigest()
    mpath.write_text(json.dumps(d))
    return shard


def test_verify_names_a_tar_member_that_is_not_the_manifest_block(dataset):
    m, _ = read_dataset(str(dataset))
    b = blocks_of(dataset, m.shards[0])[1]
    info = tarfile.TarInfo("00000-000/000009.tokens.zst")  # the same name length: only the name differs
    info.size = b.length
    _rewrite(dataset, 0, b.offset - 512, info.tobuf(tarfile.USTAR_FORMAT))
    with pytest.raises(FormatError, match=r"00000-000\.tar block 1: tar member '00000-000/000009.tokens.zst'"):
        verify(LocalStorage(str(dataset)), progress=False)


def test_verify_names_a_tar_member_after_the_last_block(dataset):
    m, _ = read_dataset(str(dataset))
    last = blocks_of(dataset, m.shards[0])[-1]
    extra = tarfile.TarInfo("stowaway")
    _rewrite(dataset, 0, last.offset + last.length + (-last.length % 512), extra.tobuf(tarfile.USTAR_FORMAT))
    with pytest.raises(FormatError, match=r"00000-000\.tar: more tar members after the index's \d+ blocks"):
        verify(LocalStorage(str(dataset)), progress=False)


def test_verify_names_overlapping_blocks_in_the_index(dataset):
    import zlib
    m, _ = read_dataset(str(dataset))
    blocks = blocks_of(dataset, m.shards[0])
    blocks[1] = blocks[1].__class__(blocks[0].offset, *(getattr(blocks[1], k) for k in ("length", "rows", "crc32")))
    data = encode_block_index(blocks)
    (dataset / index_name(m.shards[0].name)).write_bytes(data)
    path = dataset / "manifest.json"
    d = json.loads(path.read_bytes())
    d["shards"][0][d["shard_columns"].index("index_crc32")] = zlib.crc32(data)  # the index agrees: only the layout is wrong
    path.write_text(json.dumps(d))
    with pytest.raises(FormatError, match=r"block 1: the index puts it at \d+, inside the block before"):
        verify(LocalStorage(str(dataset)), progress=False)


def test_verify_catches_a_flipped_header_byte(dataset):
    m, _ = read_dataset(str(dataset))
    path = dataset / m.shards[0].name
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01  # inside the first tar header, outside any block's data
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=rf"{m.shards[0].name}: sha256 mismatch"):
        verify(LocalStorage(str(dataset)), progress=False)


def test_verify_names_a_truncated_shard(dataset, capsys):
    m, _ = read_dataset(str(dataset))
    shard = m.shards[-1]
    path = dataset / shard.name
    cut = blocks_of(dataset, shard)[1].offset + 10
    path.write_bytes(path.read_bytes()[:cut])
    assert main(["verify", str(dataset), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"{shard.name}: {cut} bytes, the manifest says {shard.bytes}" in err
    assert "block 1 onward is cut off" in err


def test_verify_tells_a_missing_tokenizer_from_one_that_is_not_the_manifests(dataset, capsys):
    tok = dataset / "tokenizer.json"
    good = tok.read_bytes()
    tok.write_bytes(good + b" ")  # another file: the manifest's sha256 no longer fits
    assert main(["verify", str(dataset), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"{tok} is not the tokenizer the manifest names" in err and "manifest.json is another dataset's" in err
    tok.unlink()
    assert main(["verify", str(dataset), "-q"]) == 1
    assert f"{tok} is missing: copy the tokenizer.json the shards were made with there" in capsys.readouterr().err
    tok.write_bytes(good)
    assert main(["verify", str(dataset), "-q"]) == 0


def test_readers_refuse_a_directory_without_manifest(tmp_path, capsys):
    for cmd in ("verify", "inspect"):
        assert main([cmd, str(tmp_path)]) == 1
        assert "manifest.json not found" in capsys.readouterr().err


def test_inspect_summary(dataset, capsys):
    assert main(["inspect", str(dataset), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    m, streams = read_dataset(str(dataset))
    assert s["tokens"] == sum(len(v) for v in streams.values()) == s["sequences"] * SEQ
    assert s["shards"] == len(m.shards) and s["compression_ratio"] > 1
    assert s["tokenizer"]["eos_token"] == "<|endoftext|>" and s["stats"]["documents"] == 40
    assert main(["inspect", str(dataset)]) == 0
    out = capsys.readouterr().out
    assert "compression ratio" in out and "eos '<|endoftext|>'=0, no bos, sha256" in out  # was "bos None=None"


def test_help_shows_each_default_once_and_no_empty_ones(capsys):
    for args in (["--help"], ["train-tokenizer", "--help"]):
        with pytest.raises(SystemExit):
            main(args)
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert "(default: None)" not in text and "(default: False)" not in text
        assert not re.search(r"\(default: [^)]*\) \(default:", text)  # "(default: the tokenizer's EOS ...)" once
        assert "(default: 3)" in text if args == ["--help"] else "(default: 32000)" in text


def test_merge_command_rewrites_the_same_manifest(dataset, capsys):
    before = (dataset / "manifest.json").read_bytes()
    os.unlink(dataset / "manifest.json")
    assert main(["merge", str(dataset)]) == 0
    assert (dataset / "manifest.json").read_bytes() == before
    os.unlink(dataset / "_tasks" / "00001.json")
    assert main(["merge", str(dataset)]) == 1
    assert "tasks 1." in capsys.readouterr().err


def test_plain_tar_and_webdataset_read_a_shard(dataset):
    import webdataset
    import zstandard
    m, streams = read_dataset(str(dataset))
    shard = m.shards[0]
    url = str(dataset / shard.name)
    with tarfile.open(url) as tar:
        assert tar.getnames() == [f"{shard.name[:-4]}/{i:06d}.tokens.zst" for i in range(shard.num_blocks)]
    # The README's lines:
    rows = []
    for sample in webdataset.WebDataset(url, shardshuffle=False):
        rows.append(np.frombuffer(zstandard.decompress(sample["tokens.zst"]), "<u2").reshape(-1, m.seq_len))
    assert np.concatenate(rows).reshape(-1).tolist() == streams[shard.name]


def test_trained_tokenizer_loads_in_transformers(tiny_tokenizer):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    text = "thou art 日本 👩‍👩‍👧"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_train_tokenizer_command(tmp_path):
    write_jsonl(str(tmp_path / "t.jsonl"), make_docs(30, seed=2))
    assert main(["train-tokenizer", str(tmp_path / "t.jsonl"), "--output", str(tmp_path / "tok"),
                 "--vocab-size", "300"]) == 0
    vocab = json.load(open(tmp_path / "tok" / "tokenizer.json"))["model"]["vocab"]
    assert len(vocab) <= 300 and vocab["<|endoftext|>"] == 0


def test_train_tokenizer_says_when_the_text_gives_fewer_tokens_than_asked(tmp_path, capsys):
    write_jsonl(str(tmp_path / "t.jsonl"), make_docs(30, seed=2))
    assert main(["train-tokenizer", str(tmp_path / "t.jsonl"), "--output", str(tmp_path / "tok"),
                 "--vocab-size", "32000"]) == 0
    n = len(json.load(open(tmp_path / "tok" / "tokenizer.json"))["model"]["vocab"])
    out, err = capsys.readouterr()
    assert n < 32000 and f"({n} tokens)" in out
    assert f"note: {n} tokens, fewer than --vocab-size 32000" in err  # before: silent


def test_train_tokenizer_refuses_what_cannot_be_right(tmp_path, capsys):
    write_jsonl(str(tmp_path / "t.jsonl"), make_docs(30, seed=2))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text(" \n\t ")  # whitespace only: an empty document
    write_jsonl(str(tmp_path / "blank" / "b.jsonl"), ["", "  "])
    tok = str(tmp_path / "tok")
    base = ["train-tokenizer", str(tmp_path / "t.jsonl"), "--output", tok]
    assert main(base + ["--vocab-size", "300"]) == 0
    before = open(os.path.join(tok, "tokenizer.json"), "rb").read()
    capsys.readouterr()
    for args, want in ((base + ["--vocab-size", "400"], "tokenizer.json exists: pass --overwrite to replace it"),
                       (["train-tokenizer", str(tmp_path / "t.jsonl"), "--output", str(tmp_path / "small"),
                         "--vocab-size", "100"], "--vocab-size 100: a byte-level BPE needs at least 257 tokens"),
                       (["train-tokenizer", str(tmp_path / "blank"), "--output", str(tmp_path / "none")],
                        "no text to train on (2 input files, every document empty)")):
        assert main(args) == 1
        err = capsys.readouterr().err
        assert want in err and len(err.strip().splitlines()) == 1, err
    assert open(os.path.join(tok, "tokenizer.json"), "rb").read() == before
    assert not os.path.exists(tmp_path / "small") and not os.path.exists(tmp_path / "none")
    assert main(base + ["--vocab-size", "400", "--overwrite"]) == 0
    assert open(os.path.join(tok, "tokenizer.json"), "rb").read() != before


def test_bad_numbers_are_refused_at_parse_time(tmp_path, capsys):
    # Checked before any tokenizing: a bad --zstd-level used to fail in a worker, a --seq-len of 1 trained NaN.
    write_jsonl(str(tmp_path / "t.jsonl"), make_docs(5))
    args = [str(tmp_path / "t.jsonl"), "--output", str(tmp_path / "out"), "--tokenizer", "no-such-tokenizer"]
    for flag, value, want in (("--zstd-level", "99", "zstd levels go from -131072 (fastest) to 22 (smallest)"),
                              ("--seq-len", "1", "a sequence needs at least 2 tokens")):
        with pytest.raises(SystemExit) as e:
            main(args + [flag, value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {flag}: {value}: {want}" in err, err
    assert not os.path.exists(tmp_path / "out")


def test_a_short_seq_len_is_refused_below_2_and_warned_about_below_64(tmp_path, tiny_tokenizer):
    write_jsonl(str(tmp_path / "t.jsonl"), make_docs(5))
    with pytest.raises(BuildError, match="--seq-len 1: a sequence needs at least 2 tokens"):
        run_build(BuildOptions(inputs=[str(tmp_path / "t.jsonl")], output=str(tmp_path / "a"),
                               tokenizer=tiny_tokenizer, seq_len=1, progress=False, log=io.StringIO()))
    log = io.StringIO()
    run_build(BuildOptions(inputs=[str(tmp_path / "t.jsonl")], output=str(tmp_path / "b"), tokenizer=tiny_tokenizer,
                           seq_len=16, workers=1, progress=False, log=log))
    assert "warning: --seq-len 16 is very short: a model sees at most 15 tokens of context" in log.getvalue()


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_output_into_a_closed_pipe_is_not_an_error(dataset, command):
    # a new user's trial: `python -m shardgen inspect DIR | head -2` printed a BrokenPipeError traceback. A pipe
    # whose reading end is closed before the command starts makes its first write fail, every time.
    import subprocess
    import sys
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, "-m", "shardgen", command, str(dataset)], stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=120,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    finally:
        os.close(write_end)
    assert r.returncode == 0 and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
