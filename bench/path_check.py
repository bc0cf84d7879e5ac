"""Do two training paths compute the same gradient? One forward + backward of each run's path on the same weights
and tokens, every parameter's gradient compared with the first run's, and a causality probe of each path.

    PYTHONUNBUFFERED=1 python bench/path_check.py [--runs autocast-fla,bf16-fla,bf16-fused,bf16-fused-split-flagnorm]
        [--model configs/gla_340M.json] [--batch 16] [--seq-len 2048] [--dir bench/out/path_check]

--runs: bench/precision_curve.py's spelling, PRECISION-KERNELS[-MODIFIER...] (the modifiers are
bench/train_bench.py's, set in the run's own process). Each run is a process of its own: it builds the model from
seed 0 as the trainer does (models.build, model.gpu_kernels installed before the precision sees the parameters),
runs one forward + backward under the path's precision (bf16: trainer.precision.MasterWeights' bf16 copies; autocast:
fp32 weights under bf16 autocast; fp32) on one batch of random tokens, and saves the loss, the gradients as fp32 and
the global gradient norm (what the clip sees). Then, per run against the first: the loss, the gradient norm's ratio,
and per parameter the cosine of the two gradients and the ratio of their norms; the parameters furthest from
cosine 1 and from ratio 1 are listed. Rounding alone gives cosines near 1 and ratios near 1 for every parameter; a
gradient scaled wrong (a factor left out or applied twice) shows as a ratio away from 1 at a cosine near 1, a
wrong gradient as a low cosine.

The causality probe: the path's logits at positions before P (half the sequence) must not change when the tokens
from P on are replaced; a kernel that leaks a later token into an earlier position lowers the training loss while
learning nothing usable. Prints the largest change of those logits (0 expected: the same kernels on the same
prefix; FLA's forward kernels carry no atomics).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def start_path(run: str, cpu: bool):
    """In a run's own process, before anything else: the Triton interpreter on the CPU, the run's train_bench
    modifiers applied; returns (train.precision, model.gpu_kernels or None, the device)."""
    if cpu:  # the Triton interpreter, before triton or fla is imported
        from models import cpu_triton
        cpu_triton.enable()
    import torch

    from bench.precision_curve import parse_run
    from bench.train_bench import apply_modifiers
    precision, kernels, _ = parse_run(run)
    apply_modifiers("ours-" + run)
    dev = torch.device("cpu") if cpu else torch.device("cuda", 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return precision, kernels, dev


def on_path(model, precision: str, kernels: str | None, dev):
    """The path's kernels installed into `model` (train mode) and its trainer.precision object: (it, what runs)."""
    from models import build
    from models.warm import install_kernels
    from trainer.precision import MasterWeights, Precision
    build.use_fp32_loss(model)  # as the trainer's setup does
    if dev.type == "cpu" and kernels is None:
        kernels = "fla"  # the trainer's default on a CPU: FLA's modules (model.gpu_kernels is a GPU switch)
    if dev.type == "cpu" and kernels == "fla":
        from models import cpu_torch
        cpu_torch.select(model.config, "torch")  # its ops as the trainer runs them there (model.cpu_kernels=torch)
    what = install_kernels(model, kernels or "fused")
    model.train()
    return (MasterWeights(model, dev) if precision == "bf16" else Precision(precision, dev)), what


def worker(run: str, args) -> None:
    precision, kernels, dev = start_path(run, args.cpu)
    import torch

    from models import build
    config = build.load_config(args.model)
    build.adapt_to_device(config, dev)
    model = build.build_model(config, dev, seed=0)
    prec, what = on_path(model, precision, kernels, dev)
    gen = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=gen, device=dev)
    with prec.compute():
        with prec.autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        prec.accumulate()
    prec.reduce()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    # causality: logits before P with the tokens from P on replaced (up to 2 sequences: the logits are [2, T, vocab])
    half = args.seq_len // 2
    probe = ids[:2].clone()
    probe2 = probe.clone()
    probe2[:, half:] = torch.randint(0, config.vocab_size, (len(probe), args.seq_len - half), generator=gen,
                                     device=dev)
    with torch.no_grad(), prec.compute(), prec.autocast():
        a = model(input_ids=probe).logits[:, :half].float()
        b = model(input_ids=probe2).logits[:, :half].float()
    leak = (a - b).abs().max().item()
    torch.save({"run": run, "loss": loss.item(), "grads": grads, "norm": norm, "leak": leak, "kernels": what},
               os.path.join(args.dir, f"{run}.pt"))
    print(f"path_check {run}: loss {loss.item():.6f}, gradient norm {norm:.6f}, causality probe max |change| "
          f"{leak:.3g} ({what})", flush=True)


def compare(ref: dict, other: dict, top: int) -> dict:
    """Per parameter cosine and norm ratio of other's gradients against ref's, and the worst ones."""
    rows = []
    for n, g in ref["grads"].items():
        h = other["grads"].get(n)
        if h is None:
            rows.append((n, float("nan"), float("nan")))
            continue
        g64, h64 = g.double().flatten(), h.double().flatten()
        gn, hn = g64.norm().item(), h64.norm().item()
        cos = (g64 @ h64).item() / max(gn * hn, 1e-300)
        rows.append((n, cos, hn / gn if gn else float("inf")))
    by_cos = sorted(rows, key=lambda r: r[1])[:top]
    by_ratio = sorted(rows, key=lambda r: -abs(math.log(r[2])) if 0 < r[2] < math.inf else -math.inf)[:top]
    cosines = sorted(r[1] for r in rows)
    ratios = sorted(r[2] for r in rows)
    return {"run": other["run"], "loss": other["loss"], "loss_ref": ref["loss"],
            "norm_ratio": other["norm"] / ref["norm"],
            "median_cos": cosines[len(cosines) // 2], "min_cos": cosines[0], "median_ratio": ratios[len(ratios) // 2],
            "leak": other["leak"], "lowest_cos": by_cos, "furthest_ratio": by_ratio}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="autocast-fla,bf16-fla,bf16-fused,bf16-fused-split-flagnorm")
    p.add_argument("--model", default=os.path.join(ROOT, "configs", "gla_340M.json"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--top", type=int, default=6, help="parameters listed per run, furthest first")
    p.add_argument("--dir", default=os.path.join(ROOT, "bench", "out", "path_check"))
    p.add_argument("--cpu", action="store_true", help="on the CPU, FLA's and our kernels under the Triton "
                   "interpreter (tiny models: the script's own check)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    if args.worker:
        worker(args.worker, args)
        return 0
    from bench.precision_curve import parse_run
    runs = args.runs.split(",")
    for run in runs:
        parse_run(run)  # a bad name fails before any process starts
    done = []
    for run in runs:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", run, "--model", args.model, "--batch",
               str(args.batch), "--seq-len", str(args.seq_len), "--dir", args.dir] + (["--cpu"] if args.cpu else [])
        if subprocess.run(cmd).returncode == 0:
            done.append(run)
        else:
            print(f"path_check: run {run} failed (its output above)", flush=True)
    if len(done) < 2 or done[0] != runs[0]:
        print("path_check: nothing to compare (the reference run failed or only one run finished)")
        return 1
    import torch
    ref = torch.load(os.path.join(args.dir, f"{runs[0]}.pt"))
    print(f"reference {runs[0]}: loss {ref['loss']:.6f}, gradient norm {ref['norm']:.6f}, causality probe "
          f"{ref['leak']:.3g}")
    for run in done[1:]:
        r = compare(ref, torch.load(os.path.join(args.dir, f"{run}.pt")), args.top)
        print(f"{run} vs {runs[0]}: loss {r['loss']:.6f} vs {r['loss_ref']:.6f}; gradient norm ratio "
              f"{r['norm_ratio']:.4f}; per parameter cosine median {r['median_cos']:.5f}, lowest {r['min_cos']:.5f}; "
              f"norm ratio median {r['median_ratio']:.4f}; causality probe {r['leak']:.3g}")
        print("  lowest cosine:  " + "; ".join(f"{n} {c:.4f} (ratio {q:.3f})" for n, c, q in r["lowest_cos"]))
        print("  furthest ratio: " + "; ".join(f"{n} {q:.3f} (cos {c:.4f})" for n, c, q in r["furthest_ratio"]))
        print(json.dumps({k: v for k, v in r.items() if k not in ("lowest_cos", "furthest_ratio")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
