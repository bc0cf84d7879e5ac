"""Rank start-up at internet scale: manifest, resume fingerprint, plan, first batch located.

Builds synthetic datasets shaped like a real one (seq 2048, uint16, blocks of 64 rows = 256 KiB raw,
4,096 blocks per shard; every 8th shard ends a task with a shorter last block) at 100B, 1T and 10T
tokens. Shards are sparse files and every shard's block index is a hard link to one file: only the
start-up is measured, no block is decoded. Each row runs in a fresh process that does what a rank
does before its first batch: read the manifest, compute the resume fingerprint, build the plan, ask
for the last rank's rows at a step in epoch 3 (world 1024), and locate those blocks (offset, length,
CRC: the block index entries). It reports the time of each stage, peak RSS and the bytes it read.

    python bench/scale_bench.py --dir /tmp/scale --sizes 100B,1T,10T [--format 1|2]

`--format 1` writes the old manifest (every block's offset, length, rows, CRC in manifest.json);
`--format 2` the per-shard summaries and side index files. The 10T format-1 row needs ~30 GB of RSS
(more than the CPU box has) and is skipped there unless --force.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SEQ_LEN, BLOCK_ROWS, BLOCKS_PER_SHARD = 2048, 64, 4096
SHARD_TOKENS = SEQ_LEN * BLOCK_ROWS * BLOCKS_PER_SHARD
SIZES = {"100B": 100 * 10**9, "1T": 10**12, "10T": 10**13}
WORLD, GLOBAL_BATCH, SEED = 1024, 4096, 1234


def shard_layout(i: int):
    """(block lengths, rows, crc32s) of synthetic shard i: zstd-like lengths, full blocks but the last
    of every 8th shard. Deterministic, so every run builds the same dataset."""
    import numpy as np
    rng = np.random.default_rng(i)
    lengths = rng.integers(90_000, 140_000, BLOCKS_PER_SHARD)
    rows = np.full(BLOCKS_PER_SHARD, BLOCK_ROWS)
    if i % 8 == 7:
        rows[-1] = 1 + i % BLOCK_ROWS
    crcs = rng.integers(0, 2**32, BLOCKS_PER_SHARD)
    return lengths, rows, crcs


def tar_offsets(lengths):
    """Offsets of member data in a ustar tar: a 512-byte header before each, data padded to 512."""
    import numpy as np
    padded = -(-lengths // 512) * 512 + 512
    offsets = 512 + np.concatenate([[0], np.cumsum(padded)[:-1]])
    size = int(offsets[-1] + padded[-1] - 512 + 1024)
    return offsets, -(-size // 10240) * 10240


def build(path: str, tokens: int, fmt: int) -> None:
    import numpy as np
    from shards import format as F
    n_shards = tokens // SHARD_TOKENS
    os.makedirs(path, exist_ok=True)
    shards = []
    for i in range(n_shards):
        name = f"{i // 4:05d}-{i % 4:03d}.tar"
        if fmt == 1:
            lengths, rows, crcs = shard_layout(i)
            offsets, size = tar_offsets(lengths)
            blocks = [F.Block(int(o), int(n), int(r), int(c)) for o, n, r, c in zip(offsets, lengths, rows, crcs)]
            shards.append(F.ShardInfo(name=name, sequences=int(rows.sum()), tokens=int(rows.sum()) * SEQ_LEN,
                                      documents=int(rows.sum()) * 3, bytes=size, sha256=f"{i:064x}",
                                      blocks=blocks))
        else:
            shards.append(_v2_shard(path, i, name))
            size = shards[-1].bytes
        with open(os.path.join(path, name), "wb") as f:  # sparse: no data blocks on disk
            f.truncate(size)
    m = F.Manifest(seq_len=SEQ_LEN, dtype="uint16", eos_id=0, bos_id=None,
                   tokenizer={"source": "synthetic", "sha256": "0" * 64, "vocab_size": 32000},
                   shards=shards, settings={"seq_len": SEQ_LEN, "block_rows": BLOCK_ROWS}, stats={})
    with open(os.path.join(path, F.MANIFEST_NAME), "wb") as f:
        f.write(m.to_bytes())


def _v2_shard(path: str, i: int, name: str):
    raise SystemExit("format 2 is not in this version of shards/format.py")


class CountingStorage:
    """Counts what a LocalStorage reads (calls and bytes)."""

    def __init__(self, root: str):
        from shards.storage import LocalStorage

        class Counting(LocalStorage):
            reads = bytes_read = 0

            def read(self, name):
                data = super().read(name)
                Counting.reads += 1
                Counting.bytes_read += len(data)
                return data

            def read_range(self, name, offset, length):
                data = super().read_range(name, offset, length)
                Counting.reads += 1
                Counting.bytes_read += len(data)
                return data
        self.storage, self.counts = Counting(root), Counting


def measure(path: str) -> dict:
    """One rank's start-up, timed stage by stage (run in a fresh process)."""
    import resource

    import numpy as np
    from shards.format import read_manifest
    from trainer.data.fetch import BlockIndex
    from trainer.data.loader import plan_for
    out, t0 = {}, time.perf_counter()
    cs = CountingStorage(path)
    t = time.perf_counter()
    m = read_manifest(cs.storage)
    out["read_manifest_s"] = time.perf_counter() - t
    t = time.perf_counter()
    out["fingerprint"] = m.content_hash()[:12]
    out["fingerprint_s"] = time.perf_counter() - t
    t = time.perf_counter()
    plan = plan_for(m, seed=SEED, global_batch=GLOBAL_BATCH, layout=None, name=path)
    out["plan_s"] = time.perf_counter() - t
    step = 3 * plan.steps_per_epoch + plan.steps_per_epoch // 2
    t = time.perf_counter()
    rows = plan.step_rows(step, WORLD, WORLD - 1)
    out["step_rows_s"] = time.perf_counter() - t
    t = time.perf_counter()
    index = _block_index(BlockIndex, m, cs.storage)
    located = [_locate(index, int(b)) for b in np.unique(rows.blocks)]
    out["locate_s"] = time.perf_counter() - t
    out["startup_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["reads"], out["bytes_read"] = cs.counts.reads, cs.counts.bytes_read
    out["blocks_located"] = len(located)
    out["first_block"] = list(located[0])
    out["sequences"] = [list(map(int, x)) for x in zip(*plan.sequences(rows.blocks, rows.rows))][:2]
    return out


def _block_index(cls, manifest, storage):
    try:
        return cls(manifest, storage)  # format 2: reads each shard's index on first use
    except TypeError:
        return cls(manifest)  # format 1: every block's entry from the manifest


def _locate(index, block_id: int):
    if hasattr(index, "block"):
        i, j, blk = index.block(block_id)
    else:
        i, j, blk = index.refs[block_id]
    return i, j, blk.offset, blk.length, blk.crc32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/scale_bench")
    ap.add_argument("--sizes", default="100B,1T,10T")
    ap.add_argument("--format", type=int, default=2, choices=(1, 2))
    ap.add_argument("--force", action="store_true", help="run the 10T format-1 row even so")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure)))
        return 0
    print(f"| dataset | format | shards | blocks | manifest.json | read_manifest | fingerprint | plan | "
          f"first step_rows | first batch located | start-up | peak RSS | read at start |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in a.sizes.split(","):
        tokens = SIZES[size]
        shards = tokens // SHARD_TOKENS
        if a.format == 1 and size == "10T" and not a.force:
            print(f"| {size} tokens | 1 | {shards:,} | {shards * BLOCKS_PER_SHARD:,} | skipped: needs ~30 GB RSS |")
            continue
        path = os.path.join(a.dir, f"v{a.format}-{size}")
        if not os.path.exists(os.path.join(path, "manifest.json")):
            t = time.perf_counter()
            build(path, tokens, a.format)
            print(f"(built {path} in {time.perf_counter() - t:.1f} s)", file=sys.stderr)
        proc = subprocess.run([sys.executable, __file__, "--measure", path], capture_output=True, text=True)
        if proc.returncode:
            print(f"| {size} tokens | {a.format} | failed: {proc.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(proc.stdout)
        mb = os.path.getsize(os.path.join(path, "manifest.json")) / 1e6
        print(f"| {size} tokens | {a.format} | {shards:,} | {shards * BLOCKS_PER_SHARD:,} | {mb:,.1f} MB | "
              f"{r['read_manifest_s']:.2f} s | {r['fingerprint_s']:.2f} s | {r['plan_s']:.2f} s | "
              f"{r['step_rows_s']:.2f} s | {r['locate_s']:.3f} s | **{r['startup_s']:.2f} s** | "
              f"{r['peak_rss_mb']:,.0f} MB | {r['bytes_read'] / 1e6:,.2f} MB in {r['reads']} reads |", flush=True)
        print(json.dumps({"size": size, "format": a.format, **r}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
