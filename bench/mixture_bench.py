"""A 4-source mixture vs one source over the same data: loader throughput, time to first batch deep in
training, and bytes fetched per byte used per source from S3 (a local SeaweedFS server this script starts
and always stops).

    python bench/mixture_bench.py [--tokens 100000000] [--seq-len 2048] [--global-batch 64] [--repeat 5]

Data: loader_bench's synthetic shards (Zipf uint16 tokens, 256 KiB blocks, zstd 3), written once in
small shards; the 4 sources are 4 disjoint sets of those shards in the ratio 4:3:2:1 (hard links, a
manifest each), mixed with weights 0.4/0.3/0.2/0.1, so both cases read the same bytes at the same rate.

- tokens/s: TokenLoader on one rank over one epoch of the data (timed after the first batch); one source and the mixture
  alternate, --repeat times each, best kept (the machine may be shared).
- first batch: constructing the loader (manifests, plans) to its first batch, at step 0 and at step
  10**6, the mixture, each in a fresh process, best of --repeat.
- S3: the 4 sources uploaded to the server; the mixture from S3 for one epoch; per source the
  compressed bytes read over the compressed bytes of the rows its batches used (1.0: each byte read
  was used; a little above 1 for the blocks the last steps leave half used).
Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from loader_bench import memory, write_shards  # noqa: E402  (the same synthetic data)

NAMES, WEIGHTS, PARTS = ["a", "b", "c", "d"], [0.4, 0.3, 0.2, 0.1], [4, 3, 2, 1]
BUCKET = "bench"


def split_sources(whole: str, out: str) -> list[str]:
    """Four datasets made of disjoint shards of `whole` in the ratio 4:3:2:1 (hard links + a manifest)."""
    from shards.format import Manifest, index_name, read_manifest
    from shards.storage import LocalStorage
    m = read_manifest(LocalStorage(whole))
    n = len(m.shards) // sum(PARTS) * sum(PARTS)
    if n < sum(PARTS):
        raise SystemExit(f"{whole}: {len(m.shards)} shards, too few to split 4:3:2:1; use more --tokens")
    roots, lo = [], 0
    for name, part in zip(NAMES, PARTS):
        root = os.path.join(out, name)
        shards = m.shards[lo:lo + n * part // sum(PARTS)]
        lo += len(shards)
        os.makedirs(root, exist_ok=True)
        for s in shards:
            for f in (s.name, index_name(s.name)):
                if os.path.exists(os.path.join(whole, f)) and not os.path.exists(os.path.join(root, f)):
                    os.link(os.path.join(whole, f), os.path.join(root, f))
        sub = Manifest(seq_len=m.seq_len, dtype=m.dtype, eos_id=m.eos_id, bos_id=m.bos_id, tokenizer=m.tokenizer,
                       shards=shards, settings=m.settings, format_version=m.format_version)
        LocalStorage(root).put_bytes("manifest.json", sub.to_bytes())
        roots.append(root)
    return roots


def sources(roots):
    from trainer.data import Source
    return [Source(n, r, w) for n, r, w in zip(NAMES, roots, WEIGHTS)]


def used_by_source(ld, batch, used: list[float]) -> None:
    """Add each row's share of its block's compressed bytes to its source's total."""
    import numpy as np
    for src, (shard, seq) in zip(batch.sources, batch.sequences):
        table = ld.index.table(src, shard)
        j = int(np.searchsorted(np.cumsum(table["rows"]), seq, side="right"))
        used[src] += int(table["length"][j]) / int(table["rows"][j])


def run(shards, args, start_step=0, steps=None, measure_used=False) -> dict:
    import torch  # noqa: F401  (imported before timing, as the trainer has it)

    from trainer.data import TokenLoader
    t0 = time.perf_counter()
    ld = TokenLoader(shards, seed=1, global_batch=args.global_batch, prefetch_steps=args.prefetch_steps)
    steps = args.steps if steps is None else steps
    if steps < 0:  # the rest of one epoch of all the data
        steps = sum(m.totals()["sequences"] for m in ld.manifests) // args.global_batch - 1
    it = ld.iter_batches(start_step)
    first = next(it)
    t1 = time.perf_counter()
    used = [0.0] * ld.num_sources
    if measure_used:
        used_by_source(ld, first, used)
    tokens = 0
    for _ in range(steps):
        b = next(it)
        tokens += b.input_ids.numel()
        if measure_used:
            used_by_source(ld, b, used)
    dt = time.perf_counter() - t1
    pipe = ld._pipelines[0]
    out = {"steps": steps + 1, "first_batch_s": t1 - t0, "tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt if dt else 0.0,
           "fetched_by_source": list(pipe.reader.bytes_by_source), "used_by_source": used,
           "peak_live_blocks": pipe.cache.slab.peak, "slot_bytes": pipe.cache.slab.slot_bytes,
           "sources": ld.num_sources}
    it.close()
    ld.close()
    out.update(memory())
    return out


def in_process(case: str, args, start_step=0, steps=None) -> dict:
    """One measurement in a fresh process (cold: no plan or block caches from an earlier case)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--dir", args.dir, "--global-batch",
           str(args.global_batch), "--prefetch-steps", str(args.prefetch_steps),
           "--steps", str((args.steps or -1) if steps is None else steps), "--start-step", str(start_step)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"case {case} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000_000)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--prefetch-steps", type=int, default=4)
    ap.add_argument("--steps", type=int, default=0,
                    help="steps timed after the first batch (default: the rest of one epoch of the data, so that "
                         "every block is decoded once; fewer steps time the bursts where all streams start blocks)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="data directory (default: .cache/mixture_bench/<tokens>-<seq-len>)")
    ap.add_argument("--no-s3", action="store_true", help="skip the S3 part")
    ap.add_argument("--s3-steps", type=int, default=0, help="steps read from S3 (default: one epoch of the data)")
    ap.add_argument("--case", choices=["one", "mix"], help=argparse.SUPPRESS)
    ap.add_argument("--start-step", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dir = args.dir or os.path.join(ROOT, ".cache", "mixture_bench", f"{args.tokens}-{args.seq_len}")
    whole = os.path.join(args.dir, "whole")
    if args.case:
        roots = [os.path.join(args.dir, "sources", n) for n in NAMES]
        print(json.dumps(run(whole if args.case == "one" else sources(roots), args, args.start_step)))
        return 0

    if not os.path.exists(os.path.join(whole, "manifest.json")):
        write_shards(whole, args.tokens, args.seq_len, blocks_per_shard=16)
    roots = split_sources(whole, os.path.join(args.dir, "sources"))
    # the one-source baseline over exactly the shards the sources hold
    from shards.format import Manifest, read_manifest
    from shards.storage import LocalStorage
    m, subs = read_manifest(LocalStorage(whole)), [read_manifest(LocalStorage(r)) for r in roots]
    used_names = {s.name for sub in subs for s in sub.shards}
    same = Manifest(seq_len=m.seq_len, dtype=m.dtype, eos_id=m.eos_id, bos_id=m.bos_id, tokenizer=m.tokenizer,
                    shards=[s for s in m.shards if s.name in used_names], settings=m.settings,
                    format_version=m.format_version)
    LocalStorage(whole).put_bytes("manifest.json", same.to_bytes())

    load_before = os.getloadavg()[0]
    one, mix = [], []
    for _ in range(args.repeat):  # alternate, so a busy spell hits both
        one.append(in_process("one", args))
        mix.append(in_process("mix", args))
    best_one = max(one, key=lambda r: r["tokens_per_s"])
    best_mix = max(mix, key=lambda r: r["tokens_per_s"])
    first0 = min((in_process("mix", args, 0, 0) for _ in range(args.repeat)), key=lambda r: r["first_batch_s"])
    first_deep = min((in_process("mix", args, 10**6, 0) for _ in range(args.repeat)),
                     key=lambda r: r["first_batch_s"])
    res = {"tokens": args.tokens, "seq_len": args.seq_len, "global_batch": args.global_batch,
           "prefetch_steps": args.prefetch_steps, "steps": best_mix["steps"], "cpus": os.cpu_count(),
           "one_tokens_per_s": best_one["tokens_per_s"], "mix_tokens_per_s": best_mix["tokens_per_s"],
           "mix_vs_one": best_mix["tokens_per_s"] / best_one["tokens_per_s"],
           "all_one_tokens_per_s": [r["tokens_per_s"] for r in one], "all_mix_tokens_per_s": [r["tokens_per_s"] for r in mix],
           "peak_live_blocks": {"one": best_one["peak_live_blocks"], "mix": best_mix["peak_live_blocks"]},
           "peak_rss": {"one": best_one["VmHWM"], "mix": best_mix["VmHWM"]},
           "first_batch_s_step0": first0["first_batch_s"], "first_batch_s_step1e6": first_deep["first_batch_s"]}
    if not args.no_s3:
        res["s3"] = s3_part(roots, args)
    res["load_average"] = [load_before, os.getloadavg()[0]]
    report(res)
    print(json.dumps(res))
    return 0


def s3_part(roots: list[str], args) -> dict:
    from shards.s3 import S3Storage
    from shards.s3server import AWS_VARS, LocalS3
    work = tempfile.mkdtemp(prefix="mixbench-")
    try:
        with LocalS3(os.path.join(work, "s3")) as server:
            for k in AWS_VARS:  # only this server, whatever the user's AWS setup says
                os.environ.pop(k, None)
            os.environ.update(server.env())
            os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
            server.create_bucket(BUCKET)
            urls = []
            for name, root in zip(NAMES, roots):
                st = S3Storage(f"s3://{BUCKET}/{name}")
                for f in sorted(os.listdir(root), key=lambda f: f == "manifest.json"):  # the manifest last
                    with open(os.path.join(root, f), "rb") as fh:
                        st.put_bytes(f, fh.read())
                st.close()
                urls.append(f"s3://{BUCKET}/{name}")
            r = run(sources(urls), args, steps=args.s3_steps - 1 if args.s3_steps else -1, measure_used=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"steps": r["steps"], "tokens_per_s": r["tokens_per_s"], "first_batch_s": r["first_batch_s"],
            "fetched_per_used": {n: f / u for n, f, u in zip(NAMES, r["fetched_by_source"], r["used_by_source"])},
            "fetched_bytes": dict(zip(NAMES, r["fetched_by_source"])), "used_bytes": dict(zip(NAMES, r["used_by_source"]))}


def report(r: dict) -> None:
    mib = 1 << 20
    print(f"\n{r['tokens'] / 1e6:.0f}M tokens, seq {r['seq_len']}, global batch {r['global_batch']}, "
          f"{r['steps']} steps (timed after the first); cpus {r['cpus']}, load average {r['load_average'][0]:.1f} -> "
          f"{r['load_average'][1]:.1f}")
    print(f"{'':40} {'Mtok/s':>8} {'peak RSS MiB':>13} {'peak blocks':>12}")
    for key, label in (("one", "one source (the same shards)"), ("mix", "4 sources, weights 0.4/0.3/0.2/0.1")):
        print(f"{label:40} {r[f'{key}_tokens_per_s'] / 1e6:8.1f} {r['peak_rss'][key] / mib:13.0f} "
              f"{r['peak_live_blocks'][key]:12d}")
    print(f"mixture / one source: {r['mix_vs_one']:.3f}")
    print(f"first batch of the mixture: step 0 {r['first_batch_s_step0'] * 1e3:.0f} ms, step 10**6 "
          f"{r['first_batch_s_step1e6'] * 1e3:.0f} ms")
    if "s3" in r:
        s3 = r["s3"]
        print(f"mixture from S3 (SeaweedFS, loopback), {s3['steps']} steps: {s3['tokens_per_s'] / 1e6:.1f} Mtok/s; "
              f"fetched/used per "
              f"source: " + ", ".join(f"{n} {v:.3f}" for n, v in s3["fetched_per_used"].items()))


if __name__ == "__main__":
    sys.exit(main())
