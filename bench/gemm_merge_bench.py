"""Would one GEMM over adjacent weights beat one GEMM per projection? GLA 340M's shapes at batch 16 (M = 32768 tokens,
hidden 1024), bf16, cuBLAS through torch, CUDA events (median of --iters calls, bench/cuda_timing.py).

The bf16 training path (trainer/precision.py) keeps every bf16 weight in one flat buffer in parameter order, so a
block's MLP gate and up weights ([2816, 1024] each), and its attention's q, k, v, g and first gate projection, lie
next to each other in memory: a view of them as one [N1 + N2 + ..., 1024] matrix costs no copy. This measures what
the three products of a linear layer (forward y = x W^T, input gradient dx = dy W, weight gradient dW = dy^T x) cost
each way, per layer and per step (x 24 layers), before any kernel is changed to use it:

  separate  one GEMM per weight; dx accumulated in one buffer (addmm, as models/fused.py's shared_linear does)
  merged    one GEMM over the stacked weights, the outputs and gradients as column blocks of one [M, sum N] tensor

    python bench/gemm_merge_bench.py [--iters 20]

Prints one JSON line per group of projections."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.cuda_timing import median_ms  # noqa: E402

GROUPS = {"mlp gate+up": [2816, 2816], "attention q,k,v,g,gate": [512, 512, 1024, 1024, 16]}


def measure(widths: list[int], m: int, d: int, iters: int, layers: int) -> dict:
    dev, dt = "cuda", torch.bfloat16
    n = sum(widths)
    torch.manual_seed(0)
    x = torch.randn(m, d, device=dev, dtype=dt)
    w = torch.randn(n, d, device=dev, dtype=dt) * d ** -0.5  # the stacked weights: rows of each projection in turn
    dy = torch.randn(m, n, device=dev, dtype=dt) * 1e-2  # the merged gradient; each projection's is a column block
    ws = list(w.split(widths, 0))  # contiguous row blocks: the adjacent weights
    dys = [t.contiguous() for t in dy.split(widths, 1)]  # separate: each projection's own contiguous gradient

    def fwd_separate():
        return [x @ wi.t() for wi in ws]

    def dx_separate():
        dx = dys[0] @ ws[0]
        for g, wi in zip(dys[1:], ws[1:]):
            dx.addmm_(g, wi)
        return dx

    def dw_separate():
        return [g.t() @ x for g in dys]

    timings = {
        "fwd": (median_ms(fwd_separate, 3, iters, 1), median_ms(lambda: x @ w.t(), 3, iters, 1)),
        "dx": (median_ms(dx_separate, 3, iters, 1), median_ms(lambda: dy @ w, 3, iters, 1)),
        "dw": (median_ms(dw_separate, 3, iters, 1), median_ms(lambda: dy.t() @ x, 3, iters, 1)),
    }
    same = {"fwd": torch.equal(torch.cat(fwd_separate(), 1), x @ w.t()),
            "dw": torch.equal(torch.cat(dw_separate(), 0), dy.t() @ x)}
    row = {"widths": widths, "m": m, "d": d}
    total_sep = total_merged = 0.0
    for k, (sep, merged) in timings.items():
        row[k] = {"separate_ms": round(sep, 4), "merged_ms": round(merged, 4), "ratio": round(sep / merged, 3)}
        total_sep += sep
        total_merged += merged
    row["per_step_saved_ms"] = round((total_sep - total_merged) * layers, 2)
    row["bitwise_equal"] = same
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemm_merge_bench: needs a CUDA GPU")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for name, widths in GROUPS.items():
        print(json.dumps({"group": name, **measure(widths, args.tokens, args.hidden, args.iters, args.layers)}),
              flush=True)


if __name__ == "__main__":
    main()
