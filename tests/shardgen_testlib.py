"""Helpers for the shardgen tests: a tiny trained tokenizer, input writers for every format, and an
independent decoder of a dataset (it uses only format.py, as any reader would)."""
from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import zstandard

from shards.format import decode_block, read_blocks, read_manifest
from shards.storage import LocalStorage
from shardgen.tokenizer import train_bpe

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = ("the king queen crown sword love death night day speak thou thee thy art hath doth my lord lady "
         "good sweet fair foul heaven earth fire water come go stay fly").split()
UNICODE_DOCS = [
    "日本語のテキストと中文文本",            # CJK
    "مرحبا بالعالم שלום עולם",              # RTL
    "family: 👩‍👩‍👧‍👦 flag: 🏳️‍🌈 ok",      # emoji ZWJ sequences
    "cafe\u0301 n\u0303 a\u0308\u0301",      # combining marks
    "nul\x00inside and\x00again",            # NUL
    "windows\r\nline\rendings\n\r\n",        # CR/LF
    "the separator text <|endoftext|> is not a separator",
]


def make_docs(n: int, seed: int = 0, long_every: int = 7) -> list[str]:
    """Deterministic documents: word salad of varied length, some far longer than a sequence."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        k = int(rng.integers(3, 40)) * (25 if i % long_every == 3 else 1)
        docs.append(" ".join(WORDS[j] for j in rng.integers(0, len(WORDS), k)) + ("." if i % 2 else "!"))
    return docs


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tok"))
    train_bpe(make_docs(200, seed=1) + UNICODE_DOCS * 3, vocab_size=400, output_dir=out)
    return out


def encoder(tok_dir: str):
    from shardgen.tokenizer import make_encoder
    with open(os.path.join(tok_dir, "tokenizer.json"), encoding="utf-8") as f:
        return make_encoder(f.read())


def expected_stream(tok_dir: str, docs: list[str], eos: int = 0, bos: int | None = None) -> list[int]:
    tok = encoder(tok_dir)
    out = []
    for d in docs:
        out += ([bos] if bos is not None else []) + tok.encode(d, add_special_tokens=False).ids + [eos]
    return out


# --- input writers (file names sort in the order the documents are given)
def write_txt(d, docs, prefix="doc"):
    os.makedirs(d, exist_ok=True)
    for i, doc in enumerate(docs):
        with open(os.path.join(d, f"{prefix}{i:04d}.txt"), "wb") as f:
            f.write(doc.encode("utf-8"))
    return d


def jsonl_bytes(docs, key="text") -> bytes:
    return b"".join(json.dumps({key: d, "id": i}).encode() + b"\n" for i, d in enumerate(docs))


def write_jsonl(path, docs, key="text"):
    data = jsonl_bytes(docs, key)
    if path.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif path.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    with open(path, "wb") as f:
        f.write(data)
    return path


def write_parquet(path, docs, key="text", row_group_size=5):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({key: docs, "n": list(range(len(docs)))}), path, row_group_size=row_group_size)
    return path


# --- reading a dataset back
def read_dataset(out: str):
    """(manifest, {shard name: flat token list}) decoded block by block through format.py."""
    storage = LocalStorage(out)
    m = read_manifest(storage)
    streams = {}
    for s in m.shards:
        rows = [decode_block(storage.read_range(s.name, b.offset, b.length), b, m, s.name)
                for b in read_blocks(storage, s)]
        streams[s.name] = np.concatenate(rows).reshape(-1).tolist()
    storage.close()
    return m, streams


def task_records(out: str) -> list[dict]:
    d = os.path.join(out, "_tasks")
    return [json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d)) if f[0].isdigit()]


def check_round_trip(out: str, expected: list[int]) -> None:
    """The shards, task by task, are the expected stream with each task's declared tail removed."""
    m, streams = read_dataset(out)
    pos = 0
    for rec in task_records(out):
        got = [t for s in rec["shards"] for t in streams[s["name"]]]
        assert got == expected[pos:pos + len(got)], f"task {rec['task']} differs from the input stream"
        assert rec["stats"]["dropped_tokens"] < m.seq_len
        pos += len(got) + rec["stats"]["dropped_tokens"]
    assert pos == len(expected), "the tasks do not cover the input stream exactly"
    assert m.stats["dropped_tokens"] == sum(r["stats"]["dropped_tokens"] for r in task_records(out))


def tree_bytes(out: str) -> dict[str, bytes]:
    """Every file under `out` (shards, manifest, tokenizer, task records) by relative path."""
    files = {}
    for dirpath, _, names in os.walk(out):
        for n in names:
            p = os.path.join(dirpath, n)
            files[os.path.relpath(p, out)] = open(p, "rb").read()
    return files


SEQ = 16


def build_options(inputs, out, tok, **kw):
    """BuildOptions for the tests' tiny datasets: short sequences, tiny blocks and tasks, one worker."""
    import io

    from shardgen.build import BuildOptions
    base = dict(seq_len=SEQ, block_bytes=128, task_bytes=1500, workers=1, progress=False, log=io.StringIO())
    base.update(kw)
    return BuildOptions(inputs=list(inputs), output=str(out), tokenizer=tok, **base)
