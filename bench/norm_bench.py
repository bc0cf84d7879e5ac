"""GPU micro-benchmark of RMSNorm: ours (models/kernels/rmsnorm.py) vs FLA's `fla.modules.norm.layernorm.rms_norm`.

    python bench/norm_bench.py [--rows 32768] [--dim 1024] [--dtype bf16] [--weight-dtype fp32] [--iters 50]

Why: FLA 0.6.0's backward for D > 512 walks rows one at a time (0.31 ms per [32768, 1024] bf16 call on an H200,
~5x what memory bandwidth allows); see the docstring of models/kernels/rmsnorm.py.

Two cases: with a residual and prenorm=True (returns y and the new residual stream s), and without a residual.
For each: forward alone and forward + backward (dx, dresidual, dweight; inputs require grad as in training),
timed with torch.cuda.Event around --batch calls, --iters times after --warmup, median reported per call. Before
each timed batch the GPU is held by torch.cuda._sleep so that the CPU queues the whole batch first: the numbers are
GPU time, not Python/launch overhead (--no-sleep to include that). Effective GB/s = the bytes the operation must
move at minimum (the same for both implementations) / time:
    forward:  x (+ residual) read, y (+ s) written, rstd (4 bytes per row) written
    backward: x or s, dy (+ ds) read, dx written, rstd read      (dresidual is dx itself, weight is negligible)
Before timing, both run once on the same inputs and output gradients and are compared with each other and with
the plain-PyTorch fp32-math reference: max |difference| per tensor. A tensor of ours further from the reference than
2x FLA's (+ 1e-3 of its largest value) is marked CHECK and the exit status is 1.
Prints a table and one JSON line (RESULT {...}). Exit status 2 without CUDA.

--bwd-sweep times our backward kernel alone (the prenorm case: s, dy and the gradient of s in, ds out) under each
launch configuration of a grid (rows per tile, warps per program, programs per SM, next tile loaded ahead or not;
models.kernels.rmsnorm.BackwardConfig), checks each against the default's ds bit for bit, and prints them fastest
first with one JSON line (SWEEP {...}); then exits without the comparison above.

--gated-bwd-sweep does the same for GLA's gated output norm (models/kernels/gated_norm.py), whose backward launches
as the RMSNorm's default for its head dimension (tuned at D = 1024; GLA 340M's heads are 256 wide): --rows tokens of
--dim values in --heads heads (rows of D = dim / heads), dg written into a column block of a [tokens, --slab-width]
gradient at --slab-offset, as in GLA 340M's step (models/fused.py's slab: q 512, k 512, v 1024, g 1024, gate 16).
dx and dg are checked bit for bit against the default's (GATED_SWEEP {...}).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32768, help="rows (batch x sequence length)")
    p.add_argument("--dim", type=int, default=1024, help="hidden size D")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="x, residual, y, s")
    p.add_argument("--weight-dtype", choices=DTYPES, default="fp32", help="the norm weight (fp32 master weights)")
    p.add_argument("--eps", type=float, default=1e-6)
    p.add_argument("--iters", type=int, default=50, help="timed batches; the median is reported")
    p.add_argument("--batch", type=int, default=10, help="calls per timed batch")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first (FLA autotunes on its first call)")
    p.add_argument("--impls", default="ours,fla", help="comma-separated: ours, fla")
    p.add_argument("--no-sleep", action="store_true", help="do not pre-fill the launch queue (include CPU overhead)")
    p.add_argument("--bwd-sweep", action="store_true", help="time launch configurations of our backward kernel")
    p.add_argument("--gated-bwd-sweep", action="store_true",
                   help="time launch configurations of the gated output norm's backward kernel")
    p.add_argument("--heads", type=int, default=4, help="--gated-bwd-sweep: heads over --dim")
    p.add_argument("--slab-width", type=int, default=3088, help="--gated-bwd-sweep: the gradient dg is a block of")
    p.add_argument("--slab-offset", type=int, default=2048, help="--gated-bwd-sweep: dg's first column in it")
    args = p.parse_args()

    import torch
    if not torch.cuda.is_available():
        print("norm_bench: no CUDA device; this benchmark needs a GPU (run it on the GPU machine)", file=sys.stderr)
        return 2
    import triton

    from models.kernels.rmsnorm import rms_norm, rms_norm_reference
    impls = {"ours": lambda x, w, r, pre: rms_norm(x, w, eps=args.eps, residual=r, prenorm=pre)}
    wanted = args.impls.split(",")
    fla_version = None
    if "fla" in wanted:
        import fla
        from fla.modules.norm.layernorm import rms_norm as fla_rms_norm
        fla_version = getattr(fla, "__version__", "?")
        impls["fla"] = lambda x, w, r, pre: fla_rms_norm(x, w, None, residual=r, eps=args.eps, prenorm=pre)
    impls = {k: v for k, v in impls.items() if k in wanted}

    dev = torch.device("cuda")
    dtype, wdtype = getattr(torch, DTYPES[args.dtype]), getattr(torch, DTYPES[args.weight_dtype])
    m, d = args.rows, args.dim
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, d, device=dev, generator=g).to(dtype).requires_grad_()
    r = torch.randn(m, d, device=dev, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(d, device=dev, generator=g)).to(wdtype).requires_grad_()
    dy = torch.randn(m, d, device=dev, generator=g).to(dtype)
    ds = torch.randn(m, d, device=dev, generator=g).to(dtype)
    e = x.element_size()
    n = m * d

    def call(impl, residual, backward):
        pre = residual
        out = impls[impl](x, w, r if residual else None, pre)
        if not backward:
            return out
        outs, grads = ((out[0], out[1]), (dy, ds)) if pre else ((out,), (dy,))
        inputs = (x, r, w) if residual else (x, w)
        return outs, torch.autograd.grad(outs, inputs, grads)

    from cuda_timing import median_ms

    def timed(fn) -> float:
        return median_ms(fn, args.warmup, args.iters, args.batch, sleep=not args.no_sleep)

    if args.bwd_sweep:
        return bwd_sweep(args, x, w, r, dy, ds, timed)
    if args.gated_bwd_sweep:
        return gated_bwd_sweep(args, timed)

    print(f"device {torch.cuda.get_device_name(dev)}  torch {torch.__version__}  triton {triton.__version__}  "
          f"fla {fla_version}  x [{m}, {d}] {args.dtype}  weight {args.weight_dtype}")
    results, failed = [], False
    for residual in (True, False):
        case = "residual+prenorm" if residual else "no residual"
        fwd_bytes = (4 if residual else 2) * n * e + 4 * m
        bwd_bytes = (4 if residual else 3) * n * e + 4 * m

        # Correctness: each implementation vs the reference (same inputs, same output gradients), and vs each other.
        got = {}
        for impl in impls:
            outs, grads = call(impl, residual, backward=True)
            got[impl] = dict(zip(["y", "s"] if residual else ["y"], (o.detach() for o in outs)))
            got[impl].update(zip(["dx", "dres", "dw"] if residual else ["dx", "dw"], grads))
        xr, rr, wr = (t.detach().clone().requires_grad_() for t in (x, r, w))
        out = rms_norm_reference(xr, wr, eps=args.eps, residual=rr if residual else None, prenorm=residual)
        outs, grads = ((out[0], out[1]), (dy, ds)) if residual else ((out,), (dy,))
        torch.autograd.backward(outs, grads)
        ref = dict(zip(["y", "s"] if residual else ["y"], (o.detach() for o in outs)))
        ref.update({"dx": xr.grad, "dw": wr.grad, **({"dres": rr.grad} if residual else {})})
        print(f"\n[{case}] max |difference| per tensor")
        diffs = {}
        for name in ref:
            row = {impl: (got[impl][name].float() - ref[name].float()).abs().max().item() for impl in impls}
            if len(impls) == 2:
                row["ours-fla"] = (got["ours"][name].float() - got["fla"][name].float()).abs().max().item()
            flag = ""
            if "ours" in row and "fla" in row and row["ours"] > 2 * row["fla"] + 1e-3 * ref[name].abs().max().item():
                flag, failed = "  CHECK", True
            diffs[name] = row
            print(f"  {name:5s} " + "  ".join(f"{k + ' vs ref' if k in impls else k}: {v:.3g}" for k, v in row.items())
                  + flag)

        print(f"[{case}] time per call (ms) and effective GB/s")
        for impl in impls:
            t_f = timed(lambda: call(impl, residual, backward=False))
            t_fb = timed(lambda: call(impl, residual, backward=True))
            t_b = t_fb - t_f
            rec = {"case": case, "impl": impl, "fwd_ms": t_f, "fwd_bwd_ms": t_fb, "bwd_ms_derived": t_b,
                   "fwd_GBps": fwd_bytes / t_f / 1e6, "fwd_bwd_GBps": (fwd_bytes + bwd_bytes) / t_fb / 1e6,
                   "bwd_GBps_derived": bwd_bytes / t_b / 1e6 if t_b > 0 else None, "max_abs_diff": diffs}
            results.append(rec)
            print(f"  {impl:5s} fwd {t_f:.4f} ms ({rec['fwd_GBps']:.0f} GB/s)   fwd+bwd {t_fb:.4f} ms "
                  f"({rec['fwd_bwd_GBps']:.0f} GB/s)   bwd (difference) {t_b:.4f} ms"
                  + (f" ({rec['bwd_GBps_derived']:.0f} GB/s)" if t_b > 0 else ""))

    print("RESULT " + json.dumps({"device": torch.cuda.get_device_name(dev), "rows": m, "dim": d,
                                  "dtype": args.dtype, "weight_dtype": args.weight_dtype, "fla": fla_version,
                                  "sleep_prefill": not args.no_sleep, "results": results, "check_failed": failed}),
          flush=True)
    return 1 if failed else 0


def bwd_sweep(args, x, w, r, dy, dso, timed) -> int:
    """Our backward kernel alone under a grid of launch configurations (see the module doc)."""
    import torch

    from models.kernels import rmsnorm
    m, d = x.shape
    s2 = (x.detach().float() + r.detach().float()).to(x.dtype)
    rstd = torch.rsqrt(s2.float().pow(2).mean(-1) + args.eps)
    w32 = w.detach()
    nbytes = 4 * m * d * x.element_size() + 4 * m  # s, dy, dso read, ds written, rstd read
    default = rmsnorm.backward_config(d)
    ref_ds, _ = rmsnorm._backward(s2, w32, rstd, dy, dso, config=default)
    configs = launch_grid(d, default)
    rows = []
    for c in configs:
        try:
            got, _ = rmsnorm._backward(s2, w32, rstd, dy, dso, config=c)
            same = bool(torch.equal(got, ref_ds))
            t = timed(lambda: rmsnorm._backward(s2, w32, rstd, dy, dso, config=c))
        except Exception as e:  # out of registers / shared memory: say so and go on
            print(f"  {c}: failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        rows.append({"config": c._asdict(), "ms": t, "GBps": nbytes / t / 1e6, "same_ds": same,
                     "default": c == default})
    rows.sort(key=lambda rec: rec["ms"])
    print(f"backward of the prenorm case, [{m}, {d}] {args.dtype}: {len(rows)} launch configurations, fastest first")
    for rec in rows:
        c = rec["config"]
        print(f"  bt {c['bt']:2d} warps {c['num_warps']:2d} per_sm {c['per_sm']:2d} prefetch {c['prefetch']!s:5}  "
              f"{rec['ms']:.4f} ms  {rec['GBps']:6.0f} GB/s{'  <- default' if rec['default'] else ''}"
              f"{'' if rec['same_ds'] else '  DIFFERENT ds'}")
    print("SWEEP " + json.dumps({"device": torch.cuda.get_device_name(), "rows": m, "dim": d, "dtype": args.dtype,
                                 "results": rows}), flush=True)
    return 0 if all(rec["same_ds"] for rec in rows) else 1


def launch_grid(d: int, default, bts=(1, 2, 4, 8, 16), caps: bool = False) -> list:
    """The default first, then every (rows per tile, warps, programs per SM, prefetch) with 4 to 32 elements of a tile
    per thread and at most 64 warps per SM. caps: also each with more than 8 warps per SM under the register cap that
    lets all its programs share an SM (65536 registers / its threads, a multiple of 8, if at least 64)."""
    from models.kernels.rmsnorm import BackwardConfig
    configs = [default]
    for bt in bts:
        for warps in (2, 4, 8, 16):
            per_thread = bt * triton_next_pow2(d) // (32 * warps)
            if not 4 <= per_thread <= 32:
                continue
            for per_sm in (1, 2, 4, 8, 16):
                if warps * per_sm > 64:
                    continue
                cap = min(255, 65536 // (32 * warps * per_sm)) // 8 * 8
                for prefetch in (False, True):
                    for maxnreg in (0, cap) if caps and warps * per_sm > 8 and cap >= 64 else (0,):
                        c = BackwardConfig(bt, warps, per_sm, prefetch, maxnreg)
                        if c != default:
                            configs.append(c)
    return configs


def gated_bwd_sweep(args, timed, device: str = "cuda") -> int:
    """The gated output norm's backward kernel alone under the launch grid (see the module doc). device "cpu": the
    Triton interpreter, for the tests (timed is then theirs)."""
    import torch

    from models.kernels import gated_norm, rmsnorm
    heads, dim = args.heads, args.dim
    if dim % heads or args.slab_offset + dim > args.slab_width:
        raise SystemExit(f"norm_bench: --dim {dim} must split into --heads {heads} and fit the slab "
                         f"(--slab-offset {args.slab_offset} + dim <= --slab-width {args.slab_width})")
    d, m = dim // heads, args.rows * heads
    dtype = getattr(torch, DTYPES[args.dtype])
    gen = torch.Generator(device=device).manual_seed(0)
    x2, g2, dy2 = (torch.randn(m, d, device=device, generator=gen).to(dtype) for _ in range(3))
    w = (1 + 0.1 * torch.randn(d, device=device, generator=gen)).to(getattr(torch, DTYPES[args.weight_dtype]))
    rstd = torch.rsqrt(x2.float().pow(2).mean(-1) + args.eps)
    slab = torch.empty(args.rows, args.slab_width, device=device, dtype=dtype)
    dg_out = slab[:, args.slab_offset:args.slab_offset + dim].view(args.rows, heads, d)
    nbytes = 5 * m * d * x2.element_size() + 4 * m  # x, g, dy read, dx, dg written, rstd read
    default = rmsnorm.backward_config(d)
    ref_dx, _, _ = gated_norm._backward(x2, g2, w, rstd, dy2, dg_out, config=default)
    ref_dg = dg_out.clone()
    rows = []
    for c in launch_grid(d, default, bts=(1, 2, 4, 8, 16, 32), caps=True):
        try:
            dg_out.fill_(float("nan"))
            dx, _, _ = gated_norm._backward(x2, g2, w, rstd, dy2, dg_out, config=c)
            same = bool(torch.equal(dx, ref_dx) and torch.equal(dg_out, ref_dg))
            t = timed(lambda: gated_norm._backward(x2, g2, w, rstd, dy2, dg_out, config=c))
        except Exception as e:  # out of registers / shared memory: say so and go on
            print(f"  {c}: failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        rows.append({"config": c._asdict(), "ms": t, "GBps": nbytes / t / 1e6, "same": same, "default": c == default})
    rows.sort(key=lambda rec: rec["ms"])
    print(f"gated norm backward, {args.rows} tokens x {heads} heads x {d} {args.dtype}, dg into a slab of "
          f"{args.slab_width}: {len(rows)} launch configurations, fastest first")
    for rec in rows:
        c = rec["config"]
        print(f"  bt {c['bt']:2d} warps {c['num_warps']:2d} per_sm {c['per_sm']:2d} prefetch {c['prefetch']!s:5} "
              f"maxnreg {c['maxnreg'] or '-':>3}  {rec['ms']:.4f} ms  {rec['GBps']:6.0f} GB/s"
              f"{'  <- default' if rec['default'] else ''}{'' if rec['same'] else '  DIFFERENT dx or dg'}")
    print("GATED_SWEEP " + json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else device,
                                       "tokens": args.rows, "heads": heads,
                                       "dim": d, "dtype": args.dtype, "results": rows}), flush=True)
    return 0 if all(rec["same"] for rec in rows) else 1


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


if __name__ == "__main__":
    sys.exit(main())
