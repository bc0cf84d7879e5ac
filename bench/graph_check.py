"""train.cuda_graphs on a GPU: the same numbers as the eager step, and how much faster.

    PYTHONUNBUFFERED=1 python bench/graph_check.py [--model configs/gla_340M.json] [--seq-len 2048] [--batch 16]
        [--steps 12] [--warmup 3] [--runs eager,eager,graphs,graphs-mb2,eager-ac,graphs-ac]

Each run builds the model afresh from one seed (models.build, the fused blocks as the trainer installs them,
train.precision=bf16's MasterWeights, fused AdamW, clip 1.0) and trains --steps steps of the same random tokens
through the trainer's own train_step, eagerly or with trainer.graphs.GraphedSteps. A run is
MODE[-ac][-mbN]: MODE eager or graphs; -ac activation checkpointing; -mbN N micro-batches per step (gradient
accumulation: the graph is replayed N times). Every run is compared with the first run of the same -ac/-mb
settings: the largest relative gap in loss and grad norm over the steps and the largest absolute gap of the
final fp32 weights. Name `eager` twice for the noise floor: FLA's backward kernels use atomics, so two eager
runs differ in the last bits too. Timing: the median step after --warmup steps (the first graphs step captures).
Prints one JSON line per run and a CHECK line: graphs runs must stay within 10x the eager noise floor (or 1e-3
relative where the floor is 0). Exit 1 if not, 2 without CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_run(run: str) -> tuple[str, bool, int]:
    """MODE[-ac][-mbN] -> (mode, activation checkpointing, micro-batches per step)."""
    mode, *rest = run.split("-")
    ac, parts = False, 1
    for r in rest:
        if r == "ac":
            ac = True
        elif r.startswith("mb") and r[2:].isdigit() and int(r[2:]) > 0:
            parts = int(r[2:])
        else:
            raise ValueError(f"run {run!r}: use MODE[-ac][-mbN], MODE eager or graphs (e.g. graphs-ac-mb2)")
    if mode not in ("eager", "graphs"):
        raise ValueError(f"run {run!r}: MODE is eager or graphs")
    return mode, ac, parts


def one_run(args, run: str) -> dict:
    import torch

    from models import build, fused
    from trainer.config import OptimConfig
    from trainer.graphs import GraphedSteps
    from trainer.loop import train_step
    from trainer.optim import build_optimizer
    from trainer.parallel import Dist
    from trainer.precision import MasterWeights
    mode, ac, parts = parse_run(run)
    if args.batch % parts:
        raise SystemExit(f"run {run}: --batch {args.batch} is not a multiple of {parts} micro-batches")
    device = torch.device("cuda", 0)
    config = build.load_config(args.model)
    build.adapt_to_device(config, device)
    model = build.build_model(config, device, seed=0)
    fused.select(model, "fused", device)
    if ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    prec = MasterWeights(model, device)
    opt = build_optimizer(model, OptimConfig(), device)
    graphs = GraphedSteps(model, prec, device) if mode == "graphs" else None
    d = Dist(device=device)
    gen = torch.Generator().manual_seed(0)
    losses, norms, times = [], [], []
    for _ in range(args.steps):
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=gen).pin_memory()
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss, norm, applied = train_step(model, opt, ids, None, args.batch // parts, 1.0, 3e-4, d, prec, graphs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss)
        norms.append(norm)
    weights = torch.cat([p.detach().float().reshape(-1) for p in prec.params]).cpu()
    med = statistics.median(times[args.warmup:])
    out = {"run": run, "losses": losses, "grad_norms": norms, "weights": weights, "median_step_ms": med * 1e3,
           "first_step_s": times[0], "tokens_per_s": args.batch * args.seq_len / med,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    del model, opt, prec, graphs
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return out


def gaps(a: dict, b: dict) -> dict:
    rel = lambda x, y: abs(x - y) / max(abs(y), 1e-12)  # noqa: E731
    return {"loss_rel": max(rel(x, y) for x, y in zip(a["losses"], b["losses"])),
            "grad_norm_rel": max(rel(x, y) for x, y in zip(a["grad_norms"], b["grad_norms"])),
            "weights_abs": float((a["weights"] - b["weights"]).abs().max())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "configs", "gla_340M.json"))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", default="eager,eager,graphs,graphs-mb2,eager-ac,graphs-ac")
    args = p.parse_args()
    runs = args.runs.split(",")
    for r in runs:
        parse_run(r)
    import torch
    if not torch.cuda.is_available():
        print("graph_check: no CUDA device (CUDA graphs are a GPU feature)", file=sys.stderr)
        return 2
    torch.cuda.set_device(0)
    print(f"graph_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, {os.path.basename(args.model)} "
          f"batch {args.batch} x {args.seq_len}, {args.steps} steps ({args.warmup} untimed)", flush=True)
    refs, floors, results, ok = {}, {}, [], True
    for run in runs:
        r = one_run(args, run)
        mode, ac, parts = parse_run(run)
        settings = (ac, parts)
        line = {k: v for k, v in r.items() if k not in ("weights", "losses", "grad_norms")}
        line["final_loss"] = r["losses"][-1]
        ref = refs.get(settings)
        if ref is None:
            refs[settings] = r
            line["reference"] = True
        else:
            line.update(vs=ref["run"], **gaps(r, ref))
            line["speedup_vs_ref"] = ref["median_step_ms"] / r["median_step_ms"]
            if mode == "eager":
                floors[settings] = gaps(r, ref)
        results.append((run, mode, settings, line))
        print(json.dumps(line), flush=True)
    for run, mode, settings, line in results:
        if mode != "graphs" or line.get("reference"):  # a reference: no eager run of its settings before it
            continue
        floor = floors.get((False, 1), {"loss_rel": 0.0, "grad_norm_rel": 0.0})
        for key in ("loss_rel", "grad_norm_rel"):
            limit = max(10 * floor[key], 1e-3)
            if line[key] > limit:
                ok = False
                print(f"CHECK failed: {run} {key} {line[key]:.3g} > {limit:.3g} (10x the eager noise floor "
                      f"{floor[key]:.3g}, at least 1e-3)", flush=True)
    eager = next((ln for _, m, s, ln in results if m == "eager" and s == (False, 1)), None)
    graphs = next((ln for _, m, s, ln in results if m == "graphs" and s == (False, 1)), None)
    if eager and graphs:
        print(f"speed: eager {eager['median_step_ms']:.1f} ms/step {eager['tokens_per_s']:,.0f} tokens/s, graphs "
              f"{graphs['median_step_ms']:.1f} ms/step {graphs['tokens_per_s']:,.0f} tokens/s: "
              f"{eager['median_step_ms'] / graphs['median_step_ms']:.3f}x", flush=True)
    print(f"CHECK {'ok' if ok else 'failed'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
