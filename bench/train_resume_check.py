"""Kill-and-resume check on real hardware (2 GPUs: DDP and FSDP2), printing how far the losses drift.

    PYTHONUNBUFFERED=1 python bench/train_resume_check.py --mode ddp  [--nproc 2] [--model configs/gla_340M.json]
    PYTHONUNBUFFERED=1 python bench/train_resume_check.py --mode fsdp [--seq-len 2048 --batch 8 --steps 12 --kill-after 7]

For each mode: (1) an uninterrupted `torchrun --nproc-per-node N -m trainer` run of --steps steps with a
checkpoint every --every steps; (2) the same run SIGKILLed (the whole process group) once --kill-after
steps are logged; (3) that run resumed on N processes and, from a copy, on --resume-nproc processes (1). Prints one JSON
line with the uninterrupted run's throughput (median over its steps after --skip), then one JSON line per resumed run with the largest per-step loss difference to the uninterrupted run. (On GPUs bf16
autocast and atomics make runs differ slightly even without a kill; the CPU tests check exactness.)
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


def trainer_cmd(nproc: int, overrides: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "trainer", "configs/demo.toml", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
            "trainer", "configs/demo.toml", *overrides]


def losses(out: str) -> list[float]:
    from trainer.metrics import read_metrics
    return [r["loss"] for r in read_metrics(out)]


def throughput(out: str, skip: int) -> dict:
    """Median per-step numbers of a run's metrics.jsonl, its first `skip` steps (compilation) left out."""
    import statistics

    from trainer.metrics import read_metrics
    records = read_metrics(out)[skip:]
    med = (lambda key: statistics.median(r[key] for r in records) if records and records[0].get(key) is not None
           else None)
    return {"timed_steps": len(records), "tokens_per_s": med("tokens_per_s"), "mfu": med("mfu"),
            "data_wait_share": med("data_wait_share"),
            "peak_mem_gib": max(r["memory_gib"] for r in records) if records else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["ddp", "fsdp"], required=True)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--model", default="configs/gla_340M.json")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--kill-after", type=int, default=7)
    p.add_argument("--resume-nproc", type=int, default=1, help="processes of the second resume (default 1)")
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the throughput line")
    p.add_argument("--shards", default=None)
    p.add_argument("--dir", default=os.path.join(ROOT, "bench", "out", "resume"))
    args = p.parse_args()
    from bench.train_bench import write_synthetic_shards
    from tests.train_support import kill_tree
    shards = args.shards or write_synthetic_shards(os.path.join(args.dir, f"shards-{args.seq_len}"),
                                                   args.batch * (args.steps + 2) * 8, args.seq_len, 32000)
    base = [f"model.config={args.model}", f"data.shards={shards}", "data.val_shards=none",
            f"data.global_batch={args.batch}", f"train.max_steps={args.steps}",
            f"train.micro_batch={args.batch // args.nproc}", "train.eval_every=0", f"checkpoint.every={args.every}",
            "checkpoint.keep=2", f"parallel.mode={args.mode}", "optim.warmup=2"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    runs = {name: os.path.join(args.dir, f"{args.mode}-{name}") for name in ("full", "killed", "killed-1proc")}
    for path in runs.values():
        shutil.rmtree(path, ignore_errors=True)

    print(f"[{time.strftime('%X')}] uninterrupted run", file=sys.stderr, flush=True)
    subprocess.run(trainer_cmd(args.nproc, base + [f"run.out_dir={runs['full']}"]), cwd=ROOT, env=env, check=True)

    print(f"[{time.strftime('%X')}] run to kill after {args.kill_after} steps", file=sys.stderr, flush=True)
    proc = subprocess.Popen(trainer_cmd(args.nproc, base + [f"run.out_dir={runs['killed']}"]), cwd=ROOT, env=env)
    metrics = os.path.join(runs["killed"], "metrics.jsonl")
    while proc.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= args.kill_after:
            kill_tree(proc.pid)
            break
        time.sleep(0.1)
    proc.wait()
    shutil.copytree(runs["killed"], runs["killed-1proc"])

    full = losses(runs["full"])
    print(json.dumps({"mode": args.mode, "nproc": args.nproc, "run": "uninterrupted", "global_batch": args.batch,
                      "seq_len": args.seq_len, "model": os.path.basename(args.model),
                      **throughput(runs["full"], args.skip)}), flush=True)
    for name, nproc in (("killed", args.nproc), ("killed-1proc", args.resume_nproc)):
        over = base + [f"run.out_dir={runs[name]}"]
        # Same global batch on 1 process: the local batch doubles, the micro-batches keep their size.
        print(f"[{time.strftime('%X')}] resume {name} on {nproc} process(es)", file=sys.stderr, flush=True)
        subprocess.run(trainer_cmd(nproc, over), cwd=ROOT, env=env, check=True)
        got = losses(runs[name])
        diff = max(abs(a - b) for a, b in zip(got, full)) if len(got) == len(full) else None
        print(json.dumps({"mode": args.mode, "resumed_on": nproc, "steps": len(got), "max_abs_loss_diff": diff,
                          "final_loss": got[-1], "final_loss_uninterrupted": full[-1]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
