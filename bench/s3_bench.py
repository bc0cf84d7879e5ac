"""S3 vs local disk, against a local SeaweedFS server that this script starts (and always stops).

    python bench/s3_bench.py [--tokens 50000000] [--seq-len 2048] [--global-batch 64] [--shardgen-mb 32]

Loader: the same shards (loader_bench's synthetic Zipf tokens, shardgen's default 256 KiB blocks)
in a local directory and in a bucket; TokenLoader on one rank over --steps steps (default: one
epoch) from each. Reported per backend: tokens/s after the first batch, first-batch latency, HTTP
requests per 1M tokens (botocore's own retries included), and bytes fetched per byte used (the
compressed bytes read, over the compressed bytes of the sequences the batches contain: 1.0 means
no read amplification; above 1 only for blocks a partial epoch leaves half used).
Upload: put_file of every shard (multipart above 16 MiB, SHA-256 checked by the server and verified).
shardgen: `run_build` on the same jsonl corpus (the Shakespeare texts repeated to --shardgen-mb) with
output to a local directory, to S3, and with both input and output in S3.

Everything runs on one machine: the server reads its volume files from the page cache and the
network is loopback, so S3 numbers measure protocol + client cost, not a real network.
Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from loader_bench import write_shards  # noqa: E402  (the loader bench's shards: same data, comparable)
from shardgen_bench import make_corpus  # noqa: E402

BUCKET = "bench"


def upload_dataset(local: str, url: str) -> dict:
    from shards.s3 import S3Storage
    st = S3Storage(url)
    names = sorted(n for n in os.listdir(local) if n != "manifest.json")
    total, t0 = 0, time.perf_counter()
    for name in names + ["manifest.json"]:
        staged = os.path.join(st.staging_dir(), name)
        shutil.copyfile(os.path.join(local, name), staged)
        total += os.path.getsize(staged)
        st.put_file(name, staged)
    dt = time.perf_counter() - t0
    st.close()
    return {"bytes": total, "seconds": dt, "MiB_per_s": total / dt / 2**20}


def used_bytes(index, sequences) -> float:
    """Compressed bytes of the given (shard, sequence-in-shard) rows: each row's share of its block
    (`index`: the loader's BlockIndex, whose block tables are read already)."""
    import numpy as np
    total = 0.0
    for shard, seq in sequences:
        table = index.table(0, shard)
        j = int(np.searchsorted(np.cumsum(table["rows"]), seq, side="right"))
        total += int(table["length"][j]) / int(table["rows"][j])
    return total


def run_loader(shards: str, args) -> dict:
    from shards.s3 import S3Storage
    from trainer.data import TokenLoader

    t0 = time.perf_counter()
    loader = TokenLoader(shards, seed=1, global_batch=args.global_batch, prefetch_steps=args.prefetch_steps)
    st = loader.storage
    req0 = st.http_requests if isinstance(st, S3Storage) else 0
    steps = args.steps or loader.steps_per_epoch
    it = loader.iter_batches(0)
    first = next(it)
    t_first = time.perf_counter() - t0
    used, tokens = used_bytes(loader.index, first.sequences), first.input_ids.numel()
    t1 = time.perf_counter()
    for _, b in zip(range(steps - 1), it):
        tokens += b.input_ids.numel()
        used += used_bytes(loader.index, b.sequences)
    dt = time.perf_counter() - t1
    it.close()
    out = {"steps": steps, "tokens": tokens, "first_batch_s": t_first,
           "tokens_per_s": (tokens - first.input_ids.numel()) / dt if dt > 0 else float("nan")}
    if isinstance(st, S3Storage):
        out["requests_per_1M_tokens"] = (st.http_requests - req0) / tokens * 1e6
        out["bytes_fetched_per_byte_used"] = st.stats["bytes_read"] / used
        out["retries"] = st.stats["retries"]
    loader.close()
    return out


def run_shardgen(inputs: list[str], output: str, args) -> dict:
    from shardgen.build import BuildOptions, run_build
    t0 = time.perf_counter()
    res = run_build(BuildOptions(inputs=inputs, output=output, tokenizer=args.tokenizer, seq_len=args.seq_len,
                                 workers=args.workers, progress=False, log=io.StringIO()))
    dt = time.perf_counter() - t0
    totals = res.manifest.totals()
    return {"seconds": dt, "tokens": totals["tokens"], "tokens_per_s": totals["tokens"] / dt,
            "input_MB_per_s": res.manifest.stats["input_bytes"] / dt / 1e6, "shard_bytes": totals["bytes"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=50_000_000, help="tokens in the loader dataset")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--prefetch-steps", type=int, default=4)
    ap.add_argument("--steps", type=int, default=0, help="loader steps per backend (0: one epoch)")
    ap.add_argument("--block-bytes", type=int, default=None,
                    help="raw bytes per block of the loader dataset (default: the format's 256 KiB)")
    ap.add_argument("--shardgen-mb", type=int, default=32, help="jsonl input size for the shardgen runs (0: skip)")
    ap.add_argument("--workers", type=int, default=2, help="shardgen worker processes")
    ap.add_argument("--corpus", default=os.path.join(ROOT, "data", "shakespeare"))
    ap.add_argument("--tokenizer", default=os.path.join(ROOT, "data", "tokenizer"))
    ap.add_argument("--workdir", help="keep shards and server state here (default: a temporary directory)")
    args = ap.parse_args()

    import torch  # noqa: F401  (imported here, not inside the first timed batch)

    from shards.s3server import AWS_VARS, LocalS3

    work = args.workdir or tempfile.mkdtemp(prefix="s3bench-")
    os.makedirs(work, exist_ok=True)
    res = {"tokens_target": args.tokens, "seq_len": args.seq_len, "global_batch": args.global_batch,
           "block_bytes": args.block_bytes}
    try:
        local = os.path.join(work, "shards")
        if not os.path.exists(os.path.join(local, "manifest.json")):
            write_shards(local, args.tokens, args.seq_len, blocks_per_shard=256, block_bytes=args.block_bytes)
        shutil.rmtree(os.path.join(work, "s3"), ignore_errors=True)  # a fresh server: nothing already uploaded
        with LocalS3(os.path.join(work, "s3")) as server:
            for k in AWS_VARS:  # only this server, whatever the user's AWS setup says
                os.environ.pop(k, None)
            os.environ.update(server.env())
            os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
            server.create_bucket(BUCKET)
            url = f"s3://{BUCKET}/shards"
            res["upload"] = upload_dataset(local, url)
            res["loader_local"] = run_loader(local, args)
            res["loader_s3"] = run_loader(url, args)
            if args.shardgen_mb:
                if not os.path.isfile(os.path.join(args.tokenizer, "tokenizer.json")):
                    raise SystemExit(f"{args.tokenizer}/tokenizer.json not found: run `make tokenizer` "
                                     f"or pass --tokenizer")
                corpus = os.path.join(work, "corpus")
                paths = make_corpus(args.corpus, corpus, args.shardgen_mb)
                upload_dataset_files(paths, f"s3://{BUCKET}/corpus")
                res["shardgen_local"] = run_shardgen([corpus], os.path.join(work, "sg-out"), args)
                res["shardgen_to_s3"] = run_shardgen([corpus], f"s3://{BUCKET}/sg-out", args)
                res["shardgen_s3_to_s3"] = run_shardgen([f"s3://{BUCKET}/corpus"], f"s3://{BUCKET}/sg-out2", args)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    report(res)
    return 0


def upload_dataset_files(paths: list[str], url: str) -> None:
    from shards.s3 import S3Storage
    st = S3Storage(url)
    for p in paths:
        with open(p, "rb") as f:
            st.put_bytes(os.path.basename(p), f.read())


def report(r: dict) -> None:
    lo, s3 = r["loader_local"], r["loader_s3"]
    up = r["upload"]
    print(f"\nloader: {lo['tokens']:,} tokens in {lo['steps']} steps of {r['global_batch']} x {r['seq_len']}")
    print(f"{'':24} {'tokens/s':>12} {'first batch s':>14} {'req/1M tok':>11} {'fetched/used':>13}")
    print(f"{'local disk':24} {lo['tokens_per_s']:12,.0f} {lo['first_batch_s']:14.3f} {'':>11} {'':>13}")
    print(f"{'S3 (SeaweedFS loopback)':24} {s3['tokens_per_s']:12,.0f} {s3['first_batch_s']:14.3f} "
          f"{s3['requests_per_1M_tokens']:11.1f} {s3['bytes_fetched_per_byte_used']:13.3f}")
    print(f"upload (put_file + verify): {up['bytes'] / 2**20:.1f} MiB at {up['MiB_per_s']:.1f} MiB/s")
    if "shardgen_local" in r:
        print(f"\nshardgen ({r['shardgen_local']['tokens']:,} tokens)")
        print(f"{'':24} {'wall s':>8} {'tokens/s':>12} {'input MB/s':>11}")
        for k, name in (("shardgen_local", "local -> local"), ("shardgen_to_s3", "local -> S3"),
                        ("shardgen_s3_to_s3", "S3 -> S3")):
            x = r[k]
            print(f"{name:24} {x['seconds']:8.2f} {x['tokens_per_s']:12,.0f} {x['input_MB_per_s']:11.2f}")
    print(json.dumps(r))


if __name__ == "__main__":
    sys.exit(main())
