"""How far the step's memory-bound kernels are from the card's memory bandwidth, and what the share of the step
outside GEMMs and GLA's chunk kernels would be if every one of them ran at it (issue 10's "<= 15%" goal).

    python bench/roofline.py --from-trace bench/out/profile.json.gz --steps 2 \
        [--model configs/gla_340M.json --batch 16 --seq-len 2048] [--bandwidth 3.35]

Reads a Chrome trace that bench/gpu_profile.py wrote (--trace; it needs no GPU here) and, for each kernel of the
fused GLA path whose work is moving bytes (RMSNorm with its residual add, the gated output norm, SwiGLU, the
low-rank gate, AdamW, cross entropy, ...), the fewest bytes it must read and write per step at the model's shapes:
each input tensor read once, each output written once, weights and per-row statistics left out. Dividing by the
card's bandwidth gives the kernel's time at the roof; the table shows ms/step measured, ms/step at the roof and the
achieved fraction. The last lines give the outside share measured and its floor: the same step with every modeled
kernel at the roof and everything else (GEMMs, GLA chunk kernels, unmodeled kernels) as measured. A floor above a
goal says the goal needs fewer bytes moved (fusions into the GEMMs), not faster kernels.

The bandwidth (TB/s) defaults to the datasheet figure of the trace's card (deviceProperties: H100 SXM 3.35, H200
4.8, A100 80GB 2.04); pass --bandwidth for another card or a measured copy rate (a copy reaches ~90% of the sheet).
The byte counts are those of the kernels' code as it stands (models/kernels/*.py): what each kernel reads and
writes is spelled out in KERNELS below.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_profile  # noqa: E402  (bench/gpu_profile.py: the trace reader and the kernel categories)

# datasheet memory bandwidth, TB/s, by a substring of torch's device name (first match wins)
SPEC_TBPS = (("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("A100-SXM4-80GB", 2.039), ("A100 80GB", 2.039),
             ("A100", 1.555))


class Shapes(NamedTuple):
    """The step's sizes: N tokens, L layers, D hidden, F MLP width, Dk key width (the gate's output), Dv value
    width (the gated norm's rows of heads hold N x Dv values), R the gate's low rank, V vocab, P parameters, H
    heads, BT GLA's chunk length."""
    N: int
    L: int
    D: int
    F: int
    Dk: int
    Dv: int
    R: int
    V: int
    P: int
    H: int = 1
    BT: int = 64

    @property
    def states(self) -> int:
        """Bytes of GLA's chunk states kept for backward in bf16 (one [K, V] per chunk and head), or of their
        gradient."""
        return self.N // self.BT * self.H * (self.Dk // self.H) * (self.Dv // self.H) * BF16


class Kernel(NamedTuple):
    name: str  # the kernel's name in the trace (exact)
    what: str  # what it reads and writes, for the table
    bytes: Callable[[Shapes], float]  # per step: all of the step's calls together


BF16, FP32 = 2, 4
KERNELS = (
    # 2L + 1 calls: each layer's two pre-norms read the branch output and the residual and write the normed value
    # and the new residual (4 tensors); the first (the embedding, no residual) reads 1 and writes 1
    Kernel("_rms_fwd_kernel", "x + residual -> y, s", lambda s: (2 * s.L * 4 + 2) * s.N * s.D * BF16),
    # reads s, dy and the residual stream's gradient, writes ds (4 tensors); the final norm has no residual
    # gradient coming in (3)
    Kernel("_rms_bwd_kernel", "s, dy, ds_out -> ds", lambda s: (2 * s.L * 4 + 3) * s.N * s.D * BF16),
    Kernel("_gated_rmsnorm_fwd_kernel", "o, g -> y", lambda s: s.L * 3 * s.N * s.Dv * BF16),
    Kernel("_gated_rmsnorm_bwd_kernel", "o, g, dy -> do, dg", lambda s: s.L * 5 * s.N * s.Dv * BF16),
    Kernel("_swiglu_fwd_kernel", "gate, up -> z", lambda s: s.L * 3 * s.N * s.F * BF16),
    # z kept from the forward (keep_z, the default): no third output
    Kernel("_swiglu_bwd_kernel", "gate, up, dz -> dgate, dup", lambda s: s.L * 5 * s.N * s.F * BF16),
    Kernel("_gate_fwd_kernel", "a [N, R] -> logsigmoid(a W + b) [N, Dk]", lambda s: s.L * s.N * (s.R + s.Dk) * BF16),
    Kernel("_gate_bwd_kernel", "a, dy -> da", lambda s: s.L * s.N * (2 * s.R + s.Dk) * BF16),
    # FLA's fused cross entropy (the head's logits, bf16): forward reads them, backward reads them and writes their
    # gradient
    Kernel("cross_entropy_fwd_kernel", "logits -> loss", lambda s: s.N * s.V * BF16),
    Kernel("cross_entropy_bwd_kernel", "logits -> dlogits", lambda s: 2 * s.N * s.V * BF16),
)
# our GLA chunk backward kernels (models/kernels/gla.py, gla_intra.py): inside GEMM + GLA, so not in the floor; listed
# to show how far each is from the bandwidth. g (GLA's cumulative gate), the intra parts of dq, dk and the chunk
# matrices A, dA are fp32; dq, dk, dv, dg and the states bf16
INSIDE = (
    Kernel("_gla_bwd_inter_kernel", "q, k, g, v, do, h, dh, dq/dk intra -> dq, dk, dg",
           lambda s: s.L * (s.N * s.Dk * (2 + 2 + 4 + 4 + 4 + 2 + 2 + 2) + s.N * s.Dv * 4 + 2 * s.states)),
    Kernel("_gla_bwd_dv_kernel", "A, do, k, g, dh -> dv",
           lambda s: s.L * (s.N * s.H * s.BT * FP32 + s.N * s.Dv * 4 + s.N * s.Dk * 6 + s.states)),
    Kernel("_gla_bwd_intra_kernel", "q, k, g, dA -> dq, dk (fp32)",
           lambda s: s.L * (s.N * s.Dk * (2 + 2 + 4 + 4 + 4) + s.N * s.H * s.BT * FP32)),
)
# torch's fused AdamW over the fp32 masters: reads param, grad, exp_avg, exp_avg_sq, writes param and both moments
ADAMW = Kernel("AdamW (fused, fp32 masters)", "p, g, m, v -> p, m, v", lambda s: 7 * s.P * FP32)


def model_shapes(model_path: str, batch: int, seq_len: int) -> Shapes:
    """Shapes of a GLA model file, read off the model built on the meta device (no memory, no weights)."""
    from models import build
    config = build.load_config(model_path)
    model = build.build_model(config, "meta")
    layers = model.model.layers
    attn, mlp = getattr(layers[0], "attn", None), getattr(layers[0], "mlp", None)
    if not hasattr(attn, "gk_proj") or not hasattr(mlp, "gate_proj"):
        raise SystemExit(f"roofline: {model_path}: not a GLA model with a low-rank gate and a SwiGLU MLP (the fused "
                         f"path's kernels this models)")
    return Shapes(N=batch * seq_len, L=len(layers), D=config.hidden_size, F=mlp.gate_proj.weight.shape[0],
                  Dk=attn.q_proj.weight.shape[0], Dv=attn.v_proj.weight.shape[0], R=attn.gk_proj[0].weight.shape[0],
                  V=config.vocab_size, P=build.count_parameters(model), H=attn.num_heads,
                  BT=min(64, max(16, 1 << (seq_len - 1).bit_length())))


def trace_device(trace: dict) -> str | None:
    """The card's name in a torch.profiler Chrome trace (deviceProperties), or None."""
    props = trace.get("deviceProperties") or []
    return props[0].get("name") if props else None


def spec_bandwidth(device: str | None) -> float | None:
    for key, tbps in SPEC_TBPS:
        if device and key in device:
            return tbps
    return None


class Row(NamedTuple):
    name: str
    what: str
    ms: float  # measured, per step
    calls: float  # per step
    gb: float  # fewest bytes per step, GB
    roof_ms: float  # gb at the bandwidth


def rows(kernels: dict[str, tuple[float, int]], steps: int, shapes: Shapes, tbps: float,
         which: tuple[Kernel, ...] = KERNELS) -> list[Row]:
    """A Row per kernel of `which` found in `kernels` (gpu_profile.kernel_times of the trace); for KERNELS, AdamW's
    kernels summed under one row."""
    out = []
    for k in which:
        if k.name in kernels:
            us, calls = kernels[k.name]
            gb = k.bytes(shapes) / 1e9
            out.append(Row(k.name, k.what, us / 1e3 / steps, calls / steps, gb, gb / tbps))
    adam = [v for n, v in kernels.items() if gpu_profile.category(n) == "AdamW"]
    if adam and which is KERNELS:
        gb = ADAMW.bytes(shapes) / 1e9
        out.append(Row(ADAMW.name, ADAMW.what, sum(us for us, _ in adam) / 1e3 / steps,
                       sum(c for _, c in adam) / steps, gb, gb / tbps))
    return out


def report(kernels: dict[str, tuple[float, int]], steps: int, shapes: Shapes, tbps: float, device: str) -> str:
    table = rows(kernels, steps, shapes, tbps)
    total = sum(us for us, _ in kernels.values()) / 1e3 / steps
    inside = sum(us for n, (us, _) in kernels.items() if gpu_profile.category(n) in ("GEMM", "GLA chunk")) / 1e3 / steps
    outside = total - inside
    saved = sum(r.ms - min(r.ms, r.roof_ms) for r in table)
    header = (f"{'kernel':<28} {'calls':>5} {'ms/step':>8} {'GB/step':>8} {'at roof':>8} {'TB/s':>6} {'of roof':>7}  "
              f"reads -> writes")
    lines = [f"{device}: {tbps:g} TB/s; N {shapes.N} tokens, {shapes.L} layers, D {shapes.D}, F {shapes.F}, "
             f"Dk {shapes.Dk}, Dv {shapes.Dv}, R {shapes.R}, V {shapes.V}, {shapes.P / 1e6:.1f}M parameters, "
             f"{shapes.H} heads, chunk {shapes.BT}", header]
    lines += [_line(r) for r in table]
    modeled = sum(r.ms for r in table)
    lines.append(f"{'modeled, all':<28} {'':5} {modeled:8.2f} {sum(r.gb for r in table):8.2f} "
                 f"{sum(min(r.ms, r.roof_ms) for r in table):8.2f}")
    lines.append(f"kernel time {total:.2f} ms/step: GEMM + GLA chunk {inside:.2f}, outside {outside:.2f} "
                 f"({outside / total:.1%}; {outside - modeled:.2f} ms of it not modeled, kept as measured)")
    lines.append(f"floor with every modeled kernel at the roof: outside {outside - saved:.2f} ms = "
                 f"{(outside - saved) / (total - saved):.1%} of {total - saved:.2f} ms")
    over = [r.name for r in table if r.roof_ms > r.ms * 1.02]
    if over:  # faster than the bandwidth allows: the byte count (or the bandwidth) is wrong, not the kernel
        lines.append(f"WARNING: {', '.join(over)} ran faster than {tbps:g} TB/s allows for the bytes counted: its "
                     f"entry in KERNELS (what it reads and writes) or --bandwidth is wrong")
    inside = rows(kernels, steps, shapes, tbps, INSIDE)
    if inside:
        lines += ["our GLA chunk backward kernels (inside GEMM + GLA: not in the floor above)", header]
        lines += [_line(r) for r in inside]
    return "\n".join(lines)


def _line(r: Row) -> str:
    return (f"{r.name:<28} {r.calls:5.0f} {r.ms:8.2f} {r.gb:8.2f} {r.roof_ms:8.2f} {r.gb / r.ms:6.2f} "
            f"{r.roof_ms / r.ms:7.0%}  {r.what}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-trace", required=True, metavar="FILE",
                   help="a Chrome trace bench/gpu_profile.py wrote (--trace), .json or .json.gz")
    p.add_argument("--steps", type=int, required=True, help="the steps that trace profiled (its --steps)")
    p.add_argument("--model", default=os.path.join(ROOT, "configs", "gla_340M.json"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--bandwidth", type=float, default=None, metavar="TB/s",
                   help="the card's memory bandwidth (default: the datasheet figure of the trace's card)")
    args = p.parse_args()
    trace = gpu_profile.read_trace(args.from_trace)  # read once: a profile's trace runs to 100s of MB
    intervals = gpu_profile.intervals_of(trace)
    if not intervals:
        raise SystemExit(f"roofline: --from-trace {args.from_trace}: no GPU kernels in it")
    device = trace_device(trace) or "unknown card"
    tbps = args.bandwidth or spec_bandwidth(device)
    if not tbps:
        raise SystemExit(f"roofline: no datasheet bandwidth known for {device!r}: pass --bandwidth TB/s")
    shapes = model_shapes(args.model, args.batch, args.seq_len)
    print(report(gpu_profile.kernel_times(intervals), args.steps, shapes, tbps, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
