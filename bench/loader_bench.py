"""Loader throughput: TokenLoader vs plain webdataset vs raw zstd decompression, on the same shards.

    python bench/loader_bench.py [--tokens 1000000000] [--seq-len 2048] [--global-batch 256]

Writes synthetic-but-realistic shards once (Zipf-distributed uint16 tokens over a 32000 vocabulary,
an EOS about every 600 tokens, 256 KiB blocks, zstd level 3: the shardgen defaults) under --dir,
then runs each case in its own subprocess so that peak RSS (VmHWM) is per case:

- raw:        zstandard decompression of every block's bytes, already in memory (the ceiling)
- webdataset: the shards read in order with webdataset.WebDataset + zstandard + numpy, rows
              batched G at a time into int64 torch tensors (what a plain pipeline would do)
- loader:     TokenLoader(global_batch=G) on one rank over one epoch, timed from the first request
              (the epoch's start, where all G streams begin at once, included; the rate after the
              first batch is printed too)
- first@0 / first@deep: time from constructing TokenLoader to its first batch, at step 0 and at a
              step a million epochs in (the middle of epoch 10**6)

Files are read from the page cache after the first pass (they were just written): this measures
the loader's CPU cost, not the disk. Prints a table and one JSON line.
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

VOCAB, EOS = 32000, 0


def memory() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def write_shards(root: str, tokens: int, seq_len: int, blocks_per_shard: int, block_bytes: int | None = None) -> None:
    import numpy as np

    from shards.format import Manifest, ShardWriter, index_name, rows_per_block
    from shards.progress import Progress
    from shards.storage import LocalStorage

    rng = np.random.default_rng(0)
    pool = (rng.zipf(1.2, size=1 << 23) % VOCAB).astype(np.uint16)
    pool[rng.random(pool.size) < 1 / 600] = EOS
    rows = rows_per_block(seq_len, "uint16", *([block_bytes] if block_bytes else []))
    n_blocks = max(1, tokens // (rows * seq_len))
    os.makedirs(root, exist_ok=True)
    shards, bar = [], Progress(n_blocks, "writing shards", unit="blocks")
    for s in range(-(-n_blocks // blocks_per_shard)):
        name = f"{s:05d}.tar"
        with open(os.path.join(root, name), "wb") as f:
            w = ShardWriter(f, name, seq_len, "uint16")
            for _ in range(min(blocks_per_shard, n_blocks - s * blocks_per_shard)):
                start = int(rng.integers(0, pool.size - rows * seq_len))
                w.add_block(pool[start:start + rows * seq_len].reshape(rows, seq_len), EOS)
                bar.update(1)
            shards.append(w.close())
        with open(os.path.join(root, index_name(name)), "wb") as f:
            f.write(w.index_bytes)
    bar.close()
    m = Manifest(seq_len=seq_len, dtype="uint16", eos_id=EOS, bos_id=None,
                 tokenizer={"source": "synthetic zipf(1.2)", "sha256": "", "vocab_size": VOCAB}, shards=shards,
                 settings={"bench": "loader_bench", "tokens": tokens, "seq_len": seq_len})
    LocalStorage(root).put_bytes("manifest.json", m.to_bytes())


# --- the cases (each runs in its own process)
def case_raw(args) -> dict:
    import zstandard

    from shards.format import read_blocks, read_manifest
    from shards.storage import LocalStorage

    st = LocalStorage(args.dir)
    m = read_manifest(st)
    frames = [st.read_range(s.name, b.offset, b.length) for s in m.shards for b in read_blocks(st, s)]
    st.close()
    before = memory()
    dctx = zstandard.ZstdDecompressor()
    t0 = time.perf_counter()
    raw = sum(len(dctx.decompress(f)) for f in frames)
    dt = time.perf_counter() - t0
    return {"tokens": raw // m.np_dtype.itemsize, "seconds": dt, "rss_before": before["VmRSS"]}


def case_webdataset(args) -> dict:
    import numpy as np
    import torch
    import webdataset
    import zstandard

    from shards.format import read_manifest
    from shards.storage import LocalStorage

    m = read_manifest(LocalStorage(args.dir))
    urls = [os.path.join(args.dir, s.name) for s in m.shards]
    before = memory()
    t0 = time.perf_counter()
    dctx, pending, tokens, batches = zstandard.ZstdDecompressor(), [], 0, 0
    for sample in webdataset.WebDataset(urls, shardshuffle=False):
        pending.append(np.frombuffer(dctx.decompress(sample["tokens.zst"]), "<u2").reshape(-1, m.seq_len))
        while sum(len(p) for p in pending) >= args.global_batch:
            rows = np.concatenate(pending)
            batch = torch.from_numpy(rows[:args.global_batch].astype(np.int64))
            pending = [rows[args.global_batch:]]
            tokens += batch.numel()
            batches += 1
    dt = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": dt, "steps": batches, "rss_before": before["VmRSS"]}


def case_loader(args) -> dict:
    import torch  # noqa: F401  (imported before measuring, as the trainer has it already)

    from trainer.data import TokenLoader

    t0 = time.perf_counter()
    ld = TokenLoader(args.dir, seed=0, global_batch=args.global_batch, prefetch_steps=args.prefetch_steps,
                     fetch_threads=args.threads)
    steps = min(args.steps or ld.steps_per_epoch, ld.steps_per_epoch)
    start = args.start_step if args.start_step >= 0 else ld.steps_per_epoch * 10**6 + ld.steps_per_epoch // 2
    before = memory()
    t1 = time.perf_counter()
    it = ld.iter_batches(start)
    first = next(it).input_ids.numel()
    t2 = time.perf_counter()
    t_first = t2 - t0  # construction (manifest, plan) included
    tokens = 0
    for _ in range(steps - 1):
        tokens += next(it).input_ids.numel()
    t3 = time.perf_counter()
    pipe = ld._pipelines[0]
    # "seconds": one epoch from the first request, so the epoch's start (all G/R streams begin at
    # once) is paid, as is the prefetch into the next epoch's start: conservative. "after_first":
    # the same run without the first batch (for long epochs the two agree).
    out = {"tokens": tokens + first, "seconds": t3 - t1, "after_first_tokens_per_s": tokens / (t3 - t2),
           "steps": steps, "start_step": start,
           "first_batch_s": t_first, "rss_before": before["VmRSS"], "blocks_read": pipe.reader.blocks_read,
           "peak_live_blocks": pipe.cache.slab.peak, "dataset_blocks": ld.index.num_blocks, "slot_bytes": pipe.cache.slab.slot_bytes,
           "batch_bytes": ld.local_batch * ld.manifest.seq_len * 10}
    it.close()
    ld.close()
    return out


CASES = {"raw": case_raw, "webdataset": case_webdataset, "loader": case_loader}


def run_case(args, name: str, **extra) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", name, "--dir", args.dir,
           "--global-batch", str(args.global_batch), "--prefetch-steps", str(args.prefetch_steps),
           "--threads", str(args.threads), "--steps", str(extra.get("steps", args.steps)),
           "--start-step", str(extra.get("start_step", 0))]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"case {name} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000_000,
                    help="dataset size; streams of many blocks each (L >> rows per block) are what training sees")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=256)
    ap.add_argument("--prefetch-steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=4, help="TokenLoader fetch threads (its default for local disk)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per throughput case; the best is reported")
    ap.add_argument("--steps", type=int, default=0, help="loader steps to time (default: one epoch)")
    ap.add_argument("--dir", default=None, help="shard directory (default: .cache/loader_bench/<tokens>)")
    ap.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--start-step", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        out = CASES[args.case](args)
        out.update(memory())
        print(json.dumps(out))
        return

    args.dir = args.dir or os.path.join(ROOT, ".cache", "loader_bench", f"{args.tokens}-{args.seq_len}")
    if not os.path.exists(os.path.join(args.dir, "manifest.json")):
        write_shards(args.dir, args.tokens, args.seq_len, blocks_per_shard=256)
    def best(name):  # the machine may be shared: keep each case's fastest run
        return max((run_case(args, name) for _ in range(args.repeat)), key=lambda r: r["tokens"] / r["seconds"])
    load_before = os.getloadavg()[0]
    raw, wds, loader = best("raw"), best("webdataset"), best("loader")
    def first_batch(start_step):  # fastest of --repeat cold starts, each in a fresh process
        return min((run_case(args, "loader", steps=1, start_step=start_step) for _ in range(args.repeat)),
                   key=lambda r: r["first_batch_s"])
    first0, first_deep = first_batch(0), first_batch(-1)

    def rate(r):
        return r["tokens"] / r["seconds"]
    mib = 1 << 20
    bound = loader["peak_live_blocks"] * loader["slot_bytes"] + (args.prefetch_steps + 1) * loader["batch_bytes"]
    rows = [("raw zstd decompress (in memory, 1 thread)", rate(raw), raw),
            ("webdataset + zstandard + numpy -> int64 batches", rate(wds), wds),
            (f"TokenLoader G={args.global_batch} prefetch={args.prefetch_steps} threads={args.threads}, 1 epoch",
             rate(loader), loader)]
    n_blocks = loader["dataset_blocks"]
    load_after = os.getloadavg()[0]
    print(f"\n{args.dir}: {raw['tokens'] / 1e6:.1f}M tokens in {n_blocks} blocks, seq {args.seq_len}; "
          f"cpus {os.cpu_count()}, load average {load_before:.1f} before, {load_after:.1f} after (best of "
          f"{args.repeat} runs per case)")
    print(f"{'case':58s} {'Mtok/s':>9s} {'peak RSS MiB':>13s} {'RSS growth MiB':>15s}")
    for name, r, res in rows:
        print(f"{name:58s} {r / 1e6:9.1f} {res['VmHWM'] / mib:13.0f} {(res['VmHWM'] - res['rss_before']) / mib:15.0f}")
    print(f"TokenLoader timed after its first batch (the epoch's start excluded): "
          f"{loader['after_first_tokens_per_s'] / 1e6:.1f} Mtok/s")
    print(f"first batch at step 0: {first0['first_batch_s'] * 1e3:.1f} ms, {first0['blocks_read']} blocks read; "
          f"at step {first_deep['start_step']}: {first_deep['first_batch_s'] * 1e3:.1f} ms, "
          f"{first_deep['blocks_read']} blocks read")
    print(f"loader: {loader['blocks_read']} block reads for one epoch of {n_blocks} blocks (each once, "
          f"plus the blocks of the next epoch's first {args.prefetch_steps} steps, prefetched)")
    print(f"loader: peak {loader['peak_live_blocks']} live blocks x {loader['slot_bytes'] / mib:.2f} MiB + "
          f"{args.prefetch_steps + 1} batches = {bound / mib:.0f} MiB expected")
    summary = {
        "tokens": raw["tokens"], "blocks": n_blocks, "seq_len": args.seq_len, "load_average": [load_before, load_after], "global_batch": args.global_batch,
        "prefetch_steps": args.prefetch_steps, "threads": args.threads, "cpus": os.cpu_count(),
        "raw_tokens_per_s": rate(raw), "webdataset_tokens_per_s": rate(wds), "loader_tokens_per_s": rate(loader),
        "loader_tokens_per_s_after_first_batch": loader["after_first_tokens_per_s"],
        "loader_vs_raw": rate(loader) / rate(raw), "loader_vs_webdataset": rate(loader) / rate(wds),
        "first_batch_s_step0": first0["first_batch_s"], "first_batch_s_deep": first_deep["first_batch_s"],
        "deep_step": first_deep["start_step"], "blocks_read_first_step0": first0["blocks_read"],
        "blocks_read_first_deep": first_deep["blocks_read"], "loader_blocks_read_epoch": loader["blocks_read"],
        "rss_peak": {"raw": raw["VmHWM"], "webdataset": wds["VmHWM"], "loader": loader["VmHWM"]},
        "loader_rss_growth": loader["VmHWM"] - loader["rss_before"], "loader_expected_bytes": bound,
        "targets": {"20M_tokens_per_s": rate(loader) >= 20e6, "ge_webdataset": rate(loader) >= rate(wds),
                    "ge_half_raw": rate(loader) >= 0.5 * rate(raw)},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
