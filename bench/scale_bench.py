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
`--format 2` the per-shard summaries and side index files. `--code DIR` measures with the code of
another checkout (e.g. `git worktree add /tmp/before 2ac380b`, the commit before format 2). The 10T format-1 row needs ~30 GB of RSS
(more than the CPU box has) and is skipped there unless --force.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# the code measured: this checkout, or another one (--code: e.g. a worktree of the commit before format 2)
ROOT = os.environ.get("SCALE_BENCH_CODE") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SEQ_LEN, BLOCK_ROWS, BLOCKS_PER_SHARD = 2048, 64, 4096
SHARD_TOKENS = SEQ_LEN * BLOCK_ROWS * BLOCKS_PER_SHARD
SIZES = {"100B": 100 * 10**9, "1T": 10**12, "10T": 10**13}
WORLD, GLOBAL_BATCH, SEED = 1024, 4096, 1234


SHORT_LAST_ROWS = 37


def shard_layout(short: bool):
    """(block lengths, rows, crc32s) of a synthetic shard: zstd-like lengths, full blocks but the last
    when the shard ends a task (every 8th). Deterministic, and the same in both formats, so the plan,
    the sequences and the blocks located must come out the same before and after."""
    import numpy as np
    rng = np.random.default_rng(0)
    lengths = rng.integers(90_000, 140_000, BLOCKS_PER_SHARD)
    rows = np.full(BLOCKS_PER_SHARD, BLOCK_ROWS)
    rows[-1] = SHORT_LAST_ROWS if short else BLOCK_ROWS
    crcs = rng.integers(0, 2**32, BLOCKS_PER_SHARD)
    return lengths, rows, crcs


def tar_offsets(lengths):
    """Offsets of member data in a ustar tar: a 512-byte header before each, data padded to 512."""
    import numpy as np
    padded = -(-lengths // 512) * 512 + 512
    offsets = 512 + np.concatenate([[0], np.cumsum(padded)[:-1]])
    size = int(offsets[-1] + padded[-1] - 512 + 1024)
    return offsets, -(-size // 10240) * 10240


def layout_blocks(short: bool):
    from shards import format as F
    lengths, rows, crcs = shard_layout(short)
    offsets, size = tar_offsets(lengths)
    return [F.Block(int(o), int(n), int(r), int(c)) for o, n, r, c in zip(offsets, lengths, rows, crcs)], size


def build(path: str, tokens: int, fmt: int) -> None:
    """Format 1: every block in manifest.json. Format 2: summaries, and each shard's .blocks a hard
    link to one of two real index files (full last block or short)."""
    from shards import format as F
    n_shards = tokens // SHARD_TOKENS
    os.makedirs(path, exist_ok=True)
    layouts = {short: layout_blocks(short) for short in (False, True)}
    shards = []
    for i in range(n_shards):
        name = f"{i // 4:05d}-{i % 4:03d}.tar"
        short = i % 8 == 7
        blocks, size = layouts[short]
        rows = sum(b.rows for b in blocks)
        info = F.ShardInfo.from_blocks(name, rows * SEQ_LEN, rows * 3, size, f"{i:064x}", blocks,
                                       with_index=fmt == 2)
        if fmt == 2:
            real = os.path.join(path, f"_index_{int(short)}")
            if not os.path.exists(real):
                with open(real, "wb") as f:
                    f.write(F.encode_block_index(blocks))
            os.link(real, os.path.join(path, F.index_name(name)))
            info.blocks = None  # the summary only
        shards.append(info)
        with open(os.path.join(path, name), "wb") as f:  # sparse: no data blocks on disk
            f.truncate(size)
    m = F.Manifest(seq_len=SEQ_LEN, dtype="uint16", eos_id=0, bos_id=None,
                   tokenizer={"source": "synthetic", "sha256": "0" * 64, "vocab_size": 32000},
                   shards=shards, settings={"seq_len": SEQ_LEN, "block_rows": BLOCK_ROWS}, stats={},
                   format_version=fmt)
    with open(os.path.join(path, F.MANIFEST_NAME), "wb") as f:
        f.write(m.to_bytes())


def build_merge(path: str, shards: int, shards_per_task: int = 4) -> None:
    """An output as a multi-node build leaves it before `shardgen merge`: settings, tokenizer and one
    completion record per task (format 2: shard summaries)."""
    import hashlib

    from shardgen.output import SETTINGS_NAME, canonical_json, record_name
    from shardgen.readers import Counts
    from shards.format import TOKENIZER_NAME
    os.makedirs(os.path.join(path, "_tasks"), exist_ok=True)
    tok = b'{"synthetic": true}'
    with open(os.path.join(path, TOKENIZER_NAME), "wb") as f:
        f.write(tok)
    tasks = -(-shards // shards_per_task)
    doc = {"fingerprint": "f" * 64, "input_files": tasks, "tokenizer": {"sha256": hashlib.sha256(tok).hexdigest()},
           "settings": {"seq_len": SEQ_LEN, "dtype": "uint16", "eos_id": 0, "bos_id": None, "num_tasks": tasks}}
    with open(os.path.join(path, SETTINGS_NAME), "wb") as f:
        f.write(canonical_json(doc))
    for t in range(tasks):
        infos = []
        for k in range(min(shards_per_task, shards - t * shards_per_task)):
            i = t * shards_per_task + k
            last = SHORT_LAST_ROWS if k == shards_per_task - 1 else BLOCK_ROWS
            seqs = (BLOCKS_PER_SHARD - 1) * BLOCK_ROWS + last
            infos.append({"name": f"{t:05d}-{k:03d}.tar", "sequences": seqs, "tokens": seqs * SEQ_LEN,
                          "documents": seqs * 3, "bytes": 1 << 30, "sha256": f"{i:064x}", "blocks": BLOCKS_PER_SHARD,
                          "rows_per_block": BLOCK_ROWS, "last_block_rows": last, "varying_rows": None,
                          "index_crc32": i})
        rec = {"task": t, "fingerprint": doc["fingerprint"], "pieces": [], "shards": infos,
               "stats": Counts().to_json()}
        with open(os.path.join(path, record_name(t)), "wb") as f:
            f.write(canonical_json(rec))


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
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = ru.ru_utime + ru.ru_stime  # the process's CPU time, imports included: less load-dependent
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
        _, i, j, blk = index.block(block_id)
    else:
        i, j, blk = index.refs[block_id]
    return i, j, blk.offset, blk.length, blk.crc32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/scale_bench")
    ap.add_argument("--sizes", default="100B,1T,10T")
    ap.add_argument("--format", type=int, default=2, choices=(1, 2))
    ap.add_argument("--force", action="store_true", help="run the 10T format-1 row even so")
    ap.add_argument("--code", help="measure with the code of this checkout (the datasets are built with this one)")
    ap.add_argument("--merge", type=int, default=0, metavar="SHARDS",
                    help="instead: time `python -m shardgen merge` of this many shards' task records")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure)))
        return 0
    if a.merge:
        path = os.path.join(a.dir, f"merge-{a.merge}")
        if not os.path.exists(path):
            build_merge(path, a.merge)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "shardgen", "merge", path], capture_output=True, text=True,
                              cwd=ROOT)
        dt = time.perf_counter() - t
        print(proc.stdout.strip() or proc.stderr.strip())
        print(f"shardgen merge of {a.merge:,} shards ({-(-a.merge // 4):,} task records): {dt:.2f} s wall "
              f"(fresh process, imports included); manifest.json "
              f"{os.path.getsize(os.path.join(path, 'manifest.json')) / 1e6:.2f} MB")
        return proc.returncode
    print(f"| dataset | format | shards | blocks | manifest.json | read_manifest | fingerprint | plan | "
          f"first step_rows | first batch located | start-up | CPU | peak RSS | read at start |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
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
        env = {**os.environ, "SCALE_BENCH_CODE": os.path.abspath(a.code)} if a.code else None
        proc = subprocess.run([sys.executable, __file__, "--measure", path], capture_output=True, text=True, env=env)
        if proc.returncode:
            print(f"| {size} tokens | {a.format} | failed: {proc.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(proc.stdout)
        mb = os.path.getsize(os.path.join(path, "manifest.json")) / 1e6
        print(f"| {size} tokens | {a.format} | {shards:,} | {shards * BLOCKS_PER_SHARD:,} | {mb:,.1f} MB | "
              f"{r['read_manifest_s']:.2f} s | {r['fingerprint_s']:.2f} s | {r['plan_s']:.2f} s | "
              f"{r['step_rows_s']:.2f} s | {r['locate_s']:.3f} s | **{r['startup_s']:.2f} s** | {r['cpu_s']:.2f} s | "
              f"{r['peak_rss_mb']:,.0f} MB | {r['bytes_read'] / 1e6:,.2f} MB in {r['reads']} reads |", flush=True)
        print(json.dumps({"size": size, "format": a.format, **r}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
