"""One CPU training step of the demo GLA: the PyTorch ops (model.cpu_kernels=torch) vs FLA's Triton kernels
under the Triton interpreter (model.cpu_kernels=triton, the baseline), in the same process.

    python bench/cpu_kernels_bench.py [--model configs/demo_gla.json] [--batch 2] [--seq-len 256] [--rounds 5]

The step is the trainer's: forward with labels, backward, clip_grad_norm_(1.0), AdamW step, zero_grad; random
tokens (the cost does not depend on them). Each path trains its own copy of the same initial model; the two
alternate, one interpreter step then --torch-per-round PyTorch steps per round, so that a change in the
machine's load hits both. Before timing, both compute the loss and gradients at the same weights: their
largest differences are printed (per tensor: max |torch - triton| and that over max |triton|).
Prints a table and one JSON line (RESULT {...}).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "configs", "demo_gla.json"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after one untimed step of each path)")
    p.add_argument("--torch-per-round", type=int, default=5)
    args = p.parse_args()

    from models import cpu_triton
    cpu_triton.enable()
    import torch

    from models import build, cpu_torch

    config = build.load_config(args.model)
    build.adapt_to_device(config, torch.device("cpu"))
    assert cpu_torch.unsupported_reason(config) is None, cpu_torch.unsupported_reason(config)
    base = build.build_model(config, "cpu", seed=0)
    base.train()
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    load0 = os.getloadavg()[0]

    # numerics at the same weights
    def loss_and_grads(model):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss.item(), {n: q.grad.detach().clone() for n, q in model.named_parameters()}

    cpu_torch.uninstall()
    ref_loss, ref_grads = loss_and_grads(base)
    cpu_torch.install()
    loss, grads = loss_and_grads(base)
    cpu_torch.uninstall()
    base.zero_grad(set_to_none=True)
    max_abs = max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
    max_rel = max((grads[n] - ref_grads[n]).abs().max().item() / max(ref_grads[n].abs().max().item(), 1e-30)
                  for n in ref_grads)
    worst = max(ref_grads, key=lambda n: (grads[n] - ref_grads[n]).abs().max().item()
                / max(ref_grads[n].abs().max().item(), 1e-30))

    # timing: the trainer's step, each path on its own copy of the model
    paths = {}
    for name in ("triton", "torch"):
        model = copy.deepcopy(base)
        paths[name] = {"model": model, "opt": torch.optim.AdamW(model.parameters(), lr=1e-3), "times": [],
                       "losses": []}

    def step(name):
        (cpu_torch.install if name == "torch" else cpu_torch.uninstall)()
        s = paths[name]
        t = time.perf_counter()
        loss = s["model"](input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s["model"].parameters(), 1.0)
        s["opt"].step()
        s["opt"].zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        s["losses"].append(loss.item())
        return dt

    step("triton")
    step("torch")
    for _ in range(args.rounds):
        paths["triton"]["times"].append(step("triton"))
        for _ in range(args.torch_per_round):
            paths["torch"]["times"].append(step("torch"))
    cpu_torch.uninstall()

    med = {name: statistics.median(s["times"]) for name, s in paths.items()}
    tokens = args.batch * args.seq_len
    result = {
        "model": os.path.relpath(args.model, ROOT), "batch": args.batch, "seq_len": args.seq_len,
        "threads": torch.get_num_threads(), "loadavg_start": round(load0, 2), "loadavg_end": round(os.getloadavg()[0], 2),
        "triton_step_s": round(med["triton"], 4), "torch_step_s": round(med["torch"], 4),
        "triton_steps_timed": len(paths["triton"]["times"]), "torch_steps_timed": len(paths["torch"]["times"]),
        "speedup": round(med["triton"] / med["torch"], 1),
        "triton_tokens_per_s": round(tokens / med["triton"]), "torch_tokens_per_s": round(tokens / med["torch"]),
        "loss_triton": ref_loss, "loss_torch": loss, "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss),
        "grad_max_abs_diff": max_abs, "grad_max_rel_diff": max_rel, "grad_worst_tensor": worst,
        "losses_after_steps": {name: [round(v, 4) for v in s["losses"][:3]] for name, s in paths.items()},
    }
    print(f"{'path':<8} {'median step s':>14} {'tokens/s':>10} {'steps timed':>12}")
    for name in ("triton", "torch"):
        print(f"{name:<8} {med[name]:>14.4f} {tokens / med[name]:>10.0f} {len(paths[name]['times']):>12}")
    print(f"speedup (triton / torch): {result['speedup']}x; loss {ref_loss:.6f} vs {loss:.6f} "
          f"(rel diff {result['loss_rel_diff']:.2e}); grads: max abs diff {max_abs:.2e}, max rel diff {max_rel:.2e} "
          f"({worst}); load average {result['loadavg_start']} -> {result['loadavg_end']}")
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
