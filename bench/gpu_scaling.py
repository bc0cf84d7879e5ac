"""Throughput and memory of the real trainer on 1..N GPUs of one host, same per-GPU batch, in one call.

    PYTHONUNBUFFERED=1 python bench/gpu_scaling.py --runs none:1,ddp:2,fsdp:1,fsdp:2 [--model configs/gla_340M.json]
        [--per-gpu-batch 16] [--micro-batch 16] [--steps 30] [--skip 5] [--precision auto] [--extra key=value ...]

Each run is `python -m trainer` (torchrun for more than one process) on synthetic shards (or --shards) with
`mode:nproc`, global batch = per-GPU batch x nproc, no checkpoints or validation. Prints one JSON line per run:
median tokens/s over the steps after --skip (compilation), per GPU, MFU as the trainer computes it, peak
CUDA memory of rank 0, and the speed-up over the 1-process run of the same mode in this call.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="none:1,ddp:2,fsdp:1,fsdp:2", help="mode:nproc, comma-separated")
    p.add_argument("--model", default="configs/gla_340M.json")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--per-gpu-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=None, help="train.micro_batch (default: the per-GPU batch)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5)
    p.add_argument("--precision", default="auto")
    p.add_argument("--extra", nargs="*", default=[], help="more trainer overrides, e.g. train.activation_checkpointing=true")
    p.add_argument("--shards", default=None)
    p.add_argument("--dir", default=os.path.join(ROOT, "bench", "out", "scaling"))
    args = p.parse_args()
    from bench.train_bench import write_synthetic_shards
    from bench.train_resume_check import throughput, trainer_cmd
    runs = [(m, int(n)) for m, n in (r.split(":") for r in args.runs.split(","))]
    most = max(n for _, n in runs)
    shards = args.shards or write_synthetic_shards(os.path.join(args.dir, f"shards-{args.seq_len}"),
                                                   args.per_gpu_batch * most * (args.steps + 2) * 2, args.seq_len, 32000)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    single: dict[str, float] = {}
    for mode, nproc in runs:
        out = os.path.join(args.dir, f"{mode}-{nproc}")
        shutil.rmtree(out, ignore_errors=True)
        over = [f"model.config={args.model}", f"data.shards={shards}", "data.val_shards=none",
                f"data.global_batch={args.per_gpu_batch * nproc}", f"train.max_steps={args.steps}",
                f"train.micro_batch={args.micro_batch or args.per_gpu_batch}", "train.eval_every=0",
                "checkpoint.every=0", "checkpoint.at_end=false", f"parallel.mode={mode}",
                f"train.precision={args.precision}", "optim.warmup=2", f"run.out_dir={out}", "run.tensorboard=false",
                "run.progress_every=30", *args.extra]
        print(f"[{time.strftime('%X')}] {mode} on {nproc} GPU(s)", file=sys.stderr, flush=True)
        t = time.perf_counter()
        proc = subprocess.run(trainer_cmd(nproc, over), cwd=ROOT, env=env)
        if proc.returncode != 0:
            print(json.dumps({"mode": mode, "nproc": nproc, "failed": proc.returncode}), flush=True)
            continue
        r = throughput(out, args.skip)
        if nproc == 1:
            single[mode] = r["tokens_per_s"]
        base = single.get(mode) or single.get("none")
        print(json.dumps({"mode": mode, "nproc": nproc, "model": os.path.basename(args.model),
                          "precision": args.precision, "per_gpu_batch": args.per_gpu_batch, "seq_len": args.seq_len,
                          "extra": args.extra, **r, "tokens_per_s_per_gpu": r["tokens_per_s"] / nproc,
                          "speedup_vs_1gpu": r["tokens_per_s"] / base if base else None,
                          "wall_s": round(time.perf_counter() - t, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
