"""Where the training step's GPU time goes: a Chrome trace and a per-category table of kernel time.

    PYTHONUNBUFFERED=1 python bench/gpu_profile.py [--model configs/gla_340M.json] [--seq-len 2048]
        [--batch 16] [--precision bf16] [--kernels fused|fla] [--steps 3] [--warmup 3] [--top 25]
        [--trace bench/out/profile.json] [--lag] [--graphs] [--projections split|cat|slab] [--gated-norm fla|ours] [--dv fla|ours] [--gate fused|split]
        [--chunk ours|fla] [--keep-z yes|no] [--saved-states fp32|bf16|none] [--mulclip] [--mlp split|gemm]
    python bench/gpu_profile.py --from-trace bench/out/profile.json[.gz] --steps 3   # the tables again, no GPU

Runs the trainer's own step (trainer.loop.launch_step: the model from models.build, train.precision's path,
fused AdamW, clip 1.0, one micro-batch) on random tokens, one process, no DDP/FSDP. --kernels is
model.gpu_kernels: fused (the default, as in the trainer) rewrites the model's blocks with models.fused.install
right after the build, fla keeps FLA's modules. After --warmup steps (kernel compilation and autotuning: run
`python -m models.warm` first on a cold machine), --steps steps run under torch.profiler. Every GPU kernel is
put in one category by its name (GEMM, GLA chunk kernels (FLA's and ours), norms, SwiGLU, elementwise/copies, ...); the
table gives milliseconds per step, the share of kernel time and the GPU-busy share of the wall time. A second
table lists the --top largest kernels one by one, so what a category such as "elementwise / copies" holds is
visible without opening the trace, and a third the idle GPU time between kernels by gap length (many short gaps:
the cost of kernel boundaries; long ones: the host not keeping up). --lag runs the steps as the trainer's loop
does, each step's loss read after the next step is launched; --graphs replays the forward + backward as CUDA graphs
(train.cuda_graphs). A fourth table names the kernels that ended the long gaps (>= 20 us: the part of the step
where the GPU waited, and the kernel before them), and the host's median time inside launch_step is printed against
the step's. The trace opens in chrome://tracing or https://ui.perfetto.dev.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# First match wins: (category, substrings of the lower-cased kernel name)
CATEGORIES = [
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "wgmma")),
    # FLA's norm kernels and ours (models/kernels/rmsnorm.py: names hold "rmsnorm"); before the GLA keys so
    # that a fused norm of ours named after the block it serves still counts as a norm
    ("norms", ("rmsnorm", "_rms_", "layer_norm", "rms_norm", "layernorm", "norm_fwd", "norm_bwd", "norm_gate")),
    # FLA's chunk kernels and ours that replace some of them (models/kernels/gla*.py: named _gla_*_kernel since
    # 2026-12-07; traces written before carry _bwd_intra_kernel, _bwd_inter_kernel, _fwd_intra_kernel)
    ("GLA chunk", ("chunk", "gla", "cumsum", "fused_recurrent", "_bwd_intra_kernel", "_bwd_inter_kernel",
                   "_fwd_intra_kernel")),
    ("SwiGLU", ("swiglu", "swish")),
    ("GLA gate logsigmoid (ours)", ("_logsig_", "_gate_fwd_kernel", "_gate_bwd_kernel")),
    # not "ce_": PyTorch's reduce_kernel (sums, the grad norm) holds it
    ("cross entropy", ("cross_entropy", "crossentropy", "logsumexp", "nll_loss", "softmax")),
    ("AdamW", ("adam",)),
    ("grad norm / clip", ("norm", "clamp")),
    ("NCCL", ("nccl",)),
    ("elementwise / copies", ("elementwise", "copy", "cast", "fill", "vectorized", "reduce", "cat", "index",
                              "memcpy", "memset", "embedding", "foreach")),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def is_annotation(name: str) -> bool:
    """Whether a GPU-side event is a user-annotation range (torch.optim's `Optimizer.step#AdamW.step`, which spans
    kernels counted already), not a kernel. Kernel names hold '#' too (`...::{lambda()#1}...`, e.g. every dtype
    cast), but always within a signature's parentheses; the annotations have none."""
    return "#" in name and "(" not in name


def kernel_times(intervals: list[tuple[float, float, str]]) -> dict[str, tuple[float, int]]:
    """{kernel name: (total microseconds, calls)} of kernel_intervals' or trace_intervals' kernels and memory ops."""
    out: dict[str, list] = {}
    for start, stop, name in intervals:
        rec = out.setdefault(name, [0.0, 0])
        rec[0] += stop - start
        rec[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def kernel_intervals(prof) -> list[tuple[float, float, str]]:
    """(start, end, name), start and end in microseconds, of every GPU kernel and memory op in a profile. GPU-side
    ranges of user annotations (Optimizer.step#AdamW.step, ...) span kernels counted already and are left out."""
    from torch.autograd import DeviceType
    return [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            and not is_annotation(e.name)]


TRACE_GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def read_trace(path: str) -> dict:
    """A Chrome trace this script (torch.profiler's export_chrome_trace) wrote, .json or .json.gz, as loaded JSON."""
    import gzip
    import json
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
            trace = json.load(f)
        trace["traceEvents"]  # noqa: B018  (a JSON file without it is not a trace)
        return trace
    except FileNotFoundError:
        raise SystemExit(f"gpu_profile: --from-trace {path}: no such file (give the --trace file of an earlier run)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"gpu_profile: --from-trace {path}: not a Chrome trace of torch.profiler ({e}); give the "
                         f"--trace file of an earlier run, .json or .json.gz")


def intervals_of(trace: dict) -> list[tuple[float, float, str]]:
    """kernel_intervals of a read_trace trace: its events of category kernel, gpu_memcpy and gpu_memset
    (gpu_user_annotation ranges are not kernels)."""
    return [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in trace["traceEvents"]
            if e.get("ph") == "X" and e.get("cat") in TRACE_GPU_CATS and not is_annotation(e["name"])]


def trace_intervals(path: str) -> list[tuple[float, float, str]]:
    """kernel_intervals of the Chrome trace at `path` (read_trace, then intervals_of)."""
    return intervals_of(read_trace(path))


def report(intervals: list[tuple[float, float, str]], steps: int, wall_s: float, top: int) -> str:
    """The tables: categories, idle gaps by length, the kernels after the long gaps, and the `top` largest kernels."""
    kt = kernel_times(intervals)
    parts = [table(kt, steps, wall_s), gap_table(idle_gaps(intervals), steps),
             gaps_before_table(gaps_before(intervals), steps)]
    if top > 0:
        parts.append(top_kernels(kt, steps, top))
    return "\n".join(parts)


GAP_EDGES_US = (5.0, 20.0, 100.0, 1000.0)


def idle_gaps(intervals: list[tuple[float, float]], edges=GAP_EDGES_US) -> list[tuple[str, int, float]]:
    """Where the GPU ran no kernel between the first kernel's start and the last one's end: the gaps between the
    merged busy intervals, bucketed by length. [(bucket label, gaps, total microseconds)], buckets in `edges`
    order (< edges[0], edges[0]..edges[1], ..., >= edges[-1]). Many short gaps are the cost of kernel boundaries
    (a kernel's tail and the next one's start, fewer kernels is the cure); long ones are the host not keeping up."""
    labels = [f"< {edges[0]:g} us"] + [f"{a:g}-{b:g} us" for a, b in zip(edges, edges[1:])] + [f">= {edges[-1]:g} us"]
    counts, totals = [0] * len(labels), [0.0] * len(labels)
    end = None
    for start, stop, *_ in sorted(intervals):
        if end is not None and start > end:
            gap = start - end
            i = sum(gap >= e for e in edges)
            counts[i] += 1
            totals[i] += gap
        end = stop if end is None else max(end, stop)
    return list(zip(labels, counts, totals))


def gaps_before(intervals: list[tuple[float, float, str]], min_us: float = 20.0) -> list[tuple[str, int, float]]:
    """The idle gaps of at least `min_us` by the kernel that ends each one (the kernel the GPU waited for: where the
    host was late launching it, that names the part of the step it was in) and the one that ended last before it.
    [("category: name  (after: name of the kernel before)", gaps, total microseconds)], largest total first."""
    out: dict[str, list] = {}
    end, last = None, None
    for start, stop, name in sorted(intervals):
        if end is not None and start - end >= min_us:
            key = f"{category(name)}: {' '.join(name.split())[:60]}  (after: {' '.join(last.split())[:60]})"
            rec = out.setdefault(key, [0, 0.0])
            rec[0] += 1
            rec[1] += start - end
        if end is None or stop >= end:
            end, last = stop, name
    return sorted(((k, n, t) for k, (n, t) in out.items()), key=lambda r: -r[2])


def gaps_before_table(rows: list[tuple[str, int, float]], steps: int, count: int = 12, width: int = 150,
                      min_us: float = 20.0) -> str:
    """gaps_before's rows (gaps of at least min_us) as a table: ms and gaps per step, the kernels around them."""
    lines = [f"idle gaps >= {min_us:g} us by the kernel that ended them (top {count})",
             f"{'ms/step':>8} {'gaps/step':>9}  kernel after the gap"]
    for key, n, total in rows[:count]:
        lines.append(f"{total / 1e3 / steps:8.2f} {n / steps:9.1f}  {key[:width]}")
    return "\n".join(lines)


def gap_table(gaps: list[tuple[str, int, float]], steps: int) -> str:
    lines = ["idle GPU between kernels  gaps/step   ms/step"]
    for label, n, total in gaps:
        lines.append(f"{label:<24} {n / steps:>10.1f} {total / 1e3 / steps:>9.2f}")
    n_all, t_all = sum(g[1] for g in gaps), sum(g[2] for g in gaps)
    lines.append(f"{'all':<24} {n_all / steps:>10.1f} {t_all / 1e3 / steps:>9.2f}")
    return "\n".join(lines)


def table(kernels: dict[str, tuple[float, int]], steps: int, wall_s: float) -> str:
    cats: dict[str, list] = {}
    for name, (us, calls) in kernels.items():
        rec = cats.setdefault(category(name), [0.0, 0, []])
        rec[0] += us
        rec[1] += calls
        rec[2].append((us, name))
    total = sum(v[0] for v in cats.values())
    lines = [f"{'category':<22} {'ms/step':>9} {'share':>7} {'calls/step':>10}  top kernel"]
    for cat, (us, calls, names) in sorted(cats.items(), key=lambda kv: -kv[1][0]):
        top = max(names)[1][:60]
        lines.append(f"{cat:<22} {us / 1e3 / steps:9.2f} {us / total:7.1%} {calls / steps:10.0f}  {top}")
    busy = total / 1e6 / wall_s if wall_s else 0.0
    lines.append(f"{'kernels, all':<22} {total / 1e3 / steps:9.2f} {1:7.1%}  wall {wall_s / steps * 1e3:.1f} ms/step, "
                 f"GPU busy {busy:.0%} of the wall time")
    outside = sum(v[0] for c, v in cats.items() if c not in ("GEMM", "GLA chunk"))
    lines.append(f"outside GEMM + GLA chunk kernels: {outside / 1e3 / steps:.2f} ms/step = {outside / total:.1%} "
                 f"of kernel time")
    return "\n".join(lines)


def top_kernels(kernels: dict[str, tuple[float, int]], steps: int, count: int = 25, width: int = 80) -> str:
    """The `count` kernels with the most GPU time: ms and calls per step, category, name cut to `width`."""
    total = sum(us for us, _ in kernels.values()) or 1.0
    lines = [f"top {count} kernels", f"{'ms/step':>8} {'share':>6} {'calls/step':>10}  {'category':<20}  kernel"]
    for name, (us, calls) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:count]:
        lines.append(f"{us / 1e3 / steps:8.2f} {us / total:6.1%} {calls / steps:10.1f}  {category(name):<20}  "
                     f"{' '.join(name.split())[:width]}")
    return "\n".join(lines)


def norm_bwd_config(text: str):
    """"BT,WARPS,PER_SM,PREFETCH" (PREFETCH 0/1) -> models.kernels.rmsnorm.BackwardConfig."""
    from models.kernels.rmsnorm import parse_backward_config
    try:
        return parse_backward_config(text)
    except ValueError as e:
        raise SystemExit(f"gpu_profile: --norm-bwd: {e}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "configs", "gla_340M.json"))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", default="bf16", choices=["bf16", "autocast", "fp32"])
    p.add_argument("--kernels", default="fused", choices=["fused", "fla"],
                   help="model.gpu_kernels: fused (models.fused.install after the build) or fla (FLA's modules)")
    p.add_argument("--swiglu", default=None, choices=["fla", "ours"],
                   help="with --kernels fused: SwiGLU + gate kernels of FLA/torch or ours (default: models.fused's)")
    p.add_argument("--gate", default=None, choices=["fused", "split"],
                   help="with --kernels fused: GLA's low-rank gate as one kernel (models/kernels/gate.py) or a GEMM and "
                        "a logsigmoid kernel (default: models.fused's)")
    p.add_argument("--chunk", default=None, choices=["ours", "fla"],
                   help="with --kernels fused: GLA's chunked attention through models/kernels/gla.py or FLA's "
                        "chunk_gla (default: models.fused's)")
    p.add_argument("--keep-z", default=None, choices=["yes", "no"],
                   help="with --kernels fused: keep the SwiGLU product from forward for backward (default: "
                        "models.fused's)")
    p.add_argument("--saved-states", default=None, choices=["fp32", "bf16", "none"],
                   help="with --chunk ours: what models/kernels/gla.py's forward keeps of GLA's states for backward "
                        "(default: its SAVED_STATES)")
    p.add_argument("--mulclip", action="store_true",
                   help="clip with clip_grad_norm_ before the fused AdamW step (the loop until 2026-12-06) instead of "
                        "the step's grad_scale divisor")
    p.add_argument("--projections", default=None, choices=["split", "cat", "slab"],
                   help="with --kernels fused: the attention's input projections as one GEMM each (split), one "
                        "GEMM over the stacked weights (cat), or one GEMM each forward and one over their stacked "
                        "gradient backward (slab) (default: models.fused's)")
    p.add_argument("--dv", default=None, choices=["fla", "ours"],
                   help="with --kernels fused: the chunk backward's dv kernel, FLA's or models/kernels/gla.py's "
                        "(default: its DV)")
    p.add_argument("--gated-norm", default=None, choices=["fla", "ours"],
                   help="with --kernels fused: GLA's gated output norm by FLA's module or models/kernels/gated_norm.py "
                        "(default: models.fused's)")
    p.add_argument("--mlp", default=None, choices=["split", "gemm"],
                   help="with --kernels fused: the MLP's gate/up GEMMs then SwiGLU kernels (split), or SwiGLU in the GEMMs' "
                        "epilogues (gemm, models/kernels/mlp_gemm.py; its kernels count as GEMM) (default: models.fused's)")
    p.add_argument("--norm-bwd", default=None, metavar="BT,WARPS,PER_SM,PREFETCH",
                   help="launch our RMSNorm backward this way (models.kernels.rmsnorm.BackwardConfig, e.g. 2,4,8,1; "
                        "bench/norm_bench.py --bwd-sweep times them) instead of its default")
    p.add_argument("--lag", action="store_true",
                   help="run the steps as the trainer's loop does: each step's loss read after the next step is "
                        "launched (trainer.loop.launch_step); timed: the wall time of all timed steps / their count")
    p.add_argument("--graphs", action="store_true",
                   help="the step's forward + backward as CUDA graphs (train.cuda_graphs; needs --precision bf16)")
    p.add_argument("--timed", type=int, default=10, help="unprofiled steps timed after the warm-up (median printed)")
    p.add_argument("--top", type=int, default=25, help="kernels listed one by one after the category table")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--trace", default=os.path.join(ROOT, "bench", "out", "profile.json"))
    p.add_argument("--from-trace", default=None, metavar="FILE",
                   help="no GPU run: print the tables of a trace an earlier run wrote (.json or .json.gz; give its "
                        "--steps); the wall time is then the span from its first kernel's start to its last one's end")
    args = p.parse_args()
    if args.from_trace:
        intervals = trace_intervals(args.from_trace)
        if not intervals:
            raise SystemExit(f"gpu_profile: --from-trace {args.from_trace}: no GPU kernels in it")
        span = (max(i[1] for i in intervals) - min(i[0] for i in intervals)) / 1e6
        print(f"{args.from_trace}: {len(intervals)} kernels and memory ops, {args.steps} steps, wall = GPU span")
        print(report(intervals, args.steps, span, args.top))
        return 0
    import torch
    from torch.profiler import ProfilerActivity, profile

    from models import build
    from models.warm import install_kernels
    from trainer.config import OptimConfig
    from trainer.loop import launch_step
    from trainer.optim import build_optimizer
    from trainer.parallel import Dist
    from trainer.precision import MasterWeights, Precision
    if not torch.cuda.is_available():
        print("gpu_profile: no CUDA device (this profiles GPU kernels)", file=sys.stderr)
        return 2
    if args.norm_bwd:
        from models.kernels import rmsnorm
        cfg = norm_bwd_config(args.norm_bwd)
        rmsnorm.backward_config = lambda d: cfg  # this process only: every norm of the step launches this way
        print(f"gpu_profile: RMSNorm backward launched as {cfg}", flush=True)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    config = build.load_config(args.model)
    build.adapt_to_device(config, device)
    model = build.build_model(config, device, seed=0)
    if args.mulclip:
        import trainer.loop
        trainer.loop.CLIP_IN_STEP = False
    if args.saved_states:
        from models.kernels import gla
        gla.SAVED_STATES = args.saved_states
    if args.dv:
        from models.kernels import gla
        gla.DV = args.dv
    options = (("swiglu", args.swiglu), ("projections", args.projections), ("gate", args.gate), ("chunk", args.chunk),
               ("keep_z", {"yes": True, "no": False}.get(args.keep_z)), ("mlp", args.mlp),
               ("gated_norm", args.gated_norm))
    if any(v is not None for _, v in options) and args.kernels == "fused":
        from models import fused
        choice = {k: v for k, v in options if v is not None}
        kernels = fused.install(model, **choice)
    else:
        kernels = install_kernels(model, args.kernels)  # before the bf16 copies and the optimizer see the parameters
    model.train()
    prec = MasterWeights(model, device) if args.precision == "bf16" else Precision(args.precision, device)
    opt = build_optimizer(model, OptimConfig(), device)
    d = Dist(device=device)
    gen = torch.Generator().manual_seed(0)
    graphs = None
    if args.graphs:
        if args.precision != "bf16":
            raise SystemExit("gpu_profile: --graphs needs --precision bf16 (train.cuda_graphs replays over "
                             "MasterWeights' bf16 copies)")
        from trainer.graphs import GraphedSteps
        graphs = GraphedSteps(model, prec, device)
    host = []  # the host's time inside launch(): queueing one step's work

    def launch():
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=gen)
        t = time.perf_counter()
        pending = launch_step(model, opt, ids, None, args.batch, 1.0, 3e-4, d, prec, graphs)
        host.append(time.perf_counter() - t)
        return pending

    def steps(n: int) -> None:
        """n steps, each read at once, or (--lag) after the next one is launched; then the GPU drained."""
        pending = None
        for _ in range(n):
            launched = launch()
            if args.lag:
                if pending is not None:
                    pending.result()
                pending = launched
            else:
                launched.result()
        if pending is not None:
            pending.result()
        torch.cuda.synchronize()

    for i in range(args.warmup):
        t = time.perf_counter()
        steps(1)
        print(f"warm-up step {i}: {time.perf_counter() - t:.3f}s", file=sys.stderr, flush=True)
    host.clear()
    if args.timed and args.lag:
        t = time.perf_counter()
        steps(args.timed)
        med = (time.perf_counter() - t) / args.timed
        what = f"mean step {med * 1e3:.1f} ms over {args.timed} unprofiled steps, each read after the next's launch"
    elif args.timed:
        times = []
        for _ in range(args.timed):
            t = time.perf_counter()
            steps(1)
            times.append(time.perf_counter() - t)
        med = sorted(times)[len(times) // 2]
        what = f"median step {med * 1e3:.1f} ms over {len(times)} unprofiled steps"
    if args.timed:
        host_ms = sorted(host)[len(host) // 2] * 1e3
        print(f"host: median {host_ms:.1f} ms inside launch_step, {host_ms / (med * 1e3):.0%} of the step (its Python "
              f"and launches, and any wait for room in CUDA's launch queue; near 100% either way where the GPU or "
              f"the host paces the step: the idle-gap tables tell which)", flush=True)
        print(f"timed: {what}, {args.batch * args.seq_len / med:,.0f} tokens/s ({args.kernels}"
              f"{', swiglu ' + args.swiglu if args.swiglu else ''}"
              f"{', projections ' + args.projections if args.projections else ''}"
              f"{', gate ' + args.gate if args.gate else ''}{', chunk ' + args.chunk if args.chunk else ''}"
              f"{', clip_grad_norm_' if args.mulclip else ''}{', keep z ' + args.keep_z if args.keep_z else ''}"
              f"{', saved states ' + args.saved_states if args.saved_states else ''}"
              f"{', CUDA graphs' if args.graphs else ''})", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        t = time.perf_counter()
        steps(args.steps)
        wall = time.perf_counter() - t
    os.makedirs(os.path.dirname(os.path.abspath(args.trace)), exist_ok=True)
    prof.export_chrome_trace(args.trace)
    print(f"{os.path.basename(args.model)} batch {args.batch} x {args.seq_len}, precision {args.precision}, "
          f"kernels {args.kernels} ({kernels}), {args.steps} profiled steps, "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; "
          f"trace {args.trace}")
    print(report(kernel_intervals(prof), args.steps, wall, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
