"""GPU check and timing of models/kernels/gla.py (chunk_gla over FLA's kernels) and models/kernels/gate.py (the
low-rank gate) against what they replace, at GLA 340M's shapes.

    python bench/gla_check.py [--batch 16] [--seq-len 2048] [--heads 4] [--key-dim 256] [--value-dim 256]
        [--gate-dim 512] [--rank 16] [--iters 15] [--model configs/gla_340M.json] [--no-model] [--sweep]

chunk   ours vs FLA's `chunk_gla(..., state_v_first=True)` on bf16 inputs, for each of gla.STATE_CHOICES (what the
        forward keeps for the backward): o, dq, dk, dv, dg compared bit for bit (ours writes dq, dk, dg in bf16 from
        the same fp32 registers FLA casts afterwards; dg may differ by one bf16 ulp, and with saved_states=bf16, whose
        sum(h * dh) reads bf16 states, it is reported, not judged), the time of forward + backward and the memory the forward keeps. FLA against itself
        first: where its own two runs differ (atomics), only that much difference is expected of ours.
gate    ours (one kernel each way) vs the split path it replaces (F.linear with bias, then our logsigmoid kernel),
        both against float64 math on the same bf16 inputs: max |error| / max |exact| of gk, da, dW, db; ours with
        gate.LOG "approx" as well (lg2.approx), and the forward alone timed with each LOG.
model   one forward + backward of the model (--model, fused blocks, bf16 weights) with the new defaults against
        gate="split", chunk="fla" on the same tokens: loss and the largest relative gradient difference.
slab    (only with --only slab) the model's bf16 gradients with projections="slab" (one gradient for the five
        attention projections, models/fused.py) and with one GEMM each, for each --slab-cases pair of gated norm
        (FLA's or ours) and dv kernel (gla.DV), each against the fp32 model's (the reference): the same loss bits,
        and per weight max |diff| / max |fp32| (largest and median over the weights); a CHECK where the slab's is
        over twice split's.
Timing: CUDA events around each side's forward + backward (bench/cuda_timing.py), median of --iters.
Exit status 1 if a bitwise check fails or ours is further from float64 than 2x the split path (+ one bf16 ulp of
the largest value); 2 without CUDA.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--key-dim", type=int, default=128, help="per head (GLA 340M: 512 / 4 heads)")
    p.add_argument("--value-dim", type=int, default=256, help="per head (GLA 340M: 1024 / 4 heads)")
    p.add_argument("--gate-dim", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--model", default=os.path.join(ROOT, "configs", "gla_340M.json"))
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--slab-cases", default="ours:fla,ours:ours",
                   help="slab: GATED_NORM:DV pairs, comma-separated (gated norm fla|ours, dv kernel fla|ours)")
    p.add_argument("--only", default="chunk,gate,model", help="comma-separated parts to run: chunk, gate, model, slab")
    p.add_argument("--sweep", action="store_true",
                   help="also time the gate kernels at other launch configurations than models/kernels/gate.py's")
    args = p.parse_args()
    import time
    start = time.perf_counter()

    def say(*parts):
        print(f"[{time.perf_counter() - start:6.1f}s]", *parts, flush=True)

    import torch
    import torch.nn.functional as F
    if not torch.cuda.is_available():
        print("gla_check: needs a CUDA GPU", file=sys.stderr)
        return 2
    from bench.cuda_timing import median_ms
    from models.kernels import gate, gla, swiglu
    from fla.ops.gla import chunk_gla as fla_chunk_gla

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    bad = []
    B, T, H, K, V = args.batch, args.seq_len, args.heads, args.key_dim, args.value_dim
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(torch.bfloat16)

    parts = set(args.only.split(","))
    if args.no_model:
        parts.discard("model")
    # ---- chunk -------------------------------------------------------------------------------------------------
    if "chunk" in parts:
        q, k = randn(B, T, H, K, scale=K ** -0.5), randn(B, T, H, K, scale=K ** -0.5)
        v = randn(B, T, H, V)
        gk = (F.logsigmoid(torch.randn(B, T, H, K, generator=g, device=dev)) / 16).to(torch.bfloat16)
        do = randn(B, T, H, V)
        leaves = [t.requires_grad_() for t in (q, k, v, gk)]

        def ours_chunk(variant):
            states, _, intra = variant.partition("+")
            return lambda: gla.chunk_gla(q, k, v, gk, saved_states=states, intra=intra or "fla")

        def flas_chunk():
            return fla_chunk_gla(q, k, v, gk, state_v_first=True)[0]

        def outputs(fn):
            for t in leaves:
                t.grad = None
            o = fn()
            o.backward(do)
            return [o.detach()] + [t.grad for t in leaves]

        def kept_mib(fn):  # what the forward leaves allocated for the backward
            for t in leaves:
                t.grad = None
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            o = fn()
            torch.cuda.synchronize()
            kept = torch.cuda.memory_allocated() - before - o.numel() * o.element_size()
            del o
            return kept / 2 ** 20

        names = ["o", "dq", "dk", "dv", "dg"]
        say("chunk_gla: FLA, FLA again")
        fla_a, fla_b = outputs(flas_chunk), outputs(flas_chunk)
        say(f"chunk_gla [{B}, {T}, {H}, {K}/{V}] bf16")

        def fwd_bwd(fn):
            def run():
                fn().backward(do)
            return run
        t_fla = median_ms(fwd_bwd(flas_chunk), 3, args.iters, 4)
        print(f"  FLA: forward + backward {t_fla:.3f} ms, kept for backward {kept_mib(flas_chunk):.0f} MiB")
        for variant in [*gla.STATE_CHOICES, "bf16+ours"]:  # saved_states[+intra kernel]
            states = variant.split("+")[0]
            ours_a = outputs(ours_chunk(variant))
            print(f"  ours, saved_states={states}, intra {'ours' if '+' in variant else 'FLA'}:")
            for name, a, b, c in zip(names, fla_a, fla_b, ours_a):
                self_equal = torch.equal(a, b)
                same = torch.equal(a, c)
                diff = (a.float() - c.float()).abs().max().item()
                # one bf16 ulp of each element (2^-7 of its magnitude, rounded up to a power of two)
                ulp = torch.exp2(torch.floor(torch.log2(a.float().abs().clamp_min(2 ** -126))) - 7)
                off = (a.float() - c.float()).abs() > ulp
                print(f"    {name}: dtype ours {c.dtype} / FLA {a.dtype}; FLA vs FLA {'equal' if self_equal else 'DIFFER'}; "
                      f"ours vs FLA {'equal' if same else f'differ (max |diff| {diff:.3g}, {(a != c).sum().item()} elements, {off.sum().item()} by more than one bf16 ulp)'}")
                # dg may differ by one ulp (its kernel is compiled for another store type, models/kernels/gla.py). With
                # saved_states=bf16 our last backward kernel computes dq, dk (within one ulp: another tile order) and dg
                # (its sum(h * dh) from bf16 states) itself, and our intra kernel (models/kernels/gla_intra.py) changes
                # dq, dk and dg at fp32 rounding: dg reported, not judged, and dq, dk judged by the ulp under "bf16".
                # The rest: FLA's bits.
                if "+" in variant and name in ("dq", "dk", "dg") or states == "bf16" and name == "dg":
                    judged_bad = False
                elif states == "bf16" and name in ("dq", "dk") or name == "dg":
                    judged_bad = bool(off.any())
                else:
                    judged_bad = not same
                if self_equal and judged_bad:
                    bad.append(f"chunk {name} ({variant})")
            t_ours = median_ms(fwd_bwd(ours_chunk(variant)), 3, args.iters, 4)
            print(f"    forward + backward {t_ours:.3f} ms ({t_fla / t_ours:.3f}x FLA), kept for backward "
                  f"{kept_mib(ours_chunk(variant)):.0f} MiB")

    # ---- gate --------------------------------------------------------------------------------------------------
    if "gate" in parts:
        M, N, R = B * T, args.gate_dim, args.rank
        a = randn(M, R).requires_grad_()
        w = randn(N, R, scale=R ** -0.5 * 3).requires_grad_()
        bias = randn(N).requires_grad_()
        dy = randn(M, N)

        def fused_gate(log="exact"):
            saved = gate.LOG
            gate.LOG = log  # read by the forward only
            try:
                return gate.low_rank_gate(a, w, bias, 16.0)
            finally:
                gate.LOG = saved

        def split_gate():
            return swiglu.log_sigmoid_scaled(F.linear(a, w, bias), 16.0)

        def relative_error(x, e):
            return ((x.double() - e).abs().max() / e.abs().max()).item()

        def grads(fn):
            for t in (a, w, bias):
                t.grad = None
            y = fn()
            y.backward(dy)
            return [y.detach(), a.grad, w.grad, bias.grad]

        exact_leaves = [t.detach().double().requires_grad_() for t in (a, w, bias)]
        y64 = F.logsigmoid(F.linear(*exact_leaves)) / 16.0
        y64.backward(dy.double())
        exact = [y64.detach()] + [t.grad for t in exact_leaves]
        say(f"low-rank gate [{M}, {R}] x [{N}, {R}] bf16: max |error| / max |exact| against float64")
        for label, fn in (("split (GEMM + logsigmoid)", split_gate), ("fused (ours)", fused_gate),
                          ("fused, LOG approx", lambda: fused_gate("approx"))):
            got = grads(fn)
            errs = [relative_error(x, e) for x, e in zip(got, exact)]
            print(f"  {label:26s} " + "  ".join(f"{n} {e:.2e}" for n, e in zip(["gk", "da", "dW", "db"], errs)))
            if label.startswith("split"):
                split_errs = errs
            else:
                if label == "fused (ours)":
                    fused_errs = dict(zip(["gk", "da", "dW", "db"], errs))  # the default launch's
                for n, e, s in zip(["gk", "da", "dW", "db"], errs, split_errs):
                    if e > 2 * s + 2 ** -8:
                        bad.append(f"gate {n}")
        t_split = median_ms(lambda: split_gate().backward(dy), 3, args.iters, 8)
        t_fused = median_ms(lambda: fused_gate().backward(dy), 3, args.iters, 8)
        print(f"  forward + backward: split {t_split:.3f} ms, fused {t_fused:.3f} ms ({t_split / t_fused:.2f}x)")
        a2, w2, b2 = a.detach(), w.detach(), bias.detach()
        t_exact, t_approx = (median_ms(lambda: gate.low_rank_gate_forward(a2, w2, b2, 1 / 16, log=log), 3, args.iters,
                                       16) for log in ("exact", "approx"))
        print(f"  forward alone: LOG exact {t_exact * 1e3:.1f} us, approx {t_approx * 1e3:.1f} us "
              f"({t_exact / t_approx:.2f}x; {(M * R + M * N) * 2 / t_approx / 1e6:.0f} GB/s)", flush=True)
        if args.sweep:
            bytes_fwd = (M * R + M * N) * 2

            def launch_errors(got, want, names, what):
                """Each output of a launch against float64: a launch a miscompile gets wrong (Hopper miscompiles some
                tiles of dot(trans(dot result)) kernels, fla#640; the backward's dW is one) must not look fast."""
                parts = []
                for n, x, e in zip(names, got, want):
                    err = relative_error(x, e)
                    if err > 2 * fused_errs[n] + 2 ** -8:
                        bad.append(f"{what} {n}")
                        parts.append(f"{n} {err:.2e} WRONG")
                    else:
                        parts.append(f"{n} {err:.1e}")
                return " ".join(parts)
            for cfg in [None, (64, 64, 4), (32, 128, 4), (128, 64, 8, True), (64, 64, 4, True), (64, 128, 4, True),
                        (32, 128, 4, True), (128, 128, 8, True), (32, 256, 4, True), (16, 512, 4, True)]:
                t = median_ms(lambda: gate.low_rank_gate_forward(a2, w2, b2, 1 / 16, config=cfg), 3, args.iters, 16)
                err = launch_errors([gate.low_rank_gate_forward(a2, w2, b2, 1 / 16, config=cfg)], exact[:1], ["gk"],
                                    f"gate forward {cfg}")
                print(f"  forward  {str(cfg or 'default'):22s} {t * 1e3:7.1f} us  {bytes_fwd / t / 1e6:6.0f} GB/s  "
                      f"{err}", flush=True)
            bytes_bwd = (M * R * 2 + M * N) * 2
            # (rows, columns a step, warps, columns a program, fma[, maxnreg]): the default takes 168 registers a
            # thread, one 8-warp program per SM; a cap of 128 (80) fits two (three), 4-warp programs four at 128
            for cfg in [None, (64, 128, 4, 0), (128, 64, 8, 0, True), (64, 64, 4, 0, True), (64, 128, 4, 0, True),
                        (128, 64, 8, 64, True), (128, 128, 8, 0, True), (32, 64, 4, 0, True), (64, 64, 8, 0, True),
                        (128, 64, 8, 0, False, 128), (128, 64, 8, 0, False, 80), (64, 64, 4, 0, False, 128),
                        (64, 128, 4, 0, False, 128), (128, 64, 8, 64, False, 128)]:
                t = median_ms(lambda: gate.low_rank_gate_backward(a2, w2, b2, dy, 1 / 16, config=cfg), 3, args.iters, 16)
                err = launch_errors(list(gate.low_rank_gate_backward(a2, w2, b2, dy, 1 / 16, config=cfg)), exact[1:],
                                    ["da", "dW", "db"], f"gate backward {cfg}")
                print(f"  backward {str(cfg or 'default'):22s} {t * 1e3:7.1f} us  {bytes_bwd / t / 1e6:6.0f} GB/s  "
                      f"{err}", flush=True)

    # ---- model / slab ------------------------------------------------------------------------------------------
    def model_grads(choices, dtype=torch.bfloat16):
        """(loss, fp32 gradients) of one forward + backward per fused.install choice, same weights and tokens."""
        from models import build, fused
        config = build.load_config(args.model)
        build.adapt_to_device(config, dev)
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator(
            device=dev).manual_seed(1), device=dev)
        out = []
        for choice in choices:
            model = build.build_model(config, dev, seed=0).to(dtype)
            fused.install(model, **choice)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            out.append((loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
            del model
            torch.cuda.empty_cache()
        return out

    def worst_difference(a, b):
        return max((((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)).item(), n) for n in b)

    def errors(a, ref):
        """max |a - ref| / max |ref| per weight: (the largest, its name), and the median over the weights."""
        rel = sorted((((a[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30)).item(), n) for n in ref)
        return rel[-1], rel[len(rel) // 2][0]

    if "model" in parts:
        say("model: new defaults, then gate split + FLA chunk")
        (loss_new, g_new), (loss_old, g_old) = model_grads([{}, {"gate": "split", "chunk": "fla"}])
        worst = worst_difference(g_new, g_old)
        print(f"model {os.path.basename(args.model)} (bf16, fused blocks), batch {args.batch} x {args.seq_len}: loss "
              f"{loss_new:.6f} (gate fused, our chunk) vs {loss_old:.6f} (gate split, FLA chunk); largest relative "
              f"gradient difference {worst[0]:.2e} ({worst[1]})")
    if "slab" in parts:
        # projections="slab" changes only the backward's GEMMs (one over the stacked gradient instead of five, so
        # another summation order) and where dq, dk, dv, dg are written: the loss must be the same bits
        say("slab: the projections' gradient as one slab against one GEMM each, both against fp32 math")
        (_, g_ref), = model_grads([{}], dtype=torch.float32)
        split = {}
        for norm, dv in [tuple(c.split(":")) for c in args.slab_cases.split(",")]:
            if norm not in split:
                split[norm] = model_grads([{"gated_norm": norm}])[0]
            loss_split, g_split = split[norm]
            gla.DV, dv_before = dv, gla.DV
            try:
                (loss_slab, g_slab), = model_grads([{"gated_norm": norm, "projections": "slab"}])
            finally:
                gla.DV = dv_before
            (worst_split, name_split), median_split = errors(g_split, g_ref)
            (worst_slab, name_slab), median_slab = errors(g_slab, g_ref)
            print(f"slab ({norm} gated norm, {dv} dv kernel): loss {loss_slab:.6f} vs {loss_split:.6f} split; gradient "
                  f"error against fp32 per weight (max |diff| / max |fp32|): slab largest {worst_slab:.2e} "
                  f"({name_slab}), median {median_slab:.2e}; split largest {worst_split:.2e} ({name_split}), median "
                  f"{median_split:.2e}; slab vs split largest {worst_difference(g_slab, g_split)[0]:.2e}", flush=True)
            if loss_slab != loss_split:
                bad.append(f"slab loss ({norm} gated norm)")
            if worst_slab > 2 * worst_split or median_slab > 2 * median_split:
                bad.append(f"slab gradients further from fp32 than split's ({norm} gated norm, {dv} dv kernel)")

    say("gla_check: " + ("CHECK " + ", ".join(bad) if bad else "all checks passed"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
