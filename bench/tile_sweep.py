"""Every config an autotuner may pick for the GLA chunk kernels, each against GLA's recurrence in float64 (issue 10).

    python bench/tile_sweep.py [--device cuda|cpu] [--paths ours,fla] [--batch 2] [--seq-len 2048] [--heads 4]
        [--key-dim 128] [--value-dim 256] [--cu-seqlens 0,700,2048] [--dtype bf16|fp32] [--budget-s 480]
        [--json PATH]

On a GPU, Triton's autotuner times each of a kernel's configs (tile sizes, warps, pipeline stages) and runs the
fastest. Which one wins depends on the card and the run: an H100 and an H200 may run different configs of the same
kernel, and a config the tests never ran may be one the compiler gets wrong (triton-lang/triton#11366, fla-org
flash-linear-attention#640: wrong gradients on Hopper for some tiles only). Tests under the Triton interpreter run
each kernel's first config only (models/cpu_triton.py).

This runs chunk_gla forward + backward once with every kernel at its first config, recording each autotuned kernel
it launches and the configs its pruning keeps at these shapes, then once per other config of each kernel, that
kernel pinned to it and the rest at their first. Each run's o, dq, dk, dv and dg are compared with GLA's recurrence
computed in float64 on the same inputs: max |error| / max |exact| per output.

  paths     ours: models/kernels/gla.chunk_gla as the fused blocks run it (bf16 states kept, our intra, inter and dv
            kernels); fla: FLA's chunk_gla (what the autocast-fla reference path runs); ours-dvtf32x3: ours with the
            dv kernel's product in tf32x3 (gla.DV_DOT; to check before it becomes a default).
  --device  cuda: bf16 inputs, the compiled kernels of this card and triton; every config (warps and stages too:
            a miscompile is per config). cpu: fp32 inputs under the Triton interpreter, which ignores warps and
            stages, so one run per distinct tile; FLA's config lists are built as on a card with an H100's shared
            memory (on a CPU FLA would build smaller tiles' lists: fla/ops/gla/chunk.py BK_LIST).
  --budget-s  stop starting new runs after this long, each path its share (compiling every config of every kernel
            takes minutes on a GPU); the kernels take turns, each one's distinct tiles before its other warps and
            stages, so a cut leaves every kernel some. The summary says how many were not run.

A run FAILS where an output's error is above twice that output's error with every kernel at its first config and
above the dtype's floor (fp32 2e-6; bf16 2^-8, one bf16 rounding of the largest value): an error a config adds
beyond rounding; and any run, the first configs' included, where an error is above the dtype's ceiling (fp32 1e-5,
bf16 2^-5).
Exit status 1 on a failure, 0 otherwise. tests/test_gla_kernel.py runs it on the CPU.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OUTPUTS = ("o", "dq", "dk", "dv", "dg")
PATHS = ("ours", "fla", "ours-dvtf32x3")
FLOOR = {"fp32": 2e-6, "bf16": 2 ** -8}  # an error below this never fails (rounding alone reaches it)
CEILING = {"fp32": 1e-5, "bf16": 2 ** -5}  # an error above this always fails, the first config's included
HOPPER_SHARED_MEM = 232448  # bytes per block on an H100 / H200 (FLA's Backend.HOPPER)


def import_fla_as_on_hopper() -> None:
    """Import FLA (and so build its kernels' config lists) as on a card with an H100's shared memory, on a machine
    without a GPU: FLA reads the shared memory from triton's active driver at import, and on a CPU builds the smaller
    lists (BK 16/32) instead of the H100's (BK 32/64, BV 64/128). Must run before anything imports fla."""
    if "fla" in sys.modules:
        raise RuntimeError("import_fla_as_on_hopper() must run before fla is imported")
    import torch
    from triton.runtime import driver

    class _Utils:
        @staticmethod
        def get_device_properties(index):
            return {"max_shared_mem": HOPPER_SHARED_MEM}

    class _SharedMemoryOnly:
        utils = _Utils()

        @staticmethod
        def get_current_target():
            raise RuntimeError("no GPU here: only an H100's shared memory is shown to FLA")  # FLA keeps device 'cpu'

    count = torch.cuda.device_count
    torch.cuda.device_count = lambda: 1  # FLA asks each CUDA device for its shared memory
    driver.set_active(_SharedMemoryOnly())
    try:
        import fla  # noqa: F401
    finally:
        driver._active = None  # triton's own driver (none on a CPU) from here on
        torch.cuda.device_count = count
    from fla.ops.gla import chunk
    if chunk.BK_LIST != [32, 64] or chunk.BV_LIST != [64, 128]:
        raise RuntimeError(f"FLA did not build an H100's config lists (BK {chunk.BK_LIST}, BV {chunk.BV_LIST}); "
                           "fla.utils.hardware changed: re-check import_fla_as_on_hopper")


def inputs(B, T, H, K, V, dtype, device, seed=0):
    import torch
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v, do = (torch.randn(B, T, H, V, generator=gen) for _ in range(2))
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen)) / 16  # GLA's gate: logsigmoid / gate_logit_normalizer
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, g, do)]


def recurrence(q, k, v, g, do, cu_seqlens, scale):
    """o and the gradients of q, k, v, g by GLA's recurrence in float64: h_t = h_{t-1} * exp(g_t) + k_t^T v_t,
    o_t = scale * q_t h_t, each sequence (row of the batch, or cu_seqlens segment) from a zero state."""
    import torch
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, g)]
    qd, kd, vd, gd = leaves
    B, T, H, K = q.shape
    bounds = [(b, 0, T) for b in range(B)] if cu_seqlens is None else \
        [(0, int(s), int(e)) for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    pieces = [[None] * T for _ in range(B)]
    for b, s, e in bounds:
        h = torch.zeros(H, K, v.shape[-1], dtype=torch.float64, device=q.device)
        for t in range(s, e):
            h = h * gd[b, t].exp()[..., None] + kd[b, t][..., None] * vd[b, t][..., None, :]
            pieces[b][t] = torch.einsum("hk,hkv->hv", qd[b, t] * scale, h)
    o = torch.stack([torch.stack(row) for row in pieces])
    o.backward(do.double())
    return [o.detach()] + [t.grad for t in leaves]


@functools.cache
def unrunnable() -> tuple:
    """What triton's autotuner counts as a config that cannot run on the card, and skips (Autotuner._bench). Looked up
    when needed: importing triton before models.cpu_triton.enable() would keep the interpreter off."""
    from triton.runtime.errors import OutOfResources
    kinds = [OutOfResources]
    for module, name in (("triton.compiler.errors", "CompileTimeAssertionFailure"),
                         ("triton.runtime.errors", "PTXASError")):
        try:
            kinds.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(kinds)


def relative_errors(got, exact) -> list[float]:
    return [((a.double() - e).abs().max() / e.abs().max()).item() for a, e in zip(got, exact)]


class Recorder:
    """While on, notes each autotuned kernel launched (in launch order) and the configs its pruning keeps for the
    launch's arguments: what the GPU's autotuner chooses among."""

    def __init__(self, distinct_by_tile: bool):
        import triton.runtime.autotuner as autotuner
        self.cls = autotuner.Autotuner
        self.by_tile = distinct_by_tile
        self.kernels: dict[int, tuple] = {}

    @staticmethod
    def tile(config):
        return tuple(sorted(config.kwargs.items()))

    def __enter__(self):
        original = self.cls.run
        recorder = self

        def run(tuner, *args, **kwargs):
            if id(tuner) not in recorder.kernels:
                nargs = dict(zip(tuner.arg_names, args))
                kept = tuner.early_config_prune(tuner.configs, nargs, **kwargs) if tuner.early_config_prune \
                    else tuner.configs
                tiles, rest = {}, []
                for c in kept:  # one config per distinct tile first, then the other warps and stages
                    if recorder.tile(c) in tiles:
                        rest.append(c)
                    else:
                        tiles[recorder.tile(c)] = c
                distinct = list(tiles.values()) + ([] if recorder.by_tile else rest)
                recorder.kernels[id(tuner)] = (tuner, distinct)
            saved, candidates = tuner.configs, recorder.kernels[id(tuner)][1]
            try:
                while True:  # the first config this card can run (as the autotuner, which skips the others)
                    tuner.configs = candidates[:1]
                    try:
                        return original(tuner, *args, **kwargs)
                    except unrunnable():
                        if len(candidates) == 1:
                            raise
                        candidates.pop(0)
            finally:
                tuner.configs = saved
        self.original = original
        self.cls.run = run
        return self

    def __exit__(self, *exc):
        self.cls.run = self.original


def kernel_name(tuner) -> str:
    return tuner.base_fn.__name__  # triton's Autotuner: the jitted function under any heuristics


def describe(config, by_tile: bool) -> str:
    tile = ",".join(f"{k}={v}" for k, v in sorted(config.kwargs.items())) or "-"
    return tile if by_tile else f"{tile} w{config.num_warps} s{config.num_stages}"


def path_function(name: str):
    """chunk_gla of the path, and the settings it runs under (a context manager: the backward reads them too)."""
    import contextlib
    if name in ("ours", "ours-dvtf32x3"):
        from models.kernels import gla

        @contextlib.contextmanager
        def settings():
            # the fused blocks' kernels whatever the dtype: bf16 states (here the inputs' dtype) with our inter
            # kernel, our intra and dv kernels (DV None runs ours only where the slab gives dv a place); with
            # -dvtf32x3 the dv kernel's intra-chunk product in tf32x3 (gla.DV_DOT, not yet the default)
            saved = (gla.INTER, gla.DV, gla.DV_DOT)
            gla.INTER, gla.DV = "ours", "ours"
            if name.endswith("-dvtf32x3"):
                gla.DV_DOT = "tf32x3"
            try:
                yield
            finally:
                gla.INTER, gla.DV, gla.DV_DOT = saved

        def ours(q, k, v, g, cu_seqlens):
            return gla.chunk_gla(q, k, v, g, cu_seqlens=cu_seqlens, saved_states="bf16", intra="ours")
        return ours, settings
    if name == "fla":
        def flas(q, k, v, g, cu_seqlens):
            from fla.ops.gla import chunk_gla
            return chunk_gla(q, k, v, g, state_v_first=True, cu_seqlens=cu_seqlens)[0]
        return flas, contextlib.nullcontext
    raise SystemExit(f"tile_sweep: unknown path {name!r}: use {', '.join(PATHS)}")


def forward_backward(fn, tensors, cu_seqlens):
    import torch
    q, k, v, g, do = (t.detach().clone().requires_grad_(i < 4) for i, t in enumerate(tensors))
    o = fn(q, k, v, g, cu_seqlens)
    o.backward(do)
    if o.is_cuda:
        torch.cuda.synchronize()
    return [o.detach(), q.grad, k.grad, v.grad, g.grad]


def sweep(path: str, tensors, cu_seqlens, exact, by_tile: bool, dtype: str, deadline: float, say) -> dict:
    """The baseline run (every kernel at its first config), then each other config of each kernel recorded."""
    fn, settings = path_function(path)
    with settings():
        return _sweep(path, fn, tensors, cu_seqlens, exact, by_tile, dtype, deadline, say)


def _sweep(path, fn, tensors, cu_seqlens, exact, by_tile, dtype, deadline, say) -> dict:
    floor, ceiling = FLOOR[dtype], CEILING[dtype]
    with Recorder(by_tile) as rec:  # every kernel at its first config: no timing of configs, on a GPU either
        base = relative_errors(forward_backward(fn, tensors, cu_seqlens), exact)
    say(f"{path}: first configs: " + "  ".join(f"{n} {e:.2e}" for n, e in zip(OUTPUTS, base)))
    report = {"path": path, "first": dict(zip(OUTPUTS, base)), "kernels": [], "runs": 0, "skipped": 0,
              "failures": []}
    if max(base) > ceiling:
        report["failures"].append(f"{path}: the first configs: " + ", ".join(
            f"{n} {e:.2e}" for n, e in zip(OUTPUTS, base) if e > ceiling) + f" (above {ceiling:.1e})")
    entries = []
    for tuner, candidates in rec.kernels.values():
        entries.append({"kernel": kernel_name(tuner), "configs": [describe(c, by_tile) for c in candidates],
                        "errors": {}, "unrunnable": {}})
    # round robin over the kernels (each kernel's distinct tiles first): a budget cut leaves every kernel some runs
    kernels = list(rec.kernels.values())
    jobs = [(i, c) for depth in range(1, max((len(c) for _, c in kernels), default=0))
            for i, (_, cands) in enumerate(kernels) if depth < len(cands) for c in [cands[depth]]]
    saved = [tuner.configs for tuner, _ in kernels]
    try:
        for tuner, cands in kernels:
            tuner.configs = [cands[0]]  # one config: the autotuner runs it without timing (triton's Autotuner.run)
        for i, c in jobs:
            if time.monotonic() > deadline:
                report["skipped"] += 1
                continue
            tuner, cands = kernels[i]
            tuner.configs = [c]
            label = describe(c, by_tile)
            try:
                errors = relative_errors(forward_backward(fn, tensors, cu_seqlens), exact)
            except unrunnable() as e:  # the autotuner skips such a config too (triton's Autotuner._bench)
                entries[i]["unrunnable"][label] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            finally:
                tuner.configs = [cands[0]]
            report["runs"] += 1
            entries[i]["errors"][label] = dict(zip(OUTPUTS, errors))
            bad = [n for n, e, b in zip(OUTPUTS, errors, base) if e > ceiling or e > max(2 * b, floor)]
            if bad:
                report["failures"].append(f"{path}: {entries[i]['kernel']} {label}: " + ", ".join(
                    f"{n} {e:.2e} (first config {b:.2e})" for n, e, b in zip(OUTPUTS, errors, base) if n in bad))
    finally:
        for (tuner, _), configs in zip(kernels, saved):
            tuner.configs = configs
    for entry in entries:
        ratio = max((e[n] / b for e in entry["errors"].values() for n, b in zip(OUTPUTS, base)), default=None)
        say(f"{path}: {entry['kernel']}: {len(entry['errors'])} of {len(entry['configs']) - 1} other config(s) run" +
            (f" ({len(entry['unrunnable'])} not runnable on this card, as the autotuner would skip them)"
             if entry["unrunnable"] else "") +
            (f"; largest error / the first config's {ratio:.2f}" if ratio is not None else ""))
    report["kernels"] = entries
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--paths", default="ours,fla")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--key-dim", type=int, default=128, help="per head (GLA 340M: 512 / 4 heads)")
    p.add_argument("--value-dim", type=int, default=256, help="per head (GLA 340M: 1024 / 4 heads)")
    p.add_argument("--cu-seqlens", default="", help="comma-separated sequence bounds (then --batch must be 1)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="the inputs' dtype (default: bf16 on cuda, as training runs; fp32 on cpu, for tight bounds)")
    p.add_argument("--budget-s", type=float, default=480.0)
    p.add_argument("--json", default="", help="also write the report here")
    args = p.parse_args(argv)
    paths = args.paths.split(",")
    if not paths or set(paths) - set(PATHS):
        p.error(f"--paths {args.paths!r}: comma-separated, of {', '.join(PATHS)}")
    start = time.monotonic()

    def say(*parts):
        print(f"[{time.monotonic() - start:6.1f}s]", *parts, flush=True)

    if args.device == "cpu":
        from models import cpu_triton
        cpu_triton.enable()
        import_fla_as_on_hopper()
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("tile_sweep: --device cuda needs a GPU (--device cpu runs the Triton interpreter)", file=sys.stderr)
        return 2
    dname = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dname]
    cu = [int(x) for x in args.cu_seqlens.split(",")] if args.cu_seqlens else None
    if cu is not None and (args.batch != 1 or cu[0] != 0 or cu[-1] != args.seq_len or cu != sorted(cu)):
        raise SystemExit("tile_sweep: --cu-seqlens must rise from 0 to --seq-len, with --batch 1")
    tensors = inputs(args.batch, args.seq_len, args.heads, args.key_dim, args.value_dim, dtype, args.device)
    cu_t = torch.tensor(cu, device=args.device) if cu is not None else None
    exact = recurrence(*tensors, cu_t, args.key_dim ** -0.5)
    say(f"{dname} inputs [{args.batch}, {args.seq_len}, {args.heads}, {args.key_dim}/{args.value_dim}]"
        f"{' cu_seqlens ' + args.cu_seqlens if cu else ''}; float64 recurrence done")
    reports = []
    for i, path in enumerate(paths):  # each path its share of what is left of the budget
        deadline = time.monotonic() + (start + args.budget_s - time.monotonic()) / (len(paths) - i)
        reports.append(sweep(path, tensors, cu_t, exact, args.device == "cpu", dname, deadline, say))
    failures = [f for r in reports for f in r["failures"]]
    runs, skipped = sum(r["runs"] for r in reports), sum(r["skipped"] for r in reports)
    summary = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)",
               "dtype": dname, "shape": [args.batch, args.seq_len, args.heads, args.key_dim, args.value_dim],
               "cu_seqlens": cu, "runs": runs, "skipped": skipped, "failures": failures, "paths": reports}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    say(f"{runs} runs besides the first configs, {skipped} not run (--budget-s); {len(failures)} failure(s)")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
