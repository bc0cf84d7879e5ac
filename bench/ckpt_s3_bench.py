"""Checkpoint save/load time, local directory vs S3 (a local SeaweedFS started here, loopback), one process.

    python bench/ckpt_s3_bench.py [--model configs/demo_gla.json] [--repeats 3] [--threads 4]

Same model + AdamW state both ways, trainer.checkpoint.Checkpointer (S3: its ObjectStoreDCP adapter over
shardgen's S3Storage). Prints one JSON line per target: median save and load seconds, the checkpoint's bytes
and the S3 requests per save/load. Local saves are fsynced and verified by CRC32 on load; S3 saves stage in
the temp dir and upload with SHA-256 verification, loads check sizes from one listing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "configs", "demo_gla.json"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=4)
    args = p.parse_args()
    from bench.ckpt_bench import model_with_adamw_state
    from shards.s3server import S3Server
    from trainer.checkpoint import Checkpointer
    from trainer.parallel import Dist
    model, opt = model_with_adamw_state(args.model)
    work = tempfile.mkdtemp(prefix="ckpt-s3-bench-")
    server = S3Server(os.path.join(work, "s3"))
    server.start()
    try:
        os.environ.update(server.env())
        server.create_bucket("bench")
        for target in (os.path.join(work, "local"), "s3://bench/ckpt"):
            ck = Checkpointer(target, keep=1, d=Dist(), threads=args.threads)
            saves, loads, size, requests, read = [], [], 0, [], None
            for r in range(args.repeats):
                before = getattr(getattr(ck, "storage", None), "http_requests", 0)
                t = time.perf_counter()
                path = ck.save(r + 1, model, opt, {"loader": {}})
                saves.append(time.perf_counter() - t)
                mid = getattr(getattr(ck, "storage", None), "http_requests", 0)
                size = sum(info["size"] for info in ck.check(path)[0]["files"].values())
                t = time.perf_counter()
                ck.load(path, model, opt)
                loads.append(time.perf_counter() - t)
                requests.append((mid - before, getattr(getattr(ck, "storage", None), "http_requests", 0) - mid))
                read = getattr(ck, "storage", None) and ck.storage.stats["bytes_read"]
            print(json.dumps({"model": os.path.basename(args.model), "target": "s3" if "://" in target else "local",
                              "threads": args.threads, "bytes": size, "save_s": statistics.median(saves),
                              "load_s": statistics.median(loads), "saves": saves, "loads": loads,
                              "s3_requests_save_load": requests if "://" in target else None,
                              "s3_bytes_read_total": read if "://" in target else None}), flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
