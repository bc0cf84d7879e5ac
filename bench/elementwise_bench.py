"""GPU micro-benchmark of the elementwise kernels in models/kernels/swiglu.py against what they replace.

    python bench/elementwise_bench.py [--rows 32768] [--dim 2816] [--gate-dim 512] [--iters 50] [--sweep]

Why: FLA 0.6.0's SwiGLU kernels index flattened elements with an int64 division and modulo per element and run at
2.7-3.1 TB/s on an H200 (~4.3 TB/s copy); GLA's gate `F.logsigmoid(gk) / 16` is separate torch kernels. See the
docstring of models/kernels/swiglu.py.

Cases (bf16 by default, as GLA 340M's training step with batch 16 x 2048):
  swiglu fwd      z = silu(x) * y:                ours `swiglu_forward`  vs FLA `swiglu_fwd`
  swiglu fwdbwd   dx, dy, z from x, y, dz:        ours `swiglu_backward` vs FLA `swiglu_fwdbwd(use_weight=True)`
      each on packed [rows, dim] operands and on row-strided ones (x and y the two halves of one [rows, 2*dim]
      tensor, as a fused gate+up projection would give)
  logsigmoid fwd, fwd+bwd   logsigmoid(x) / 16 on [rows, gate-dim]: ours `log_sigmoid_scaled` vs
      `F.logsigmoid(x) / 16` (models/fused.py's swiglu="fla"), backward through autograd for both
Timing: torch.cuda.Event around --batch calls, --iters times after --warmup, median per call. Before each timed
batch the GPU is held by torch.cuda._sleep so that the CPU queues the whole batch first (GPU time, not launch
overhead; --no-sleep to include it). GB/s = the bytes each operation must move (reads + writes of the operands,
the same for both sides) / time. Max |difference| of every output against an fp32-math reference and between the
two; ours further from the reference than 2x the other side (+ 1e-3 of the largest value) is marked CHECK and the
exit status is 1. --sweep also times ours at other (tile elements, num_warps) settings than tile_config's.
Prints a table and one JSON line (RESULT {...}). Exit status 2 without CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SWEEP = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)]  # (elements per tile, num_warps)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32768, help="rows (batch x sequence length)")
    p.add_argument("--dim", type=int, default=2816, help="SwiGLU width (GLA 340M's intermediate size)")
    p.add_argument("--gate-dim", type=int, default=512, help="width of GLA's gate gk (key dim over all heads)")
    p.add_argument("--normalizer", type=float, default=16.0, help="gate_logit_normalizer")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--iters", type=int, default=50, help="timed batches; the median is reported")
    p.add_argument("--batch", type=int, default=10, help="calls per timed batch")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first (FLA autotunes on its first call)")
    p.add_argument("--no-sleep", action="store_true", help="do not pre-fill the launch queue (include CPU overhead)")
    p.add_argument("--sweep", action="store_true", help="also time ours at the tile/warp settings in SWEEP")
    args = p.parse_args()

    import torch
    if not torch.cuda.is_available():
        print("elementwise_bench: no CUDA device; this benchmark needs a GPU (run it on the GPU machine)",
              file=sys.stderr)
        return 2
    import torch.nn.functional as F
    import triton

    import fla
    from fla.modules.activations.ops import swiglu_fwd, swiglu_fwdbwd
    from models.kernels import swiglu as ours

    dev = torch.device("cuda")
    dtype = getattr(torch, DTYPES[args.dtype])
    m, d, dg, norm = args.rows, args.dim, args.gate_dim, args.normalizer
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=dev, generator=gen)).to(dtype)

    from cuda_timing import median_ms

    def timed(fn) -> float:
        return median_ms(fn, args.warmup, args.iters, args.batch, sleep=not args.no_sleep)

    results, failed = [], False

    def compare(case, got: dict, ref: dict) -> dict:
        """got: impl -> {output name: tensor}; ref: {output name: fp32 tensor}. Prints and returns the diffs."""
        nonlocal failed
        diffs = {}
        print(f"\n[{case}] max |difference| per output")
        for name, r in ref.items():
            row = {impl: (outs[name].float() - r).abs().max().item() for impl, outs in got.items()}
            a, b = list(got)
            row[f"{a}-{b}"] = (got[a][name].float() - got[b][name].float()).abs().max().item()
            flag = ""
            if row["ours"] > 2 * row[b] + 1e-3 * r.abs().max().item():
                flag, failed = "  CHECK", True
            diffs[name] = row
            print(f"  {name:3s} " + "  ".join(f"{k + ' vs ref' if k in got else k}: {v:.3g}" for k, v in row.items())
                  + flag)
        return diffs

    def report(case, nbytes, fns: dict, diffs: dict, sweep=None) -> None:
        print(f"[{case}] time per call (ms) and GB/s ({nbytes / 1e9:.3f} GB moved per call)")
        for impl, fn in fns.items():
            t = timed(fn)
            results.append({"case": case, "impl": impl, "ms": t, "GBps": nbytes / t / 1e6, "max_abs_diff": diffs})
            print(f"  {impl:12s} {t:.4f} ms  {nbytes / t / 1e6:7.0f} GB/s")
        for (tile, warps), fn in (sweep or {}).items():
            t = timed(fn)
            results.append({"case": case, "impl": f"ours tile={tile} warps={warps}", "ms": t, "GBps": nbytes / t / 1e6})
            print(f"  ours {tile:5d}/{warps:2d}w {t:.4f} ms  {nbytes / t / 1e6:7.0f} GB/s")

    def sweep_configs(x2, backward):
        """tile_config's shape with other tile sizes and warps (packed: 1 x tile; row-strided: its BD, tile/BD rows)."""
        if not args.sweep:
            return []
        packed = x2.is_contiguous()
        configs = []
        for tile, warps in SWEEP:
            if packed:
                configs.append(((tile, warps), (1, tile, warps)))
            else:
                bd = ours.tile_config(*x2.shape, packed=False, backward=backward)[1]
                configs.append(((tile, warps), (max(1, tile // bd), bd, warps)))
        return configs

    print(f"device {torch.cuda.get_device_name(dev)}  torch {torch.__version__}  triton {triton.__version__}  "
          f"fla {getattr(fla, '__version__', '?')}  {args.dtype}  swiglu [{m}, {d}]  gate [{m}, {dg}]")
    e = torch.empty((), dtype=dtype).element_size()

    # --- SwiGLU -------------------------------------------------------------------------------------------
    for layout in ("packed", "row-strided"):
        if layout == "packed":
            x, y = rand(m, d, scale=2.0), rand(m, d)
        else:
            xy = torch.cat([rand(m, d, scale=2.0), rand(m, d)], dim=1)
            x, y = xy[:, :d], xy[:, d:]
        dz = rand(m, d)
        xf, yf, dzf = x.float(), y.float(), dz.float()
        s = torch.sigmoid(xf)
        ref_z = xf * s * yf
        ref = {"dx": dzf * yf * s * (1 + xf * (1 - s)), "dy": dzf * xf * s, "z": ref_z}
        del xf, yf, dzf, s

        case = f"swiglu fwd, {layout}"
        diffs = compare(case, {"ours": {"z": ours.swiglu_forward(x, y)},
                               "fla": {"z": swiglu_fwd(x, y, output_contiguous=True)}}, {"z": ref_z})
        report(case, 3 * m * d * e, {"ours": lambda: ours.swiglu_forward(x, y),
                                     "fla": lambda: swiglu_fwd(x, y, output_contiguous=True)}, diffs,
               {k: (lambda c=c: ours.swiglu_forward(x, y, config=c)) for k, c in sweep_configs(x, False)})

        case = f"swiglu fwdbwd, {layout}"
        o = ours.swiglu_backward(x, y, dz, store_z=True)
        f = swiglu_fwdbwd(x, y, dz, use_weight=True, output_contiguous=True)
        diffs = compare(case, {"ours": dict(zip(("dx", "dy", "z"), o)), "fla": dict(zip(("dx", "dy", "z"), f))}, ref)
        del o, f, ref, ref_z
        report(case, 6 * m * d * e,
               {"ours": lambda: ours.swiglu_backward(x, y, dz, store_z=True),
                "fla": lambda: swiglu_fwdbwd(x, y, dz, use_weight=True, output_contiguous=True)}, diffs,
               {k: (lambda c=c: ours.swiglu_backward(x, y, dz, store_z=True, config=c))
                for k, c in sweep_configs(x, True)})
        del x, y, dz
        torch.cuda.empty_cache()

    # --- GLA gate: logsigmoid(x) / normalizer --------------------------------------------------------------
    g = rand(m, dg, scale=4.0).requires_grad_()
    dy = rand(m, dg)
    gf = g.detach().float()
    ref = {"y": F.logsigmoid(gf) / norm, "dx": dy.float() * torch.sigmoid(-gf) / norm}

    def torch_gate(x):
        return F.logsigmoid(x) / norm

    def ours_gate(x):
        return ours.log_sigmoid_scaled(x, norm)

    got = {}
    for impl, fn in (("ours", ours_gate), ("torch", torch_gate)):
        out = fn(g)
        (dx,) = torch.autograd.grad(out, g, dy)
        got[impl] = {"y": out.detach(), "dx": dx}
    diffs = compare("logsigmoid/normalizer", got, ref)
    with torch.no_grad():
        report("logsigmoid fwd", 2 * m * dg * e, {"ours": lambda: ours_gate(g), "torch": lambda: torch_gate(g)},
               diffs, {k: (lambda c=c: ours.log_sigmoid_scaled_forward(g.detach(), norm, config=c))
                       for k, c in sweep_configs(g, False)})
    report("logsigmoid fwd+bwd", 5 * m * dg * e,
           {impl: (lambda fn=fn: torch.autograd.grad(fn(g), g, dy)) for impl, fn in (("ours", ours_gate),
                                                                                      ("torch", torch_gate))},
           diffs)

    print("RESULT " + json.dumps({"device": torch.cuda.get_device_name(dev), "rows": m, "dim": d, "gate_dim": dg,
                                  "dtype": args.dtype, "fla": getattr(fla, "__version__", "?"),
                                  "sleep_prefill": not args.no_sleep, "results": results, "check_failed": failed}),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
