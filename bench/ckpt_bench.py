"""Checkpoint save/load time: trainer.checkpoint.Checkpointer with 1 writer thread (DCP's default, and
CRC32s one file after another) vs N threads, same model + AdamW state, same disk, one process.

    python bench/ckpt_bench.py [--model configs/gla_340M.json] [--threads 1,4] [--repeats 2] [--dir bench/out/ckpt]

Prints one JSON line per thread count: median save and load (with CRC verification) seconds and GB/s
over the checkpoint's bytes. Every save is fsynced (DCP's sync_files), so the disk is measured, not the
page cache alone; loads read back files that are likely still cached.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def model_with_adamw_state(model_json: str):
    """A model built from its JSON on CPU and an AdamW whose states exist (one step on zero grads)."""
    import torch

    from models import build
    config = build.load_config(model_json)
    build.adapt_to_device(config, torch.device("cpu"))
    model = build.build_model(config, "cpu", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    opt.step()
    return model, opt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "configs", "gla_340M.json"))
    p.add_argument("--threads", default="1,4")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", default=os.path.join(ROOT, "bench", "out", "ckpt"))
    args = p.parse_args()
    from trainer.checkpoint import Checkpointer
    from trainer.parallel import Dist
    model, opt = model_with_adamw_state(args.model)
    d = Dist()
    for threads in (int(t) for t in args.threads.split(",")):
        root = os.path.join(args.dir, f"t{threads}")
        shutil.rmtree(root, ignore_errors=True)
        ck = Checkpointer(root, keep=1, d=d, threads=threads)
        saves, loads, size = [], [], 0
        for r in range(args.repeats):
            t = time.perf_counter()
            path = ck.save(r + 1, model, opt, {"loader": {}})
            saves.append(time.perf_counter() - t)
            size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)
            t = time.perf_counter()
            ck.load(path, model, opt)
            loads.append(time.perf_counter() - t)
        save, load = statistics.median(saves), statistics.median(loads)
        print(json.dumps({"model": os.path.basename(args.model), "threads": threads, "bytes": size,
                          "save_s": save, "save_gb_s": size / save / 1e9, "load_s": load,
                          "load_gb_s": size / load / 1e9, "saves": saves, "loads": loads}), flush=True)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
