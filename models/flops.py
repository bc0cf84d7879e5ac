"""FLOPs per trained token that an FLA model actually spends, counted from its real layers.

MFU is only honest if the numerator counts the work the model does. 6N (N = parameters) assumes every
parameter is a matmul weight used once per token and ignores token mixing. Here, per token, forward:

  matmuls      2 * in * out for every nn.Linear (the LM head included, also when tied to the embedding;
               the embedding lookup itself is not a matmul and counts 0)
  convolutions 2 * weight.numel() for every nn.Conv1d (FLA's short convolutions, Mamba2's conv)
  mixing       per token-mixing layer, from its real head sizes (H heads, dk/dv key/value head dims):
    softmax attention (causal, T tokens): 4 * H * dh * k_avg, k_avg = (T + 1) / 2 keys per query
                                          (min(window, ...) with a sliding window)
    chunked linear attention (GLA, RetNet; chunk C = 64, C = T if T < 64): per head
        2*C*dk (Q K^T in the chunk) + 2*C*dv (A V) + 2*dk*dv (Q S, inter-chunk) + 2*dk*dv (K^T V, state update)
    delta rule (DeltaNet, GatedDeltaNet; chunk 64, WY form): the linear-attention terms above plus
        2*C*dk (K K^T) + 2*C^2/3 (triangular solve) + 2*C*dk (W = A K) + 2*C*dv (U = A V) + 2*dk*dv (U - W S)
    Mamba2 SSD (chunk C = chunk_size, N state, P head dim, G groups):
        G * 2*C*N (C B^T) + H * (2*C*P + 2*N*P + 2*N*P)
Training = 3 * forward (backward costs two matmuls per forward matmul). FLA's backward also recomputes
parts of the forward (chunk states); that recomputation is not counted: MFU counts useful work.
Elementwise ops, norms, gates and softmax are not counted (as in 6N).
"""
from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)

LINEAR_ATTENTION = {"GatedLinearAttention": 64, "MultiScaleRetention": 64}
DELTA_RULE = {"DeltaNet": 64, "GatedDeltaNet": 64}


def _linear_attention(h: int, dk: int, dv: int, c: int) -> float:
    return h * (2 * c * dk + 2 * c * dv + 4 * dk * dv)


def mixing_flops(module: nn.Module, seq_len: int) -> float | None:
    """Forward token-mixing FLOPs per token of one mixer layer, or None if it is not a known mixer."""
    name = type(module).__name__
    if name == "Attention":
        h, dh = module.num_heads, module.head_dim
        keys = (seq_len + 1) / 2
        if getattr(module, "window_size", None):
            w = module.window_size
            keys = min(w, seq_len) - (min(w, seq_len) ** 2 - min(w, seq_len)) / (2 * seq_len)  # mean over positions
        return 4 * h * dh * keys
    if name in LINEAR_ATTENTION:
        c = min(LINEAR_ATTENTION[name], seq_len)
        return _linear_attention(module.num_heads, module.head_k_dim, module.head_v_dim, c)
    if name in DELTA_RULE:
        c = min(DELTA_RULE[name], seq_len)
        h = getattr(module, "num_v_heads", module.num_heads)
        dk, dv = module.head_k_dim, module.head_v_dim
        return _linear_attention(h, dk, dv, c) + h * (4 * c * dk + 2 * c * c / 3 + 2 * c * dv + 2 * dk * dv)
    if name == "Mamba2":
        c = min(module.chunk_size, seq_len)
        n, p, g, h = module.ssm_state_size, module.head_dim, module.n_groups, module.num_heads
        return g * 2 * c * n + h * (2 * c * p + 4 * n * p)
    return None


def flops_per_token(model: nn.Module, seq_len: int) -> dict:
    """{"matmul", "conv", "mixing", "forward", "train"} FLOPs per token for sequences of `seq_len` tokens."""
    matmul = conv = mixing = 0.0
    seen = set()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            matmul += 2 * module.in_features * module.out_features
        elif isinstance(module, nn.Conv1d):
            conv += 2 * module.weight.numel()
        m = mixing_flops(module, seq_len)
        if m is not None:
            mixing += m
        elif type(module).__name__ not in seen and _looks_like_mixer(module):
            seen.add(type(module).__name__)
            log.warning("FLOPs: token mixing of %s is not counted (unknown layer type); MFU is a lower bound",
                        type(module).__name__)
    forward = matmul + conv + mixing
    return {"matmul": matmul, "conv": conv, "mixing": mixing, "forward": forward, "train": 3 * forward}


def _looks_like_mixer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("fla.layers.") and hasattr(module, "o_proj")


def six_n(model: nn.Module) -> float:
    """The usual 6 * N estimate of training FLOPs per token (N counts tied weights once)."""
    from models.build import count_parameters
    return 6.0 * count_parameters(model)


# Dense bf16 peak of accelerators (vendor spec sheets), for MFU. Anything else: set run.peak_tflops.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "B200": 2250.0}


def peak_flops(device) -> float | None:
    import torch
    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None
