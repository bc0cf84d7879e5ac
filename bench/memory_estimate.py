"""Peak GPU memory per GPU of a GLA training run, estimated from the model's shapes (no GPU needed).

    python bench/memory_estimate.py [--model configs/gla_1B.json] [--gpus 1,2,4] [--micro-batch 4]
        [--seq-len 2048] [--mode fsdp] [--precision bf16] [--accumulation 1] [--defer-reduce] [--json]

Terms (bytes; N parameters, W GPUs, T = micro-batch x seq-len tokens per forward pass):
  weights      fp32 master weights: 4N/W under FSDP2 (sharded), 4N otherwise
  optimizer    AdamW's two fp32 moments: 8N/W under FSDP2, 8N otherwise
  grads        fp32 gradients. FSDP2: sharded, created during backward (4N/W, mostly after the activation peak,
               so left out of the peak with one micro-batch a step; with --accumulation K > 1 the earlier
               micro-batches' gradients are there at the next one's peak: 4N/W, or 4N unsharded with
               --defer-reduce, parallel.fsdp_defer_reduce); train.precision=bf16 without FSDP: the persistent
               fp32 buffer (4N);
               autocast without FSDP: 0 at the peak (set to None each step), DDP keeps 4N in its buckets
  compute      the weights the kernels read. FSDP2: bf16 copies of the root (embedding, head) and of two
               blocks (the one computing and the one prefetched); bf16 without FSDP: a bf16 copy (2N);
               autocast: its cache of bf16 casts (2N)
  activations  tensors saved for backward, counted per token from the GLA block's shapes (bf16 unless said):
               block input h, normed input h, q dk, k dk, v dv, cumulative log-decay dk (fp32), the chunk
               attention matrix heads*64 (fp32), output o dv, output gate dv (if any), gated-norm output dv,
               residual h, normed residual h, gate and up projections 2*i (SwiGLU recomputes its output);
               times L layers; plus the logits, V per token in bf16 and an fp32 copy in the loss (6V bytes).
               With activation checkpointing: the block inputs (h per token per layer), one block's full set
               (the block being recomputed) and the logits.
Peak = weights + optimizer + grads + compute + activations. Not counted: the CUDA context (~0.5 GiB, outside
torch's allocator), allocator fragmentation, NCCL buffers, kernel workspaces. BENCHMARKS.md compares the
estimate with torch.cuda.max_memory_allocated of real runs (340M and 1B, FSDP2 on 1 and 2 GPUs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GIB = 2 ** 30


def shapes(model_json: str) -> dict:
    """Sizes of a GLA model read off a meta-device build of it."""
    from models import build
    model = build.build_model(build.load_config(model_json), "meta")
    cfg = model.config
    block = model.model.layers[0]
    attn, mlp = block.attn, block.mlp
    heads = attn.num_heads
    return {"params": build.count_parameters(model), "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "vocab": cfg.vocab_size, "heads": heads,
            "dk": attn.head_k_dim * heads, "dv": attn.head_v_dim * heads,  # as the kernel sees them (GQA expanded)
            "gate": attn.head_v_dim * heads if getattr(attn, "use_output_gate", True) else 0,
            "inter": mlp.gate_proj.out_features,
            "block_params": sum(p.numel() for p in block.parameters()),
            "root_params": sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n)}


def block_elements_per_token(s: dict) -> float:
    """bf16-sized elements one GLA block saves for backward per token (fp32 tensors count twice)."""
    h, dk, dv = s["hidden"], s["dk"], s["dv"]
    return (h + h + dk + dk + dv + 2 * dk + 2 * s["heads"] * 64 + dv + s["gate"] + dv + h + h + 2 * s["inter"])


def estimate(s: dict, gpus: int, micro: int, seq: int, mode: str, precision: str, checkpointing: bool,
             accumulation: int = 1, defer_reduce: bool = False) -> dict:
    n, fsdp = s["params"], mode == "fsdp"
    w = gpus if fsdp else 1
    tokens = micro * seq
    out = {"weights": 4 * n / w, "optimizer": 8 * n / w}
    if fsdp:
        out["grads"] = 0.0 if accumulation == 1 else 4 * n if defer_reduce else 4 * n / w
        out["compute"] = 2 * (s["root_params"] + 2 * s["block_params"])
    else:
        out["grads"] = 4 * n if (precision == "bf16" or (mode == "ddp" and gpus > 1)) else 0.0
        out["compute"] = 2 * n
    per_layer = block_elements_per_token(s) * 2
    logits = 6 * s["vocab"]
    if checkpointing:
        out["activations"] = tokens * (s["layers"] * s["hidden"] * 2 + per_layer + logits)
    else:
        out["activations"] = tokens * (s["layers"] * per_layer + logits)
    out["peak"] = sum(out.values())
    return {k: v / GIB for k, v in out.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "configs", "gla_1B.json"))
    p.add_argument("--gpus", default="1,2,4")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--mode", default="fsdp", choices=["fsdp", "ddp", "none"])
    p.add_argument("--precision", default="bf16", choices=["bf16", "autocast"])
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--defer-reduce", action="store_true", help="fsdp: parallel.fsdp_defer_reduce=true")
    p.add_argument("--json", action="store_true", help="one JSON line per row instead of the table")
    args = p.parse_args()
    s = shapes(args.model)
    name = os.path.basename(args.model)
    if not args.json:
        print(f"{name}: {s['params'] / 1e9:.3f}B parameters, {s['layers']} layers, hidden {s['hidden']}; "
              f"{args.mode}, {args.precision}, micro-batch {args.micro_batch} x {args.seq_len}; GiB per GPU")
        print(f"{'GPUs':>4} {'AC':>3} {'weights':>8} {'optim':>8} {'grads':>8} {'compute':>8} {'activ':>8} {'peak':>8}")
    for g in (int(x) for x in args.gpus.split(",")):
        for ac in (False, True):
            e = estimate(s, g, args.micro_batch, args.seq_len, args.mode, args.precision, ac, args.accumulation,
                         args.defer_reduce)
            if args.json:
                print(json.dumps({"model": name, "gpus": g, "mode": args.mode, "precision": args.precision,
                                  "micro_batch": args.micro_batch, "seq_len": args.seq_len,
                                  "accumulation": args.accumulation, "defer_reduce": args.defer_reduce,
                                  "activation_checkpointing": ac, **{k: round(v, 3) for k, v in e.items()}}))
            else:
                print(f"{g:>4} {'yes' if ac else 'no':>3} {e['weights']:8.2f} {e['optimizer']:8.2f} {e['grads']:8.2f} "
                      f"{e['compute']:8.2f} {e['activations']:8.2f} {e['peak']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
