"""Test helpers for the data side: random manifests for hypothesis, real datasets on disk, a storage that
records its reads."""
from __future__ import annotations

import os

import numpy as np
from hypothesis import strategies as st

from shards.format import Manifest, ShardWriter, index_name
from shards.storage import LocalStorage, Storage
from trainer.data.plan import divisors

EOS, BOS = 1, 2

block_rows = st.lists(st.lists(st.integers(1, 12), min_size=1, max_size=6), min_size=1, max_size=6)
seeds = st.integers(0, 2**64 - 1)


@st.composite
def plans(draw, min_sequences=1):
    """A random manifest with a valid (G, C): C | G and at least one step per epoch."""
    rows = draw(block_rows)
    n = sum(map(sum, rows))
    if n < min_sequences:
        rows.append([min_sequences - n])
        n = min_sequences
    g = draw(st.integers(1, n))
    c = draw(st.sampled_from(divisors(g)))
    if (n // c) // (g // c) == 0:  # layout leaves streams shorter than one step: take C = G
        c = g
    return rows, draw(seeds), g, c


def write_dataset(root, shard_blocks, seq_len=16, seed=0, eos_every=5, bos=None):
    """Shards of random tokens (EOS about every `eos_every` tokens); returns {(shard, seq): row}."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    shards, rows_of = [], {}
    for i, blocks in enumerate(shard_blocks):
        name = f"{i:05d}.tar"
        with open(os.path.join(root, name), "wb") as f:
            w = ShardWriter(f, name, seq_len, "uint16")
            for n in blocks:
                rows = rng.integers(3, 1000, size=(n, seq_len)).astype(np.uint16)
                rows[rng.random(rows.shape) < 1 / eos_every] = EOS
                if bos is not None:
                    rows[rng.random(rows.shape) < 1 / eos_every] = bos
                for j, r in enumerate(rows):
                    rows_of[(i, w.sequences + j)] = r  # w.sequences: rows of this shard written so far
                w.add_block(rows, EOS)
            shards.append(w.close())
        with open(os.path.join(root, index_name(name)), "wb") as f:
            f.write(w.index_bytes)
    m = Manifest(seq_len=seq_len, dtype="uint16", eos_id=EOS, bos_id=bos,
                 tokenizer={"source": "test", "sha256": "0", "vocab_size": 1000}, shards=shards)
    LocalStorage(root).put_bytes("manifest.json", m.to_bytes())
    return rows_of


class CountingStorage(Storage):
    """A real LocalStorage, with every read_range recorded."""

    def __init__(self, root):
        self.inner = LocalStorage(root)
        self.url = self.inner.url
        self.reads = []

    def exists(self, name):
        return self.inner.exists(name)

    def read(self, name):
        return self.inner.read(name)

    def read_range(self, name, offset, length):
        self.reads.append((name, offset))
        return self.inner.read_range(name, offset, length)

    def close(self):
        self.inner.close()


def take(loader, start, n):
    it = loader.iter_batches(start)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()
