"""AdamW with weight decay only on matrices that are not embeddings (no decay on norms, biases, embeddings).

Fused AdamW only on CUDA (the fused CPU path differs in rounding and is not what GPUs run)."""
from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # Matrices of Linear/Conv layers decay; vectors (norm scales, biases, Mamba's A_log/D/dt_bias),
        # embeddings (and an LM head tied to them) and params FLA marks _no_weight_decay do not.
        if p.ndim < 2 or id(p) in embedding_params or getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas),
                             eps=optim.eps, fused=device.type == "cuda")
