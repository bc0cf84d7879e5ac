"""Compile every Triton kernel a GLA training step launches for a Hopper GPU (sm_90; or an A100, sm_80), on a machine
without one.

Why: the tests run our kernels under the Triton interpreter, which does not type-check them the way the compiler
does, and GPU time is scarce: a kernel that does not compile for the card, or needs more shared memory than it has,
used to show up only in a device call. Here the real step runs on CPU tensors while Triton believes it drives an
H100: each kernel launch is compiled for sm_90 (ptxas included) and not run. The model is GLA with GLA 340M's head
sizes (hidden 1024, 4 heads: key 128, value 256 per head) in bf16, two layers, a short sequence, through
models/fused.py with each kernel switch in turn, forward and backward; FLA's kernels in the step compile as well
(their autotuned ones with the first config only).

    python -m models.kernels.compile_check [--variants all|defaults] [--arch 90|80] [--sass]

Prints each kernel once with its shared memory (--sass: also the registers a thread takes and the SASS instructions of
its first compilation, by the cuobjdump and nvdisasm triton ships: how an instruction-bound kernel shows on a CPU
machine, BENCHMARKS.md), and exits 1 if any kernel failed to compile or needs more shared
memory than the card gives a block (227 KiB on sm_90, 163 KiB on sm_80). What it cannot see: FLA's fused cross
entropy (it refuses CPU tensors, so every variant runs our loss), values (the outputs are uninitialized memory),
launch-time limits other than shared memory (registers are assigned by ptxas and fit by construction), and the
differences between this machine's triton and the GPU image's (3.9 here; the GPU image has 3.6).

Run it in a process of its own, without TRITON_INTERPRET: it replaces Triton's active driver and parts of torch.cuda
(names, capability, device count) before FLA is imported.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import types

# per architecture: (card, bytes of shared memory one block may use, SMs)
ARCHS = {90: ("NVIDIA H100", 232448, 132), 80: ("NVIDIA A100", 166912, 108)}
# (label, fused.install keyword arguments, module settings: models/kernels/gla.py's by name, others as "module.NAME")
VARIANTS = [
    ("defaults", {}, {}),
    ("merged MLP, FLA's intra kernels, fp32 states, dv's product in tf32x3", {"mlp": "merged", "gated_norm": "ours"},
     {"SAVED_STATES": "fp32", "INTRA": "fla", "FWD_INTRA": "fla", "DV_DOT": "tf32x3"}),
    ("our forward intra kernel, FLA's recompute", {"gate": "split"}, {"SAVED_STATES": "none", "FWD_INTRA": "ours"}),
    ("the gate's approximate log (lg2.approx)", {}, {"gate.LOG": "approx"}),
    ("SwiGLU in the MLP GEMMs", {"mlp": "gemm"}, {}),
    ("split projections, FLA's gated norm (the defaults before the slab)", {"projections": "split", "gated_norm": "fla"},
     {}),
]


CUBINS: dict = {}  # kernel name -> the cubin of its first compilation (--sass reads them)


def sass_counts(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, SASS instructions) of a cubin, by triton's bundled cuobjdump and nvdisasm (static count:
    a loop's body once)."""
    import re
    import subprocess
    import tempfile

    import triton
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    return (int(regs.group(1)) if regs else -1), len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, re.M))


def _pretend_gpu(compiled: dict, arch: int) -> None:
    """Triton's driver -> a stand-in for a card of `arch` (ARCHS) whose launches only compile; torch.cuda answers as
    that card would."""
    import torch
    import triton.runtime.autotuner as autotuner
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    card, shared, sms = ARCHS[arch]
    properties = {"max_shared_mem": shared, "multiprocessor_count": sms, "max_num_regs": 65536, "warpSize": 32,
                  "sm_clock_rate": 1410000, "mem_clock_rate": 1593000, "mem_bus_width": 5120}

    class StandIn:
        utils = types.SimpleNamespace(get_device_properties=lambda index=0: dict(properties))

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def __getattr__(self, name):
            raise AttributeError(f"compile_check's stand-in driver has no {name!r}")

    driver.set_active(StandIn())
    torch.cuda.get_device_name = lambda *a, **k: f"{card} (compile check)"
    torch.cuda.get_device_capability = lambda *a, **k: divmod(arch, 10)
    torch.cuda.current_device = lambda: 0
    torch.cuda.device_count = lambda: 1
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel is not None:
            shared, warps, scalar = compiled.get(self.__name__, (kernel.metadata.shared, kernel.metadata.num_warps, 0))
            compiled[self.__name__] = (shared, warps, max(scalar, kernel.asm["ptx"].count("st.global.b16")))
            CUBINS.setdefault(self.__name__, kernel.asm["cubin"])
        return kernel
    JITFunction.run = compile_only
    prune = autotuner.Autotuner.prune_configs
    autotuner.Autotuner.prune_configs = lambda self, kwargs: prune(self, kwargs)[:1]  # one config: no benchmarking


def _step(install_kwargs: dict, settings: dict, seq_len: int = 128) -> str:
    import importlib

    import torch

    from models import build, fused
    targets = {k: (importlib.import_module("models.kernels." + k.split(".")[0]) if "." in k
                   else importlib.import_module("models.kernels.gla"), k.split(".")[-1]) for k in settings}
    saved = {k: getattr(*targets[k]) for k in settings}
    try:
        for k, v in settings.items():
            setattr(*targets[k], v)
        config = build.load_config({"model_type": "gla", "hidden_size": 1024, "num_hidden_layers": 2, "num_heads": 4,
                                    "vocab_size": 512, "expand_k": 0.5, "expand_v": 1, "attn_mode": "chunk",
                                    "fuse_cross_entropy": True, "tie_word_embeddings": True})
        model = build.build_model(config, "cpu", seed=0).to(torch.bfloat16)
        # our loss in every variant: FLA's fused cross entropy refuses CPU tensors before it launches anything
        what = fused.install(model, **{"loss": "ours", **install_kwargs})
        ids = torch.randint(0, 512, (2, seq_len), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        cu = torch.tensor([0, 40, seq_len * 2], dtype=torch.int32)  # documents: the varlen launches
        model(input_ids=ids.reshape(1, -1), labels=ids.reshape(1, -1), cu_seqlens=cu).loss.backward()
        return what
    finally:
        for k, v in saved.items():
            setattr(*targets[k], v)


def check(variants: list[tuple[str, dict, dict]], arch: int = 90) -> tuple[dict, list[str]]:
    """Compile the kernels of each variant's step for sm_`arch`. Returns ({kernel: (shared bytes, warps, the most
    2-byte scalar global stores in one of its compilations)}, errors). A kernel that stores 16-bit values one at a
    time where its rows are aligned issues 8x the store instructions of one storing 16-byte vectors (a stride Triton
    was told not to specialize hides that alignment)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_check: run it without TRITON_INTERPRET=1 (the interpreter compiles nothing)")
    compiled: dict = collections.OrderedDict()
    _pretend_gpu(compiled, arch)
    from models import kernels
    kernels.COMPILE_ONLY = True
    errors = []
    for label, install_kwargs, settings in variants:
        before = len(compiled)
        try:
            _step(install_kwargs, settings)
        except Exception as e:  # a kernel that does not compile raises from its launch
            errors.append(f"{label}: {type(e).__name__}: {str(e)[:2000]}")
        print(f"{label}: {len(compiled) - before} more kernels compiled", flush=True)
    limit = ARCHS[arch][1]
    for name, (shared, _, _) in compiled.items():
        if shared > limit:
            errors.append(f"{name}: {shared} bytes of shared memory, more than sm_{arch}'s {limit}")
    return compiled, errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", choices=("all", "defaults"), default="all")
    ap.add_argument("--arch", type=int, choices=sorted(ARCHS), default=90, help="90: H100/H200 (default), 80: A100")
    ap.add_argument("--sass", action="store_true", help="also each kernel's registers and SASS instruction count")
    args = ap.parse_args(argv)
    variants = VARIANTS if args.variants == "all" else VARIANTS[:1]
    if args.arch < 90:  # on CPU tensors mlp_gemm picks its TMA launch, sm_90 only (an A100 takes pointer loads)
        variants = [v for v in variants if v[1].get("mlp") != "gemm"]
    compiled, errors = check(variants, args.arch)
    width = max(len(n) for n in compiled) if compiled else 10
    for name, (shared, warps, scalar) in compiled.items():
        extra = ""
        if args.sass and name in CUBINS:
            regs, instructions = sass_counts(CUBINS[name])
            extra = f"  {regs:>3} registers  {instructions:>5} SASS instructions"
        print(f"{name:<{width}}  {shared:>7} B shared  {warps:>2} warps  {scalar:>3} scalar 16-bit stores{extra}")
    print(f"{len(compiled)} kernels compiled for sm_{args.arch}; {len(errors)} errors")
    for e in errors:
        print("ERROR " + e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
