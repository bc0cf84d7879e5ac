"""Compile FLA's Triton kernels for one model and shape in parallel, before a run needs them.

    python -m models.warm --model configs/gla_340M.json --seq-len 2048 --batch 16 [--procs 16]
        [--precision bf16,autocast] [--kernels fused,fla]

On a cold machine the first step of GLA 340M spends 9+ minutes in Triton: each autotuned kernel
compiles every candidate config, one after the other, in one process. This tool splits that work:
N processes each run one training step (forward + backward) of a shallow copy of the
model (the same layer, so the same kernels and autotune keys) with each autotuner restricted to its
own 1/N of the candidate configs. The compiled binaries land in Triton's cache (TRITON_CACHE_DIR,
default ~/.triton/cache), so the real run afterwards only times the candidates (tens of seconds) and
does not compile them. Timings taken here are not kept: the subsets are cached under keys of their
own, and the real run autotunes over the full config lists on a quiet GPU.

Run it once per machine (or per shared cache directory) and shape: the per-rank micro-batch and the
sequence length of the run, and for each train.precision the run uses (--precision, default bf16, the GPU
default): kernels are tuned per dtype, bf16 weights (bf16) and fp32 weights under autocast (autocast) hit
other kernel variants; and for each model.gpu_kernels the run uses (--kernels, default fused, the trainer's
default): fused warms the blocks of models.fused (installed on the shallow copy), fla FLA's own modules. Each
precision runs on each kernel set. Processes are spread over the visible GPUs.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECISIONS = ("bf16", "autocast", "fp32")
KERNELS = ("fused", "fla")


def install_kernels(model, kernels: str) -> str:
    """Apply model.gpu_kernels to a built model, as the trainer's setup() does: "fused" rewrites its blocks
    with models.fused.install (same parameters and state_dict), "fla" leaves FLA's modules. Returns the
    one-line description of what runs. Shared by the GPU benches, so they time what the trainer runs."""
    if kernels == "fla":
        return "FLA modules"
    if kernels != "fused":
        raise ValueError(f"kernels {kernels!r}: use fused or fla")
    if importlib.util.find_spec("models.fused") is None:
        raise SystemExit("kernels fused: models/fused.py is not in this checkout; use fla (FLA's modules), "
                         "e.g. --kernels fla")
    from models import fused
    return fused.install(model)


def valid_list(value: str, choices: tuple[str, ...]) -> bool:
    """A comma-separated option names at least one item, and only items among choices."""
    items = value.split(",")
    return bool(items) and all(x in choices for x in items)


def config_share(configs: list, index: int, count: int) -> list:
    """The autotune candidates process `index` of `count` compiles. Every config goes to exactly one
    process; a process whose share is empty (fewer configs than processes) takes one config anyway,
    so that the kernel still runs and the step goes on to the next kernels."""
    if not configs:
        return configs
    share = configs[index::count]
    return share or [configs[index % len(configs)]]


def restrict_autotuners(index: int, count: int):
    """Make every Triton autotuner in this process try only its share of configs. A kernel whose share
    cannot run on this device (too much shared memory, say: the real autotuner skips such configs, but a
    share may hold only those) is tuned over all its configs instead, here. Returns a function that
    undoes the patch."""
    import triton.runtime.autotuner as autotuner
    cls = autotuner.Autotuner
    original_prune, original_run = cls.prune_configs, cls.run

    def prune_configs(self, kwargs):
        configs = list(original_prune(self, kwargs))
        return configs if getattr(self, "_warm_all", False) else config_share(configs, index, count)

    def run(self, *args, **kwargs):
        try:
            return original_run(self, *args, **kwargs)
        except Exception:
            if getattr(self, "_warm_all", False):
                raise
            self._warm_all = True
            self.cache.clear()  # a share of one config is cached before it runs
            return original_run(self, *args, **kwargs)

    cls.prune_configs, cls.run = prune_configs, run

    def restore():
        cls.prune_configs, cls.run = original_prune, original_run
    return restore


# GPU memory one process takes: measured on an H100 (2026-12-05) for GLA 340M's one-layer copy at batch 16 x 2048,
# hidden 1024, under autocast: 4.2-7.2 GiB a process; 16 of them did not fit its 79 GiB (all but two failed with
# CUDA out of memory). Scaled by tokens x hidden for other shapes; measured at the default --layers 1 only (a deeper
# copy takes more: pass --procs there).
PROC_GIB_AT_REFERENCE = 8.0
REFERENCE_ELEMENTS = 16 * 2048 * 1024


def processes_for_memory(free_bytes: list[int], batch: int, seq_len: int, hidden: int) -> int:
    """How many warm-up processes the GPUs' free memory holds (processes go round-robin over the GPUs), at least
    one a GPU: each is estimated at PROC_GIB_AT_REFERENCE GiB scaled by batch x seq_len x hidden, plus 10%."""
    per_proc = max(1.0, PROC_GIB_AT_REFERENCE * batch * seq_len * hidden / REFERENCE_ELEMENTS) * 1.1 * (1 << 30)
    return sum(max(1, int(free // per_proc)) for free in free_bytes)


def child(args, index: int, count: int) -> int:
    import torch
    restrict_autotuners(index, count)
    sys.path.insert(0, ROOT)
    from models import build
    config = build.load_config(args.model)
    config.num_hidden_layers = min(config.num_hidden_layers, args.layers)
    device = torch.device("cuda", index % torch.cuda.device_count())
    torch.cuda.set_device(device)
    build.adapt_to_device(config, device)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
    failed = []
    for kernels in args.kernels.split(","):
        model = build.build_model(config, device, seed=0)  # a fresh copy each: install rewrites in place
        install_kernels(model, kernels)
        for precision in args.precision.split(","):
            # as trainer.precision runs it: bf16 weights (MasterWeights' copies, or FSDP2's), or autocast over fp32
            try:
                run = model.to(torch.bfloat16 if precision == "bf16" else torch.float32)
                for _ in range(args.steps):
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "autocast"):
                        loss = run(input_ids=ids, labels=ids).loss
                    loss.backward()
                    run.zero_grad(set_to_none=True)
            except Exception as e:  # one combination that fails (unsupported, say) does not stop the others
                failed.append(f"{kernels}/{precision}")
                print(f"models.warm: kernels {kernels}, precision {precision}: {type(e).__name__}: {e}",
                      file=sys.stderr, flush=True)
        del model
    torch.cuda.synchronize(device)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model JSON (as in model.config)")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--batch", type=int, required=True, help="sequences per forward pass (train.micro_batch)")
    p.add_argument("--procs", type=int, default=None, help="parallel processes (default: CPU cores, at most 32)")
    p.add_argument("--layers", type=int, default=1, help="layers kept in the shallow copy (default 1)")
    p.add_argument("--precision", default="bf16",
                   help="train.precision values to warm, comma-separated: bf16 (default), autocast, fp32")
    p.add_argument("--kernels", default="fused",
                   help="model.gpu_kernels values to warm, comma-separated: fused (default), fla")
    p.add_argument("--steps", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        index, count = (int(x) for x in args.child.split("/"))
        return child(args, index, count)

    if not valid_list(args.precision, PRECISIONS):
        print(f"models.warm: --precision {args.precision!r}: use bf16, autocast or fp32, comma-separated",
              file=sys.stderr)
        return 2
    if not valid_list(args.kernels, KERNELS):
        print(f"models.warm: --kernels {args.kernels!r}: use fused or fla, comma-separated", file=sys.stderr)
        return 2
    import torch
    if not torch.cuda.is_available():
        print("models.warm: no CUDA device. On a CPU, FLA's kernels run under the Triton interpreter and are "
              "not compiled, so there is nothing to warm.", file=sys.stderr)
        return 2
    if not os.path.exists(args.model):
        print(f"models.warm: model JSON {args.model!r} not found (give --model a file such as "
              f"configs/gla_340M.json)", file=sys.stderr)
        return 2
    if "fused" in args.kernels.split(",") and importlib.util.find_spec("models.fused") is None:
        print("models.warm: --kernels fused: models/fused.py is not in this checkout; warm FLA's modules "
              "with --kernels fla", file=sys.stderr)
        return 2
    count = args.procs or min(os.cpu_count() or 1, 32)
    if not args.procs:
        with open(args.model) as f:
            hidden = int(json.load(f).get("hidden_size", 1024))
        free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
        fits = processes_for_memory(free, args.batch, args.seq_len, hidden)
        if fits < count:
            print(f"models.warm: {count} processes would not fit the GPUs' free memory "
                  f"({sum(free) / (1 << 30):.0f} GiB): running {fits} (--procs sets the count)",
                  file=sys.stderr, flush=True)
            count = fits
    cache = os.environ.get("TRITON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".triton", "cache"))
    print(f"models.warm: {count} processes on {torch.cuda.device_count()} GPU(s), {args.model} at batch "
          f"{args.batch} x {args.seq_len}, precision {args.precision}, kernels {args.kernels}; Triton cache {cache}",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    procs = []
    for i in range(count):
        cmd = [sys.executable, "-m", "models.warm", "--model", args.model, "--seq-len", str(args.seq_len),
               "--batch", str(args.batch), "--layers", str(args.layers), "--steps", str(args.steps),
               "--precision", args.precision, "--kernels", args.kernels,
               "--child", f"{i}/{count}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    failed = 0
    for i, proc in enumerate(procs):
        _, err = proc.communicate()
        done = i + 1
        if proc.returncode != 0:
            failed += 1  # the first failure in full; the others (the same error, most likely) by their last line
            tail = err[-3000:] if failed == 1 else (err.strip().splitlines() or [""])[-1]
            print(f"models.warm: process {i}/{count} failed (exit {proc.returncode}):\n{tail}",
                  file=sys.stderr, flush=True)
        print(f"models.warm: {done}/{count} processes done, {time.perf_counter() - t0:.0f}s", file=sys.stderr,
              flush=True)
    print(f"models.warm: done in {time.perf_counter() - t0:.0f}s, {failed} of {count} processes failed",
          file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
