"""shardgen inputs: listing, and every kind of bad input (clear error naming file and line, or a
counted skip with --skip-bad)."""
import glob
import gzip
import io
import os
import re

import pytest
import zstandard

from shardgen.build import BuildOptions, run_build
from shardgen.cli import main
from shardgen.inputs import InputError, list_inputs
from shardgen.output import BuildError
from shardgen.tokenizer import TokenizerError, load_tokenizer
from tests.shardgen_testlib import (check_round_trip, expected_stream, jsonl_bytes, make_docs, read_dataset,
                                    tiny_tokenizer, write_jsonl, write_parquet)

__all__ = ["tiny_tokenizer"]
GOOD = make_docs(6, seed=5)


def build(tmp_path, inputs, tok, **kw):
    base = dict(seq_len=16, block_bytes=128, workers=1, progress=False, log=io.StringIO())
    base.update(kw)
    return run_build(BuildOptions(inputs=[str(i) for i in inputs], output=str(tmp_path / "out"), tokenizer=tok,
                                  **base))


def write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
    return path


BAD_LINES = [  # (line bytes, what the error must say)
    (b'{"text": "ok", broken\n', r"invalid JSON"),
    (b'{"body": "no text field"}\n', r"no field 'text'.*--text-key"),
    (b'{"text": 42}\n', r"field 'text' is int, not a string"),
    (b'{"text": null}\n', r"field 'text' is NoneType"),
    (b'["a", "list"]\n', r"a JSON list, not an object"),
    (b'{"text": "bad \xff\xfe utf8"}\n', r"invalid UTF-8"),
    (b'{"text": "half an emoji \\ud83d here"}\n', r"field 'text' holds a lone surrogate \(U\+D83D at character 14\)"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_jsonl_record_names_file_line_and_flag(tmp_path, tiny_tokenizer, line, message):
    path = write(str(tmp_path / "bad.jsonl"), jsonl_bytes(GOOD[:2]) + b"\n" + line + jsonl_bytes(GOOD[2:]))
    with pytest.raises(InputError, match=rf"bad\.jsonl:4: {message}.*--skip-bad"):
        build(tmp_path, [path], tiny_tokenizer)


def test_bad_line_number_in_a_split_jsonl(tmp_path, tiny_tokenizer):
    docs = make_docs(80, seed=6)
    data = jsonl_bytes(docs[:70]) + b"{oops\n" + jsonl_bytes(docs[70:])
    path = write(str(tmp_path / "big.jsonl"), data)
    with pytest.raises(InputError, match=r"big\.jsonl:71: invalid JSON"):
        build(tmp_path, [path], tiny_tokenizer, task_bytes=1024)  # line 71 lies in a later byte range


def test_skip_bad_counts_every_kind_and_keeps_the_good(tmp_path, tiny_tokenizer):
    d = tmp_path / "in"
    d.mkdir()
    lines = b"".join(line for line, _ in BAD_LINES)
    write(str(d / "a.jsonl"), jsonl_bytes(GOOD[:3]) + lines + jsonl_bytes(["", "  \n\t ", GOOD[3]]))
    write(str(d / "b.txt"), b"caf\xe9 latin-1, not UTF-8")
    write(str(d / "c.txt"), b"   \n")
    full = gzip.compress(jsonl_bytes(GOOD[4:]), mtime=0)
    write(str(d / "d.jsonl.gz"), full[:len(full) // 2])  # truncated gzip
    write(str(d / "e.jsonl.zst"), zstandard.ZstdCompressor().compress(jsonl_bytes(GOOD))[:-9])  # truncated zstd
    write(str(d / "f.parquet"), b"PAR1 this is not a parquet file PAR1")
    write(str(d / "g.jsonl.gz"), b"not gzip at all")
    res = build(tmp_path, [d], tiny_tokenizer, skip_bad=True, task_bytes=1 << 20)
    m, _ = read_dataset(str(tmp_path / "out"))
    assert m.stats["bad_records"] == len(BAD_LINES) + 1  # + the latin-1 .txt
    assert m.stats["bad_files"] == 4
    assert m.stats["empty_documents"] == 3
    assert m.stats["documents"] >= 4 and res.tasks == 1


@pytest.mark.parametrize("name,data,message", [
    ("t.jsonl.gz", lambda: gzip.compress(jsonl_bytes(GOOD), mtime=0)[:-20], r"damaged \.jsonl\.gz stream"),
    ("t.jsonl.gz", lambda: b"\x1f\x8b garbage", r"damaged \.jsonl\.gz stream"),
    ("t.jsonl.zst", lambda: zstandard.ZstdCompressor().compress(jsonl_bytes(GOOD))[:-9], r"truncated"),
    ("t.jsonl.zst", lambda: b"not zstd", r"damaged \.jsonl\.zst stream"),
    ("t.parquet", lambda: b"PAR1 junk PAR1", r"not a readable parquet file"),
    ("t.txt", lambda: b"line one\nline two \xc3\x28", r"t\.txt:2: invalid UTF-8"),
])
def test_damaged_files_are_named(tmp_path, tiny_tokenizer, name, data, message):
    path = write(str(tmp_path / name), data())
    with pytest.raises(InputError, match=rf"{message}.*--skip-bad"):
        build(tmp_path, [path], tiny_tokenizer)


def test_parquet_column_checks(tmp_path, tiny_tokenizer):
    p = write_parquet(str(tmp_path / "p.parquet"), GOOD, key="body")
    with pytest.raises(InputError, match=r"p\.parquet: no column 'text' \(columns: body, n\).*--text-key"):
        build(tmp_path, [p], tiny_tokenizer)
    build(tmp_path, [p], tiny_tokenizer, text_key="body")
    check_round_trip(str(tmp_path / "out"), expected_stream(tiny_tokenizer, GOOD))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": [1, 2]}), str(tmp_path / "q.parquet"))
    with pytest.raises(InputError, match=r"q\.parquet: column 'text' is int64, not a string column"):
        build(tmp_path, [tmp_path / "q.parquet"], tiny_tokenizer, overwrite=True)
    write_parquet(str(tmp_path / "n.parquet"), ["good one", None, "good two"], row_group_size=2)
    with pytest.raises(InputError, match=r"n\.parquet: row group 0 row 1: 'text' is null.*--skip-bad"):
        build(tmp_path, [tmp_path / "n.parquet"], tiny_tokenizer, overwrite=True)


def test_text_key_for_jsonl(tmp_path, tiny_tokenizer):
    p = write_jsonl(str(tmp_path / "k.jsonl"), GOOD, key="content")
    build(tmp_path, [p], tiny_tokenizer, text_key="content")
    check_round_trip(str(tmp_path / "out"), expected_stream(tiny_tokenizer, GOOD))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path, tiny_tokenizer):
    p = write_jsonl(str(tmp_path / "locked.jsonl"), GOOD)
    os.chmod(p, 0)
    with pytest.raises(InputError, match=r"locked\.jsonl: cannot read"):
        build(tmp_path, [p], tiny_tokenizer)


def test_listing_missing_globs_and_ignored(tmp_path):
    with pytest.raises(InputError, match=r"nope: no such file or directory"):
        list_inputs([str(tmp_path / "nope")])
    write(str(tmp_path / "b.jsonl"), b"")
    write(str(tmp_path / "a.txt"), b"x")
    write(str(tmp_path / "notes.md"), b"x")
    write(str(tmp_path / ".hidden.txt"), b"x")
    os.mkdir(tmp_path / "sub")
    write(str(tmp_path / "sub" / "c.jsonl.zst"), b"")
    files, ignored = list_inputs([str(tmp_path)])
    assert [os.path.relpath(f.url, tmp_path) for f in files] == ["a.txt", "b.jsonl", "sub/c.jsonl.zst"]
    assert [os.path.basename(i) for i in ignored] == ["notes.md"]  # hidden files: silently
    files, _ = list_inputs([str(tmp_path / "*.txt"), str(tmp_path / "a.txt"), str(tmp_path / "**" / "*.zst")])
    assert [os.path.basename(f.url) for f in files] == ["a.txt", "c.jsonl.zst"]  # a.txt once
    with pytest.raises(InputError, match=r"notes\.md: unknown input type"):
        list_inputs([str(tmp_path / "notes.md")])
    with pytest.raises(InputError, match=r"matches no files"):
        list_inputs([str(tmp_path / "*.parquet")])


def test_cli_reports_errors_with_exit_status(tmp_path, tiny_tokenizer, capsys):
    rc = main([str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o"), "--tokenizer", tiny_tokenizer])
    assert rc == 1 and "missing.jsonl: no such file or directory" in capsys.readouterr().err


def test_tokenizer_choices(tmp_path, tiny_tokenizer):
    info = load_tokenizer(tiny_tokenizer)
    assert (info.eos_token, info.eos_id, info.bos_id, info.dtype) == ("<|endoftext|>", 0, None, "uint16")
    assert load_tokenizer(os.path.join(tiny_tokenizer, "tokenizer.json")).sha256 == info.sha256
    with pytest.raises(TokenizerError, match=r"--eos-token '<nope>' is not in the vocabulary"):
        load_tokenizer(tiny_tokenizer, eos_token="<nope>")
    with pytest.raises(TokenizerError, match=r"no BOS token found.*--bos-token"):
        load_tokenizer(tiny_tokenizer, add_bos=True)
    with pytest.raises(TokenizerError, match=r"has no tokenizer.json.*train-tokenizer"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(TokenizerError, match=r"no such tokenizer.json"):
        load_tokenizer(str(tmp_path / "x" / "y" / "z"))


def test_train_tokenizer_max_bytes_counts_bytes(tmp_path, monkeypatch):
    import shardgen.tokenizer
    docs = ["日本語のテキスト" * 10] * 10  # 80 characters, 240 UTF-8 bytes each
    write_jsonl(str(tmp_path / "cjk.jsonl"), docs)
    seen = []
    monkeypatch.setattr(shardgen.tokenizer, "train_bpe", lambda texts, *a, **k: seen.extend(texts))
    shardgen.tokenizer.train_tokenizer([str(tmp_path / "cjk.jsonl")], str(tmp_path / "tok"), 300, max_bytes=480)
    assert len(seen) == 2  # 2 x 240 bytes; counting characters took 6


def test_a_broken_tokenizer_config_is_named(tmp_path, tiny_tokenizer):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(open(os.path.join(tiny_tokenizer, "tokenizer.json"), "rb").read())
    (d / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not valid JSON.*fix or remove it"):
        load_tokenizer(str(d))
    (d / "tokenizer_config.json").write_text('["eos"]')
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not a JSON object"):
        load_tokenizer(str(d))


def test_hub_name_fails_clearly_without_the_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TokenizerError, match=r"some-org/some-tokenizer: .*hub could not provide it"):
        load_tokenizer("some-org/some-tokenizer")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd")
def test_reading_inputs_leaves_no_file_open(tmp_path):
    # A worker reads every file of its tasks: one descriptor kept per file ran it out of descriptors
    # ("Too many open files") on inputs of a few thousand files.
    from shardgen.inputs import pieces_of
    from shardgen.readers import DocumentReader
    write_jsonl(str(tmp_path / "a.jsonl"), GOOD)
    write_jsonl(str(tmp_path / "b.jsonl.zst"), GOOD)
    write(str(tmp_path / "c.txt"), b"one document")
    write_parquet(str(tmp_path / "d.parquet"), GOOD)
    write_parquet(str(tmp_path / "e.parquet"), GOOD, key="body")  # refused: no 'text' column
    write(str(tmp_path / "f.parquet"), b"PAR1 junk PAR1")
    files, _ = list_inputs([str(tmp_path)])
    before = len(os.listdir("/proc/self/fd"))
    for f in files:
        for piece in pieces_of(f, 100):
            try:
                list(DocumentReader(piece, skip_bad=True))
            except InputError:
                pass
    assert len(os.listdir("/proc/self/fd")) == before


def test_skip_bad_does_not_reread_the_file_for_line_numbers(tmp_path, monkeypatch):
    # In a byte range after the first, a line number means counting lines from the file's start: only
    # an error needs one. With --skip-bad each bad record reread the file up to it (quadratic).
    import shardgen.readers as readers
    from shardgen.inputs import Piece
    docs = make_docs(40, seed=7)
    data = jsonl_bytes(docs[:20]) + b"{oops\n" * 5 + jsonl_bytes(docs[20:])
    path = write(str(tmp_path / "big.jsonl"), data)
    start = len(jsonl_bytes(docs[:10]))
    piece = Piece(path, ".jsonl", start, len(data), len(data) - start)
    opened = []
    real_open = readers.open_input
    monkeypatch.setattr(readers, "open_input", lambda url: opened.append(url) or real_open(url))
    reader = readers.DocumentReader(piece, skip_bad=True)
    assert list(reader) == docs[10:] and reader.counts.bad_records == 5
    assert len(opened) == 1
    monkeypatch.setattr(readers, "READ_BUFFER", 7)  # the line count reads the file in pieces
    with pytest.raises(InputError, match=r"big\.jsonl:21: invalid JSON"):
        list(readers.DocumentReader(piece))


def test_an_s3_glob_picks_the_files_a_local_glob_picks(tmp_path, monkeypatch):
    # fnmatch lets * cross '/': s3://b/data/*.jsonl took data/old/*.jsonl too, and hidden files.
    import shardgen.inputs
    names = ["a.jsonl", "b.txt", "old/c.jsonl", "old/deep/d.jsonl", ".hidden.jsonl", ".git/e.jsonl",
             "sub.jsonl/f.jsonl"]
    for n in names:
        os.makedirs(os.path.dirname(tmp_path / n), exist_ok=True)
        write(str(tmp_path / n), b"{}\n")

    class Bucket:  # the listing an object store gives for the same tree
        def __init__(self, url):
            self.prefix = url[len("s3://b"):].strip("/")

        def list_sizes(self, prefix=""):
            full = f"{self.prefix}/{prefix}" if self.prefix else prefix
            return sorted((n[len(self.prefix):].lstrip("/"), 3) for n in names if n.startswith(full))

    monkeypatch.setattr(shardgen.inputs, "open_storage", Bucket)
    for pattern in ("*.jsonl", "*", "**/*.jsonl", "old/**", "o*/*.jsonl", "**/d.jsonl", "?.txt"):
        local = sorted(os.path.relpath(p, tmp_path) for p in glob.glob(str(tmp_path / pattern), recursive=True)
                       if os.path.isfile(p))
        s3 = sorted(u[len("s3://b/"):] for u, _ in shardgen.inputs._list_one(f"s3://b/{pattern}"))
        assert s3 == local, pattern


def test_a_byte_order_mark_is_dropped_in_txt_as_in_jsonl(tmp_path, tiny_tokenizer):
    from shardgen.inputs import pieces_of
    from shardgen.readers import DocumentReader
    bom = b"\xef\xbb\xbf"
    txt = write(tmp_path / "a.txt", bom + "héllo wörld".encode())
    jl = write(tmp_path / "b.jsonl", bom + b'{"text": "h\\u00e9llo w\\u00f6rld"}\n')
    plain = write(tmp_path / "c.txt", "héllo wörld".encode())
    files, _ = list_inputs([str(txt), str(jl), str(plain)])
    docs = [d for f in files for p in pieces_of(f, 1 << 20) for d in DocumentReader(p)]
    assert docs == ["héllo wörld"] * 3


def test_a_dataset_of_no_sequence_gets_no_manifest_and_says_why(tmp_path, tiny_tokenizer):
    # a new user's trial: --seq-len above the corpus' tokens wrote a dataset of 0 sequences with exit 0
    path = write_jsonl(str(tmp_path / "small.jsonl"), GOOD)
    with pytest.raises(BuildError, match=r"no sequence, so no manifest was written: its 6 documents gave \d+ tokens, "
                                         r"every one in a task's tail shorter than --seq-len 100000.*--overwrite"):
        build(tmp_path, [path], tiny_tokenizer, seq_len=100000)
    assert not os.path.exists(tmp_path / "out" / "manifest.json")
    bad = write(str(tmp_path / "bad.jsonl"), b'{"body": 1}\n{"body": 2}\n')
    with pytest.raises(BuildError, match=r"no document in the input: 0 empty, 2 bad records and 0 bad files skipped"):
        build(tmp_path, [bad], tiny_tokenizer, skip_bad=True, overwrite=True)
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def test_dropping_much_of_the_corpus_as_task_tails_is_warned_about(tmp_path, tiny_tokenizer):
    path = write_jsonl(str(tmp_path / "docs.jsonl"), make_docs(40, seed=3))
    quiet, loud = io.StringIO(), io.StringIO()
    build(tmp_path, [path], tiny_tokenizer, log=quiet)  # one task, one tail of < 16 tokens
    assert "dropped as task tails" not in quiet.getvalue()
    build(tmp_path, [path], tiny_tokenizer, seq_len=512, task_bytes=256, log=loud, overwrite=True)
    assert re.search(r"warning: \d+% of the tokens were dropped as task tails .*--task-bytes", loud.getvalue())
