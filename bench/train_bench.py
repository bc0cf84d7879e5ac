"""Training throughput: our loop (`python -m trainer`'s train()) vs transformers.Trainer, same model and batch.

    PYTHONUNBUFFERED=1 python bench/train_bench.py [--model configs/gla_340M.json] [--seq-len 2048]
        [--batch 16] [--steps 30] [--warmup 5] [--shards DIR] [--cases ours-bf16,ours-bf16-fla,hf] [--peak-tflops 989]

The HF case is the original flame trainer's path: transformers.Trainer with bf16=True and
optim="adamw_torch_fused" (fp32 master weights, bf16 autocast). Ours runs the real training loop
(trainer.loop.train) with parallel.mode=none, fused AdamW, clip 1.0, micro-batch =
batch (no accumulation), checkpoints and validation off. Both use the same cosine schedule, the same
weight init seed, and the same shards (synthetic Zipf tokens are written once under --dir if --shards
is not given). Case `ours` runs the default train.precision and model.gpu_kernels; `ours-bf16` /
`ours-autocast` / `ours-fp32` that precision; a `-fused` or `-fla` part picks model.gpu_kernels
(`ours-bf16-fla`: FLA's modules unchanged; `ours-bf16` = `ours-bf16-fused`: our fused blocks, the default); a
last `-graphs` part sets train.cuda_graphs=true (`ours-bf16-graphs`); a last `-sync` part reads each step's loss
right after launching it (the loop before 2026-12-05, for a same-call baseline: `ours-bf16-sync`; the loop now
reads step N after queueing step N+1).
The HF case always runs FLA's modules, as the original trainer did.

Each case runs in its own subprocess (clean CUDA memory and peak statistics). The first `--warmup`
steps (kernel compilation and autotuning: minutes on a cold machine) are excluded. Printed per case,
one JSON line: median step time, tokens/s, MFU against the device's dense bf16 peak computed two ways
(6N FLOPs/token and the real per-layer count of models/flops.py), data-wait share (ours: time blocked
on the loader / step time; HF: time between one step's end and the next step's start, which includes
its DataLoader), peak CUDA memory, and the kernels it ran ("fused" or "fla").
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_synthetic_shards(root: str, sequences: int, seq_len: int, vocab: int) -> str:
    import numpy as np

    from shards.format import MANIFEST_NAME, Manifest, ShardWriter, index_name, rows_per_block
    from shards.storage import LocalStorage
    if os.path.exists(os.path.join(root, MANIFEST_NAME)):
        return root
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    tokens = (rng.zipf(1.2, size=sequences * seq_len) % vocab).astype(np.uint16)
    tokens[rng.random(tokens.size) < 1 / 600] = 0  # an EOS about every 600 tokens
    data = tokens.reshape(sequences, seq_len)
    rows = rows_per_block(seq_len, "uint16")
    with open(os.path.join(root, "00000.tar"), "wb") as f:
        w = ShardWriter(f, "00000.tar", seq_len, "uint16")
        for i in range(0, sequences, rows):
            w.add_block(data[i:i + rows], eos_id=0)
        info = w.close()
    with open(os.path.join(root, index_name("00000.tar")), "wb") as f:
        f.write(w.index_bytes)
    m = Manifest(seq_len=seq_len, dtype="uint16", eos_id=0, bos_id=None,
                 tokenizer={"source": "synthetic", "sha256": "", "vocab_size": vocab}, shards=[info])
    LocalStorage(root).put_bytes(MANIFEST_NAME, m.to_bytes())
    return root


def flops_info(model_json: str, seq_len: int) -> dict:
    from models import build
    from models.flops import flops_per_token, six_n
    model = build.build_model(build.load_config(model_json), "meta")
    return {"params": build.count_parameters(model), "six_n": six_n(model),
            "real": flops_per_token(model, seq_len)["train"]}


PRECISIONS = ("auto", "bf16", "autocast", "fp32")
KERNELS = ("fused", "fla")


# last parts of a case, in this order: -split, -cat or -slab (models.fused's attention projections), -gatesplit (the gate's
# GEMM + logsigmoid instead of models/kernels/gate.py), -flachunk (FLA's chunk_gla instead of models/kernels/gla.py),
# -mulclip (clip_grad_norm_ before the fused step instead of the step's divisor), -keepz / -nokeepz (the SwiGLU
# product kept from forward for backward, or written again there), -hfp32 / -hbf16 / -hnone (what our chunk_gla keeps
# of GLA's states for backward: models/kernels/gla.py SAVED_STATES), -intra / -flaintra (the backward's intra-chunk
# dq, dk kernel: models/kernels/gla_intra.py or FLA's: gla.INTRA), -fwdintra (the forward's intra-chunk A kernel
# of models/kernels/gla_fwd_intra.py: gla.FWD_INTRA), -fladv (the backward's dv by FLA's kernel, copied where the
# slab wants it, instead of models/kernels/gla.py's: gla.DV), -dvtf32x3 (our dv kernel's intra-chunk product in
# tf32x3 instead of fp32 FMAs: gla.DV_DOT), -mlpgemm (SwiGLU in the MLP's GEMMs: models/kernels/mlp_gemm.py),
# -mlpmerged (the MLP's gate and up projections as one GEMM: fused.install(mlp="merged")), -ce / -flace (the LM head
# and loss by models/kernels/cross_entropy.py, or FLA's head and fused cross entropy),
# -gnorm / -flagnorm (GLA's gated output norm by models/kernels/gated_norm.py, or FLA's module), -gnbwd (our gated
# norm's backward launched as --gated-norm-bwd says: gated_norm.BACKWARD_CONFIG), -approxlog (the gate kernel's log1p
# by a series and lg2.approx: models/kernels/gate.py LOG), -fsdp (parallel.mode=
# fsdp, FSDP2 on the one process), -hostcheck (the host reads the loss before the optimizer step instead of the fused
# step skipping a non-finite one on the device: FSDP2's path until 2026-12-08), -graphs, -sync
CASE_FORM = "ours[-PRECISION][-KERNELS][-split|-cat|-slab][-gatesplit][-flachunk][-mulclip][-keepz|-nokeepz][-hfp32|-hbf16|-hnone][-intra|-flaintra][-fwdintra][-fladv|-dvtf32x3][-mlpgemm|-mlpmerged][-ce|-flace][-gnorm|-flagnorm][-gnbwd][-approxlog][-fsdp][-hostcheck][-graphs][-sync]"
STATE_MODIFIERS = {"hfp32": "fp32", "hbf16": "bf16", "hnone": "none"}
MODIFIERS = ("split", "cat", "slab", "gatesplit", "flachunk", "mulclip", "keepz", "nokeepz", *STATE_MODIFIERS, "intra", "flaintra",
             "fwdintra", "fladv", "dvtf32x3", "mlpgemm", "mlpmerged", "ce", "flace", "gnorm", "flagnorm",
             "gnbwd", "approxlog", "fsdp", "hostcheck", "graphs", "sync")


def parse_case(case: str) -> tuple[str, str]:
    """`CASE_FORM` -> (train.precision,
    model.gpu_kernels): ours-bf16 -> (bf16, fused), ours-autocast-fla -> (autocast, fla), ours-fla -> (auto, fla),
    ours -> (auto, fused). The last parts (MODIFIERS, in that order) are read by run_ours, case_graphs and case_sync
    and ignored here."""
    head, *rest = case.split("-")
    del rest[len(rest) - len(_modifiers(case)):]
    precision, kernels = "auto", "fused"
    if rest and rest[-1] in KERNELS:
        kernels = rest.pop()
    if rest and rest[0] in PRECISIONS:
        precision = rest.pop(0)
    mods = set(_modifiers(case))
    if (head != "ours" or rest or len(mods & {"split", "cat", "slab"}) > 1 or {"keepz", "nokeepz"} <= mods
            or len(mods & set(STATE_MODIFIERS)) > 1 or {"intra", "flaintra"} <= mods or {"mlpgemm", "mlpmerged"} <= mods
            or {"ce", "flace"} <= mods or {"gnorm", "flagnorm"} <= mods or {"flagnorm", "gnbwd"} <= mods
            or {"gatesplit", "approxlog"} <= mods or {"fladv", "dvtf32x3"} <= mods
            or {"fsdp", "graphs"} <= mods):  # the trainer refuses train.cuda_graphs under FSDP2
        raise ValueError(f"case {case!r}: use hf or {CASE_FORM}, "
                         f"PRECISION one of "
                         f"{', '.join(PRECISIONS)}, KERNELS fused or fla (e.g. ours-bf16-fla, ours-bf16-graphs)")
    return precision, kernels


def _modifiers(case: str) -> list[str]:
    parts = case.split("-")
    out = []
    for modifier in reversed(MODIFIERS):
        if len(parts) > 1 and parts[-1] == modifier:
            out.append(parts.pop())
    return out


def apply_modifiers(case: str, gated_norm_bwd=None) -> None:
    """Set, in this process, the module defaults a case's MODIFIERS name (models.fused's, models/kernels/gla.py's,
    trainer.loop's): the trainer run next in the process takes them. Also used by bench/precision_curve.py.
    gated_norm_bwd: the launch -gnbwd names (a models.kernels.rmsnorm.BackwardConfig)."""
    if "gnbwd" in _modifiers(case) and gated_norm_bwd is None:
        raise ValueError(f"case {case!r}: -gnbwd needs --gated-norm-bwd BT,WARPS,PER_SM,PREFETCH[,MAXNREG]")
    from models import fused
    projections = next((m for m in _modifiers(case) if m in fused.PROJECTIONS), None)
    if projections:  # each case runs in a process of its own: the trainer's fused.install takes it as its default
        fused.DEFAULT_PROJECTIONS = projections
    if "gatesplit" in _modifiers(case):
        fused.DEFAULT_GATE = "split"
    if "flachunk" in _modifiers(case):
        fused.DEFAULT_CHUNK = "fla"
    if "keepz" in _modifiers(case) or "nokeepz" in _modifiers(case):
        fused.DEFAULT_KEEP_Z = "keepz" in _modifiers(case)
    states = next((STATE_MODIFIERS[m] for m in _modifiers(case) if m in STATE_MODIFIERS), None)
    if states:
        from models.kernels import gla
        gla.SAVED_STATES = states
    if "intra" in _modifiers(case) or "flaintra" in _modifiers(case):
        from models.kernels import gla
        gla.INTRA = "ours" if "intra" in _modifiers(case) else "fla"
    if "fwdintra" in _modifiers(case):
        from models.kernels import gla
        gla.FWD_INTRA = "ours"
    if "fladv" in _modifiers(case):
        from models.kernels import gla
        gla.DV = "fla"
    if "dvtf32x3" in _modifiers(case):
        from models.kernels import gla
        gla.DV_DOT = "tf32x3"
    if "mlpgemm" in _modifiers(case):
        fused.DEFAULT_MLP = "gemm"
    if "mlpmerged" in _modifiers(case):
        fused.DEFAULT_MLP = "merged"
    if "ce" in _modifiers(case) or "flace" in _modifiers(case):
        fused.DEFAULT_LOSS = "ours" if "ce" in _modifiers(case) else "fla"
    if "gnorm" in _modifiers(case) or "flagnorm" in _modifiers(case):
        fused.DEFAULT_GATED_NORM = "ours" if "gnorm" in _modifiers(case) else "fla"
    if "gnbwd" in _modifiers(case):
        from models.kernels import gated_norm
        gated_norm.BACKWARD_CONFIG = gated_norm_bwd
    if "approxlog" in _modifiers(case):
        from models.kernels import gate
        gate.LOG = "approx"
    if "mulclip" in _modifiers(case):
        import trainer.loop as loop
        loop.CLIP_IN_STEP = False
    if "hostcheck" in _modifiers(case):
        import trainer.loop as loop
        loop.skips_on_device = lambda optimizer: False
    if case_sync(case):  # the baseline: each step read back before the next is launched
        import trainer.loop as loop
        launch = loop.launch_step

        def launch_and_read(*a, **kw):
            pending = launch(*a, **kw)
            pending.result()
            pending.ready = True  # the loop then logs it before launching the next, timed as it was read
            return pending
        loop.launch_step = launch_and_read


def case_graphs(case: str) -> bool:
    """Whether a case runs with train.cuda_graphs (a `-graphs` part at the end, or before `-sync`)."""
    return "graphs" in _modifiers(case)


def case_sync(case: str) -> bool:
    """Whether a case reads each step's loss right after launching it (a last `-sync` part)."""
    return "sync" in _modifiers(case)


def kernels_override(kernels: str) -> list[str]:
    """The trainer override for model.gpu_kernels. A trainer from before the key (no models/fused.py) runs
    FLA's modules only: "fla" needs no override there, "fused" is refused with the fix."""
    import dataclasses

    from trainer.config import ModelConfig
    if any(f.name == "gpu_kernels" for f in dataclasses.fields(ModelConfig)):
        return [f"model.gpu_kernels={kernels}"]
    if kernels == "fla":
        return []
    raise SystemExit("kernels fused: this checkout's trainer has no model.gpu_kernels (models/fused.py not merged); "
                     "run the FLA variant instead (case suffix -fla, e.g. ours-bf16-fla)")


def summarize(case: str, args, step_times: list[float], wait: list[float], peak_mem: float, device: str,
              kernels: str) -> dict:
    from models.flops import PEAK_BF16_TFLOPS
    f = flops_info(args.model, args.seq_len)
    times = step_times[args.warmup:]
    med = statistics.median(times)
    tps = args.batch * args.seq_len / med
    # the mean as well: where the lagged loop's per-step times jitter (one step logged short, the next long) the
    # median can sit on either side; the run's last step is left out (its time runs to its own read, not to the
    # next step's launch: ~half a step in the logs)
    mean = statistics.fmean(times[:-1]) if len(times) > 1 else med
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
    mfu = (lambda per_tok: per_tok * tps / (peak * 1e12)) if peak else (lambda per_tok: None)
    return {"case": case, "kernels": kernels, "model": os.path.basename(args.model), "params": f["params"],
            "device": device,
            "seq_len": args.seq_len, "batch": args.batch, "timed_steps": len(times),
            "median_step_s": med, "min_step_s": min(times), "max_step_s": max(times), "tokens_per_s": tps,
            "mean_step_s": mean, "tokens_per_s_mean": args.batch * args.seq_len / mean,
            "mfu_6n": mfu(f["six_n"]), "mfu_real_flops": mfu(f["real"]), "flops_per_token_6n": f["six_n"],
            "flops_per_token_real": f["real"], "data_wait_share": statistics.median(wait[args.warmup:]) if wait else None,
            "peak_mem_gib": peak_mem}


def run_ours(args, case: str = "ours") -> dict:
    import shutil

    import torch

    from trainer.config import load
    from trainer.loop import train
    from trainer.metrics import read_metrics
    precision, kernels = parse_case(case)
    out = os.path.join(args.dir, case)
    shutil.rmtree(out, ignore_errors=True)
    total = args.warmup + args.steps
    cfg = load(None, [f"model.config={args.model}", f"data.shards={args.shards}", f"data.global_batch={args.batch}",
                      f"train.max_steps={total}", f"train.micro_batch={args.batch}", "train.eval_every=0",
                      "optim.lr=3e-4", "optim.min_lr=3e-5", f"optim.warmup={args.warmup}", "optim.clip=1.0",
                      "checkpoint.at_end=false", "checkpoint.every=0",
                      f"parallel.mode={'fsdp' if 'fsdp' in _modifiers(case) else 'none'}",
                      f"run.out_dir={out}", "run.tensorboard=false", "run.progress=true", "run.progress_every=0",
                      f"train.compile={'true' if args.compile else 'false'}", f"train.precision={precision}"]
               + kernels_override(kernels) + (["train.cuda_graphs=true"] if case_graphs(case) else []))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    apply_modifiers(case, args.gated_norm_launch)
    train(cfg)
    records = read_metrics(out)
    times = [args.batch * args.seq_len / r["tokens_per_s"] for r in records]
    wait = [r["data_wait_share"] for r in records]
    return summarize(case, args, times, wait, max(r["memory_gib"] for r in records), device_name(), kernels)


def run_hf(args) -> dict:
    import numpy as np
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from models import build
    from shards.format import decode_block, read_blocks, read_manifest
    from shards.storage import LocalStorage

    storage = LocalStorage(args.shards)
    manifest = read_manifest(storage)
    rows = []
    for s in manifest.shards:
        for i, b in enumerate(read_blocks(storage, s)):
            rows.append(decode_block(storage.read_range(s.name, b.offset, b.length), b, manifest, f"{s.name}#{i}"))
    data = torch.from_numpy(np.concatenate(rows).astype(np.int64))

    class Sequences(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]

    def collate(items):
        x = torch.stack(items)
        return {"input_ids": x, "labels": x}

    config = build.load_config(args.model)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    build.adapt_to_device(config, torch.device(dev))
    model = build.build_model(config, "cpu", seed=0).to(dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.gaps, self._t, self._end = [], [], 0.0, None

        def on_step_begin(self, a, state, control, **kw):
            sync()
            self._t = time.perf_counter()
            if self._end is not None:
                self.gaps.append(self._t - self._end)

        def on_step_end(self, a, state, control, **kw):
            sync()
            self._end = time.perf_counter()
            self.times.append(self._end - self._t)
            log(f"hf step {len(self.times)}: {self.times[-1]:.3f}s")

    timer = Timer()
    targs = TrainingArguments(output_dir=os.path.join(args.dir, "hf"), per_device_train_batch_size=args.batch,
                              max_steps=args.warmup + args.steps, bf16=dev == "cuda", use_cpu=dev == "cpu",
                              optim="adamw_torch_fused",
                              learning_rate=3e-4, lr_scheduler_type="cosine", warmup_steps=args.warmup,
                              weight_decay=0.1, max_grad_norm=1.0, logging_steps=10, save_strategy="no",
                              report_to=[], dataloader_num_workers=2, remove_unused_columns=False,
                              torch_compile=args.compile, seed=0)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=targs, train_dataset=Sequences(), data_collator=collate, callbacks=[timer]).train()
    gaps = [0.0] + timer.gaps
    wait = [g / (g + t) for g, t in zip(gaps, timer.times)]
    from trainer.metrics import memory_gib
    return summarize("hf_trainer", args, timer.times, wait, memory_gib(torch.device(dev)), device_name(), "fla")


def device_name() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "configs", "gla_340M.json"))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16, help="sequences per step (one GPU, no accumulation)")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed first steps (compilation)")
    p.add_argument("--shards", default=None, help="shards dir (default: synthetic ones under --dir)")
    p.add_argument("--dir", default=os.path.join(ROOT, "bench", "out", "train"))
    p.add_argument("--cases", default="ours,hf",
                   help=f"comma-separated: hf, or {CASE_FORM} (e.g. ours-bf16-fla, ours-bf16-slab)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak (default: spec of the GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile in both cases")
    p.add_argument("--gated-norm-bwd", default="", metavar="BT,WARPS,PER_SM,PREFETCH[,MAXNREG]",
                   help="the launch of the gated norm's backward in -gnbwd cases (bench/norm_bench.py --gated-bwd-sweep)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case in this process
    args = p.parse_args()

    def gated_norm_launch():
        """--gated-norm-bwd parsed (None if not given). It imports triton: a CPU case process calls it only after
        models.cpu_triton.enable()."""
        if not args.gated_norm_bwd:
            return None
        from models.kernels.rmsnorm import parse_backward_config
        try:
            return parse_backward_config(args.gated_norm_bwd)
        except ValueError as e:
            p.error(f"--gated-norm-bwd: {e}")
    if not args.case:
        gated_norm_launch()  # refused before any case runs
    for case in (args.case or args.cases).split(","):
        if case != "hf":
            try:
                kernels = parse_case(case)[1]
            except ValueError as e:
                p.error(str(e))
            if "gnbwd" in _modifiers(case) and not args.gated_norm_bwd:
                p.error(f"case {case!r}: -gnbwd needs --gated-norm-bwd BT,WARPS,PER_SM,PREFETCH[,MAXNREG]")
            kernels_override(kernels)  # a fused case on a trainer without it stops here, before any case runs
    faulthandler.dump_traceback_later(600, repeat=True)  # a stuck cold compile shows where it is
    if args.shards is None:
        seqs = (args.warmup + args.steps + 2) * args.batch * 4  # enough blocks for one stream per row of the batch
        args.shards = write_synthetic_shards(os.path.join(args.dir, f"shards-{args.seq_len}"), seqs, args.seq_len, 32000)
    if args.case:
        import torch
        if not torch.cuda.is_available():  # CPU smoke runs: FLA kernels under the Triton interpreter
            from models import cpu_triton
            cpu_triton.enable()
        args.gated_norm_launch = gated_norm_launch()
        if args.case == "hf":
            result = run_hf(args)
        else:
            result = run_ours(args, args.case)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    results = []
    for case in args.cases.split(","):
        log(f"case {case}: {args.warmup} warmup + {args.steps} timed steps, batch {args.batch} x {args.seq_len}")
        cmd = [sys.executable, __file__, "--case", case, "--model", args.model, "--seq-len", str(args.seq_len),
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--shards", args.shards, "--dir", args.dir] + (
            ["--gated-norm-bwd", args.gated_norm_bwd] if args.gated_norm_bwd else []) + (["--peak-tflops", str(args.peak_tflops)]
                                                               if args.peak_tflops else []) + (
            ["--compile"] if args.compile else [])
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        for line in proc.stdout:
            if line.startswith("RESULT "):
                results.append(json.loads(line[7:]))
                print(line[7:].strip(), flush=True)
            else:
                sys.stderr.write(line)
        if proc.wait() != 0:
            log(f"case {case} failed with exit code {proc.returncode}")
    base = next((r for r in results if r["case"] == "hf_trainer"), results[0] if results else None)
    for r in results:
        if r is not base:
            log(f"{r['case']} / {base['case']} tokens/s: {r['tokens_per_s'] / base['tokens_per_s']:.3f} (median step), "
                f"{r['tokens_per_s_mean'] / base['tokens_per_s_mean']:.3f} (mean step)")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
