"""Are one run's weights really better than another's, by one yardstick? Every run's final weights, evaluated under
every training path, on the same held-out sequences.

    PYTHONUNBUFFERED=1 python bench/cross_eval.py --weights DIR[,DIR...] --paths autocast-fla,bf16-fused
        --shards VAL_SHARDS [--sequences 32] [--micro-batch 4] [--dir bench/out/cross_eval]

--weights: trainer run directories (their latest checkpoint is exported with `python -m trainer.export`, into
DIR/export) or HF model directories (a config.json there: used as they are).
--paths: bench/precision_curve.py's spelling, PRECISION-KERNELS[-MODIFIER...]; each path is a process of its own
(the modifiers are module defaults). It loads every run's weights (fp32, models.build.load_pretrained), installs
the path's kernels, and runs the forward the path trains with: bf16 on trainer.precision.MasterWeights' bf16
copies, autocast under bf16 autocast over the fp32 weights, fp32 as is.
Each cell of the printed matrix (rows: weights, columns: paths) holds two losses over the same sequences:
  xent: fp32 cross entropy of the path's logits (each row predicts its own tokens 1..L-1, as validation does);
  own:  the model's own loss, model(input_ids, labels=input_ids).loss: the number training logs.

What it tells (bench/precision_curve.py --eval-shards runs it after the curves):
  * a path whose training loss sits below another's, and whose weights score lower under the *other* path as well,
    learned better weights: not an artefact of its own forward;
  * weights that score well only under the path they were trained with point at that path's forward: a kernel
    that leaks later tokens into earlier positions is rewarded by its own forward and punished by a causal one;
  * own != xent in one column: that path's loss is computed differently from its logits (a biased loss).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def export_dir(weights: str) -> str:
    """An HF model directory for `weights`: itself if it holds a config.json, else DIR/export written from the run's
    latest checkpoint by trainer.export (replaced if it is an earlier export)."""
    if os.path.isfile(os.path.join(weights, "config.json")):
        return weights
    out = os.path.join(weights, "export")
    cmd = [sys.executable, "-m", "trainer.export", weights, out]
    if subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL).returncode != 0:
        raise SystemExit(f"cross_eval: {weights}: trainer.export failed (its error above); give a run directory "
                         f"with a checkpoint (checkpoint.at_end=true) or an HF model directory")
    return out


def worker(path: str, args) -> None:
    """Every model of --weights under one path: one JSON line each."""
    from bench.path_check import on_path, start_path
    precision, kernels, dev = start_path(path, args.cpu)
    import torch

    from models import build
    from trainer.data.validation import load_val_rows
    from trainer.parallel import Dist
    rows = load_val_rows(args.shards, args.sequences, Dist(device=dev))
    for weights in args.weights.split(","):
        model = build.load_pretrained(weights, dev)
        build.adapt_to_device(model.config, dev)
        prec, _ = on_path(model, precision, kernels, dev)  # train mode: the forward training runs
        xent = own = 0.0
        with torch.no_grad(), prec.compute():
            for i in range(0, rows.shape[0], args.micro_batch):
                x = rows[i:i + args.micro_batch].to(dev)
                with prec.autocast():
                    logits = model(input_ids=x).logits
                    own += model(input_ids=x, labels=x).loss.float().item() * x.shape[0]
                xent += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(),
                                                          reduction="mean").item() * x.shape[0]
                del logits
        n = rows.shape[0]
        print(json.dumps({"weights": weights, "path": path, "sequences": n, "tokens": n * (rows.shape[1] - 1),
                          "xent": xent / n, "own": own / n}), flush=True)
        del model, prec
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def cross_eval(weights: list[str], paths: list[str], shards: str, sequences: int = 32, micro_batch: int = 4,
               cpu: bool | None = None) -> list[dict]:
    """Export what needs it, run one worker per path; returns every (weights, path) cell and prints the matrix.
    cpu None: on the CPU where no GPU is seen. The paths are parsed by the caller (main, precision_curve) first."""
    if cpu is None:
        import torch
        cpu = not torch.cuda.is_available()
    models = [export_dir(w) for w in weights]
    cells = []
    for p in paths:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", p, "--weights", ",".join(models),
               "--shards", shards, "--sequences", str(sequences), "--micro-batch", str(micro_batch)]
        res = subprocess.run(cmd + (["--cpu"] if cpu else []), cwd=ROOT, stdout=subprocess.PIPE, text=True)
        got = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
        if res.returncode != 0:
            print(f"cross_eval: path {p} failed (exit {res.returncode}; its output above)", flush=True)
        cells += got
    names = dict(zip(models, weights))
    for c in cells:
        c["weights"] = names.get(c["weights"], c["weights"])
        print(json.dumps(c), flush=True)
    width = max(len(w) for w in weights) + 2
    head = "weights / path (xent / own)"
    print(f"{head:<{width}}" + "".join(f"{p:>26}" for p in paths))
    for w in weights:
        line = f"{w:<{width}}"
        for p in paths:
            c = next((c for c in cells if c["weights"] == w and c["path"] == p), None)
            line += f"{c['xent']:>14.4f} / {c['own']:<9.4f}" if c else f"{'failed':>26}"
        print(line, flush=True)
    return cells


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="run directories or HF model directories, comma-separated")
    p.add_argument("--paths", default="autocast-fla,bf16-fused", help="PRECISION-KERNELS[-MODIFIER...], comma-separated")
    p.add_argument("--shards", required=True, help="held-out shards (e.g. `make shards`' data/shards/shakespeare-val)")
    p.add_argument("--sequences", type=int, default=32, help="the first N sequences of --shards")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--cpu", action="store_true", default=None,
                   help="on the CPU, kernels under the Triton interpreter (tiny models; the default without a GPU)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args)
        return 0
    from bench.precision_curve import parse_run
    try:
        for path in args.paths.split(","):
            parse_run(path)
    except ValueError as e:
        p.error(f"--paths: {e}")
    cells = cross_eval(args.weights.split(","), args.paths.split(","), args.shards, args.sequences, args.micro_batch,
                       args.cpu)
    return 0 if len(cells) == len(args.weights.split(",")) * len(args.paths.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
