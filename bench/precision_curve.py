"""Does a precision path learn the same? Two runs of the real trainer, same data, init and schedule, differing
only in train.precision; prints the per-step training losses side by side and the largest relative gap.

    PYTHONUNBUFFERED=1 python bench/precision_curve.py --shards DIR [--model configs/gla_340M.json]
        [--steps 300] [--batch 8] [--warmup 30] [--skip 30] [--precisions autocast,bf16] [--parallel none]

The first precision is the reference. --skip: steps left out of the comparison (warm-up). Prints one JSON
line: the largest |loss_b - loss_a| / loss_a over the compared steps, its step, the mean relative gap, and both
runs' mean loss over the last 10 steps; then every 25th step's two losses.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shards of real text (e.g. `make shards SEQ_LEN=2048`)")
    p.add_argument("--model", default="configs/gla_340M.json")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--warmup", type=int, default=30, help="optim.warmup")
    p.add_argument("--skip", type=int, default=30, help="first steps not compared")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--precisions", default="autocast,bf16")
    p.add_argument("--parallel", default="none")
    p.add_argument("--dir", default=os.path.join(ROOT, "bench", "out", "precision"))
    args = p.parse_args()
    from trainer.metrics import read_metrics
    curves = {}
    for prec in args.precisions.split(","):
        out = os.path.join(args.dir, prec)
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "trainer", "configs/demo.toml", f"model.config={args.model}", f"data.shards={args.shards}",
               "data.val_shards=none", f"data.global_batch={args.batch}", f"train.max_steps={args.steps}",
               "train.micro_batch=none", "train.eval_every=0",
               f"train.precision={prec}", f"optim.lr={args.lr}", f"optim.min_lr={args.lr / 10}",
               f"optim.warmup={args.warmup}", "checkpoint.every=0", "checkpoint.at_end=false",
               f"parallel.mode={args.parallel}", f"run.out_dir={out}", "run.tensorboard=false",
               "run.progress_every=30"]
        print(f"precision_curve: {prec}: {' '.join(cmd[4:])}", file=sys.stderr, flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        curves[prec] = [r["loss"] for r in read_metrics(out)]
    (a_name, a), (b_name, b) = list(curves.items())[:2]
    gaps = [(abs(y - x) / x, s) for s, (x, y) in enumerate(zip(a, b)) if s >= args.skip]
    worst, at = max(gaps)
    print(json.dumps({"reference": a_name, "candidate": b_name, "model": os.path.basename(args.model),
                      "steps": len(a), "batch": args.batch, "compared_from_step": args.skip,
                      "max_rel_gap": worst, "at_step": at, "mean_rel_gap": sum(g for g, _ in gaps) / len(gaps),
                      f"last10_{a_name}": sum(a[-10:]) / len(a[-10:]), f"last10_{b_name}": sum(b[-10:]) / len(b[-10:])}), flush=True)
    for s in range(0, len(a), 25):
        print(f"step {s:4d}  {a_name} {a[s]:.4f}  {b_name} {b[s]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
