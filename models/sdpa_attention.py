"""Softmax attention for FLA's `transformer` model on PyTorch SDPA, for machines without flash-attn.

FLA's `fla.layers.attn.Attention` calls two module-level functions, `flash_attn_func` and
`flash_attn_varlen_func`, and refuses to build when flash-attn is absent. `install()` binds those two
names to the SDPA versions below (only when flash-attn is not importable), so the model code is unchanged.

Semantics follow flash-attn: q [B, T, H, D], k/v [B, S, Hkv, D] (GQA when Hkv < H); causal masks are
aligned bottom-right (query i sees keys up to S - T + i, what decoding with a cache needs);
window_size (left, 0) limits each query to the last `left + 1` keys. The varlen form takes packed
[total, H, D] tensors and cu_seqlens; each document attends only within itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _mask(t: int, s: int, causal: bool, window_left: int, device) -> torch.Tensor | None:
    if not causal and window_left < 0:
        return None
    q_pos = torch.arange(t, device=device)[:, None] + (s - t)
    k_pos = torch.arange(s, device=device)[None, :]
    allowed = torch.ones(t, s, dtype=torch.bool, device=device)
    if causal:
        allowed &= k_pos <= q_pos
    if window_left >= 0:
        allowed &= k_pos >= q_pos - window_left
    return allowed


def _attend(q, k, v, causal: bool, window_size, softmax_scale=None) -> torch.Tensor:
    """q [B, T, H, D], k/v [B, S, Hkv, D] -> [B, T, H, D]."""
    t, s = q.shape[1], k.shape[1]
    window_left = -1 if window_size is None else window_size[0]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if k.shape[1] != q.shape[1]:  # GQA: repeat kv heads (explicit: works for every SDPA backend)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if causal and t == s and window_left < 0:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(t, s, causal, window_left, q.device),
                                           scale=softmax_scale)
    return o.transpose(1, 2)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **_):
    return _attend(q, k, v, causal, window_size, softmax_scale)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **_):
    """Packed documents: one SDPA call per document (no [total, total] mask is ever built)."""
    out = torch.empty_like(q)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bq) - 1):
        qs, qe, ks, ke = bq[i], bq[i + 1], bk[i], bk[i + 1]
        if qe == qs:
            continue
        out[qs:qe] = _attend(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], causal, window_size, softmax_scale)[0]
    return out


def install() -> bool:
    """Bind FLA's attention entry points to SDPA when flash-attn is absent. Returns True if it did."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportWarning)
        import fla.layers.attn as attn
    if attn.flash_attn_func is not None and attn.flash_attn_func is not flash_attn_func:
        return False  # real flash-attn is installed: keep it
    attn.flash_attn_func = flash_attn_func
    attn.flash_attn_varlen_func = flash_attn_varlen_func
    return True
