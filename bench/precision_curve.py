"""Does a precision path (or kernel set) learn the same? Runs of the real trainer, same data, init and schedule,
differing only in train.precision and model.gpu_kernels; prints each run's per-step training losses against the
first run's and the largest relative gap.

    PYTHONUNBUFFERED=1 python bench/precision_curve.py --shards DIR [--model configs/gla_340M.json]
        [--steps 300] [--batch 8] [--warmup 30] [--skip 30] [--runs autocast-fla,autocast-fla,bf16-fused,bf16-fla]
        [--parallel none] [--eval-shards VAL_SHARDS [--eval-sequences 32]]

--runs: PRECISION[-KERNELS][-MODIFIER...][@SEED] for each run, comma-separated, in order (KERNELS: fused, our fused blocks, or
fla, FLA's modules; left out: the trainer's default, model.gpu_kernels not set; MODIFIERs: bench/train_bench.py's case modifiers
such as -mlpgemm or -fwdintra, set in the trainer's process; SEED: model.seed, the init, 0 when
left out: the batches are the same in every run); --precisions is the older spelling. The first run is the
reference. Name the reference twice for a noise floor: GPU runs are not always bitwise repeatable (FLA's backward
kernels use atomics), so the gap between two runs of the same path is what "the same learning" can mean. Where two
runs of a path are bitwise equal, name it with another seed (autocast-fla@1): the gap between two inits of one path
is the spread the training itself has at that length.
--skip: steps left out of the comparison (warm-up). Prints one JSON line per run after the first: the largest
|loss_run - loss_ref| / loss_ref over the compared steps, its step, the mean relative gap, both runs' mean loss
over the last 10 steps, and whether the run repeats the reference's path (`noise_floor`); then a one-line
summary per run and the gaps of the other pairs of runs, then every 25th step's losses of all runs; every
run's per-step losses go to DIR/curves.json.
--eval-shards: each run also saves its final checkpoint, and bench/cross_eval.py then evaluates every run's final
weights under every run's path on the first --eval-sequences sequences of these held-out shards: whether a curve
below the reference's comes from better weights (lower under the reference's forward too) or from its own forward.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PRECISIONS = ("auto", "bf16", "autocast", "fp32")


def run_modifiers(run: str) -> list[str]:
    """The train_bench MODIFIERS at the end of a run's path (bf16-fused-mlpgemm -> ["mlpgemm"]), in their order."""
    from bench.train_bench import _modifiers
    return list(reversed(_modifiers("ours-" + run.partition("@")[0])))


def parse_run(run: str) -> tuple[str, str | None, int]:
    """PRECISION[-KERNELS][-MODIFIER...][@SEED] -> (train.precision, model.gpu_kernels, model.seed); no KERNELS: None,
    the trainer's default; no SEED: 0. MODIFIERS (run_modifiers): bench/train_bench.py's case modifiers, set in the
    trainer's process (apply_modifiers); -sync is not one here."""
    path, at, seed = run.partition("@")
    mods = run_modifiers(run)
    parts = path.split("-")
    precision, _, kernels = "-".join(parts[:len(parts) - len(mods)]).partition("-")
    if (precision not in PRECISIONS or kernels not in ("", "fused", "fla") or (at and not seed.isdigit())
            or "sync" in mods):
        raise ValueError(f"run {run!r}: use PRECISION[-KERNELS][-MODIFIER...][@SEED], PRECISION one of "
                         f"{', '.join(PRECISIONS)}, KERNELS fused or fla, MODIFIERs bench/train_bench.py's but sync, "
                         f"SEED a non-negative integer (e.g. autocast-fla@1, bf16-fused-mlpgemm)")
    return precision, kernels or None, int(seed) if at else 0


def labels(runs: list[str]) -> list[str]:
    """Unique names for the runs: a repeated run gets #2, #3, ... (autocast-fla, autocast-fla#2)."""
    seen: dict[str, int] = {}
    out = []
    for r in runs:
        seen[r] = seen.get(r, 0) + 1
        out.append(r if seen[r] == 1 else f"{r}#{seen[r]}")
    return out


def compare(ref: list[float], run: list[float], skip: int) -> dict:
    """Largest and mean relative gap of `run`'s per-step loss to `ref`'s over the steps from `skip` on."""
    gaps = [(abs(y - x) / x, s) for s, (x, y) in enumerate(zip(ref, run)) if s >= skip]
    if not gaps:
        raise ValueError(f"no steps to compare: the runs logged {min(len(ref), len(run))} steps, --skip {skip}")
    worst, at = max(gaps)
    return {"max_rel_gap": worst, "at_step": at, "mean_rel_gap": sum(g for g, _ in gaps) / len(gaps)}


def floor_note(r: dict) -> str:
    if not r["noise_floor"]:
        return ""
    if r["seed"] == r["reference_seed"]:
        return "   <- noise floor (same path, same seed)"
    return f"   <- noise floor (same path, init seed {r['seed']})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shards of real text (e.g. `make shards SEQ_LEN=2048`)")
    p.add_argument("--model", default="configs/gla_340M.json")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--warmup", type=int, default=30, help="optim.warmup")
    p.add_argument("--skip", type=int, default=30, help="first steps not compared")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--runs", default=None,
                   help="PRECISION[-KERNELS] per run, comma-separated; the first is the reference "
                        "(default: autocast,bf16, both with the trainer's default kernels)")
    p.add_argument("--precisions", default=None, help="older spelling of --runs (precisions only)")
    p.add_argument("--parallel", default="none")
    p.add_argument("--dir", default=os.path.join(ROOT, "bench", "out", "precision"))
    p.add_argument("--eval-shards", default=None, help="held-out shards: cross-evaluate the runs' final weights "
                   "(bench/cross_eval.py) under every run's path")
    p.add_argument("--eval-sequences", type=int, default=32)
    args = p.parse_args()
    if args.runs and args.precisions:
        p.error("give --runs or --precisions, not both")
    runs = (args.runs or args.precisions or "autocast,bf16").split(",")
    try:
        parsed = [parse_run(r) for r in runs]
    except ValueError as e:
        p.error(str(e))
    if len(runs) < 2:
        p.error("name at least two runs: the reference first, then the runs compared with it")
    from bench.train_bench import kernels_override
    # fused on a trainer without model.gpu_kernels: refused here, before any run
    overrides = [(kernels_override(k) if k else []) + [f"model.seed={seed}"] for _, k, seed in parsed]
    from trainer.metrics import read_metrics
    names = labels(runs)
    curves: dict[str, list[float]] = {}
    results = []
    run_dirs = {}
    for i, (name, run, (prec, _, _), extra) in enumerate(zip(names, runs, parsed, overrides)):
        out = os.path.join(args.dir, f"{i}-{name.replace('#', '_')}")
        shutil.rmtree(out, ignore_errors=True)
        run_dirs[name] = out
        mods = run_modifiers(run)
        # modifiers are module defaults: set them in the trainer's own process before it starts
        launcher = ([sys.executable, "-c", "import sys; from bench.train_bench import apply_modifiers; "
                     "apply_modifiers(sys.argv.pop(1)); from trainer.__main__ import main; sys.exit(main())",
                     "ours-" + "-".join(mods)] if mods else [sys.executable, "-m", "trainer"])
        cmd = launcher + ["configs/demo.toml", f"model.config={args.model}", f"data.shards={args.shards}",
               "data.val_shards=none", f"data.global_batch={args.batch}", f"train.max_steps={args.steps}",
               "train.micro_batch=none", "train.eval_every=0",
               f"train.precision={prec}", f"optim.lr={args.lr}", f"optim.min_lr={args.lr / 10}",
               f"optim.warmup={args.warmup}", "checkpoint.every=0",
               f"checkpoint.at_end={'true' if args.eval_shards else 'false'}",
               f"parallel.mode={args.parallel}", f"run.out_dir={out}", "run.tensorboard=false",
               "run.progress_every=30"] + extra + (["train.cuda_graphs=true"] if "graphs" in mods else [])
        print(f"precision_curve: {name}: {' '.join(cmd[len(launcher) + 1:])}", file=sys.stderr, flush=True)
        code = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode
        if code != 0:  # the others still run and compare; without the reference there is nothing to compare
            print(f"precision_curve: {name} failed (exit {code})", file=sys.stderr, flush=True)
            if i == 0:
                return 1
            continue
        curves[name] = cur = [r["loss"] for r in read_metrics(out)]
        if i == 0:
            continue
        ref_name, ref = names[0], curves[names[0]]
        r = {"reference": ref_name, "candidate": name, "noise_floor": run.partition("@")[0] == runs[0].partition("@")[0],
             "seed": parsed[i][2], "reference_seed": parsed[0][2],
             "model": os.path.basename(args.model), "steps": min(len(ref), len(cur)), "batch": args.batch,
             "compared_from_step": args.skip, **compare(ref, cur, args.skip),
             f"last10_{ref_name}": sum(ref[-10:]) / len(ref[-10:]), f"last10_{name}": sum(cur[-10:]) / len(cur[-10:])}
        results.append(r)
        print(json.dumps(r), flush=True)  # each as soon as its run ends: a stage cut short keeps the ones done
    if args.eval_shards:
        from bench.cross_eval import cross_eval
        paths = list(dict.fromkeys(r.partition("@")[0] for n, r in zip(names, runs) if n in curves))
        cross_eval([run_dirs[n] for n in names if n in curves], paths, args.eval_shards, args.eval_sequences,
                   micro_batch=min(args.batch, args.eval_sequences))
    ref_name, ref = names[0], curves[names[0]]
    for r in results:
        print(f"vs {ref_name}: {r['candidate']:<16} max gap {r['max_rel_gap']:.3%} (step {r['at_step']}), "
              f"mean {r['mean_rel_gap']:.3%}{floor_note(r)}")
    done = [n for n in names if n in curves]
    for i, a in enumerate(done):  # every other pair too: two noise floors can be read against each other
        for b in done[i + 1:]:
            if a == ref_name:
                continue
            g = compare(curves[a], curves[b], args.skip)
            print(f"{a} vs {b}: max gap {g['max_rel_gap']:.3%} (step {g['at_step']}), mean {g['mean_rel_gap']:.3%}")
    with open(os.path.join(args.dir, "curves.json"), "w") as f:
        json.dump({"runs": runs, "skip": args.skip, "losses": curves}, f)
    print("step  " + "  ".join(f"{n:>14}" for n in done))
    for s in range(0, len(ref), 25):
        print(f"{s:4d}  " + "  ".join(f"{curves[n][s]:14.4f}" if s < len(curves[n]) else f"{'':>14}" for n in done))
    return 0 if len(done) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
