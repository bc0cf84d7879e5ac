"""Pure-PyTorch versions of the FLA ops a GLA model trains with: the fast CPU path.

On a machine without a GPU, FLA's Triton kernels run under the Triton interpreter (models/cpu_triton.py):
correct, but seconds per step even for a 2-layer toy model. The functions here compute the same things
with ordinary PyTorch tensor ops (float32 inside, autograd for the backward pass), and `install()` puts
them in place of the names FLA's GLA modules look up when they run:

    fla.layers.gla.chunk_gla                     GLA's attention, sequences longer than 64 tokens
    fla.layers.gla.fused_recurrent_gla           GLA's attention, sequences of <= 64 tokens
    fla.modules.norm.layernorm.rms_norm          RMSNorm (block pre-norms with the fused residual add, final norm)
    fla.modules.norm.fused_norm_gate.rms_norm_gated   FusedRMSNormGated (GLA's output norm * swish gate)
    fla.modules.mlp.swiglu, .swiglu_linear       GatedMLP (fuse_swiglu on or off)

These are all the Triton kernels a GLA forward + backward launches with fuse_cross_entropy off (the
loss is then torch's cross entropy); the list was taken by counting interpreter launches, and
tests/test_cpu_torch.py checks that none is left. FLA's own functions stay where they are defined
(`fla.ops.gla.chunk_gla`, ...) and `uninstall()` puts the patched names back, so the interpreter path
remains available in the same process. Calls with arguments these versions do not handle (a value
gate `gv`, `reverse=True`) go to FLA's original function.

Only GLA configurations whose every op is covered take this path: `unsupported_reason(config)` names
what is not covered (another model type, short convolutions, feature maps, ...), and the trainer then
keeps the interpreter for the whole model (`select()` logs which one it uses).
"""
from __future__ import annotations

import importlib
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CHUNK = 64  # tokens per chunk of the chunked GLA form (as FLA's kernels on long sequences)


# ---------------------------------------------------------------------------------------------------------
# GLA: o_t = scale * q_t S_t,  S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t  (S: [K, V] per batch row and head)
# ---------------------------------------------------------------------------------------------------------

def _gla_chunked(q, k, v, g, scale: float, h0=None, seg=None, chunk: int = CHUNK):
    """The GLA recurrence in chunked form. q, k, g: [B, H, T, K]; v: [B, H, T, V]; float32.

    Inside a chunk every output is a masked sum over the chunk's earlier tokens, with the decay between
    token j and token i written as exp(G_i - G_j) (G: the cumulative log decay inside the chunk), so that
    no exponent is ever positive. Between chunks the state is carried by a loop over chunks (T / chunk
    iterations, two tensor ops each); everything else is batched over all chunks at once.

    seg ([T] int, optional, with B == 1): document index of each token. Tokens only see earlier tokens of
    their own document, and the state is reset where a document starts (varlen training, h0 is None).
    Returns (o [B, H, T, V], final state [B, H, K, V]).
    """
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = min(chunk, max(T, 1))
    pad = (-T) % C
    if pad:
        # Trailing zeros: g = 0 (no decay) and k = 0 (nothing added) leave the state as it was.
        q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
        if seg is not None:
            seg = F.pad(seg, (0, pad), value=int(seg[-1]))
    N = (T + pad) // C
    q, k, g = (x.reshape(B, H, N, C, K) for x in (q, k, g))
    v = v.reshape(B, H, N, C, V)
    G = g.cumsum(-2)  # inclusive: G_i = g_0 + ... + g_i inside the chunk
    G_end = G[..., -1:, :]  # [B, H, N, 1, K]

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if seg is not None:
        s = seg.reshape(N, C)
        same = s[:, :, None] == s[:, None, :]  # [N, C, C]
        intra_mask = (causal & same)[None, None, :, :, :, None]
        before = torch.cat([s.new_full((1,), -1), s[:-1, -1]])  # document of the token before each chunk
        carry_in = (s == before[:, None]).to(q.dtype)  # token continues the document the state belongs to
        last = s[:, -1:]
        in_last = (s == last).to(q.dtype)  # token belongs to the document that ends the chunk
        carry_state = carry_in[:, -1]  # [N]: the whole chunk continues the incoming document
    else:
        intra_mask = causal[:, :, None]

    # Intra-chunk: A_ij = scale * sum_k q_ik k_jk exp(G_ik - G_jk) for j <= i.
    D = (G.unsqueeze(-2) - G.unsqueeze(-3)).masked_fill(~intra_mask, float("-inf"))  # [B, H, N, C, C, K]
    A = (q.unsqueeze(-2) * k.unsqueeze(-3) * D.exp()).sum(-1) * scale
    o = A @ v

    # Chunk states: S_n = exp(G_end) * S_{n-1} + sum_j (k_j exp(G_end - G_j))^T v_j.
    k_end = k * (G_end - G).exp()
    if seg is not None:
        k_end = k_end * in_last[None, None, :, :, None]
    U = k_end.transpose(-1, -2) @ v  # [B, H, N, K, V]
    decay = G_end.squeeze(-2).exp()  # [B, H, N, K]
    if seg is not None:
        decay = decay * carry_state[None, None, :, None]
    S = h0 if h0 is not None else q.new_zeros(B, H, K, V)
    entering = []
    for n in range(N):
        entering.append(S)
        S = decay[:, :, n, :, None] * S + U[:, :, n]
    if N > 1 or h0 is not None:
        q_in = q * G.exp() * scale
        if seg is not None:
            q_in = q_in * carry_in[None, None, :, :, None]
        o = o + q_in @ torch.stack(entering, dim=2)
    return o.reshape(B, H, N * C, V)[:, :, :T], S


def _doc_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths, output_size=total)


def gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, state_v_first=False,
        cu_seqlens=None, chunk: int = CHUNK):
    """FLA's chunk_gla semantics: q, k, g [B, T, H, K] (g: log decay per key dim), v [B, T, H, V];
    initial_state / final state [N, H, K, V] ([N, H, V, K] with state_v_first); cu_seqlens: packed
    documents with B == 1. Returns (o [B, T, H, V] in v's dtype, final state in float32 or None)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out_dtype = v.dtype
    q, k, v, g = (x.transpose(1, 2).float() for x in (q, k, v, g))  # [B, H, T, *]
    h0 = initial_state
    if h0 is not None:
        h0 = h0.float()
        if state_v_first:
            h0 = h0.transpose(-1, -2)
    if cu_seqlens is None:
        o, ht = _gla_chunked(q, k, v, g, scale, h0, chunk=chunk)
    elif h0 is None and not output_final_state:
        seg = _doc_ids(cu_seqlens, q.shape[2])
        o, ht = _gla_chunked(q, k, v, g, scale, seg=seg, chunk=chunk)
    else:  # per-document states (inference): one document at a time
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            o_i, s_i = _gla_chunked(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], g[:, :, a:b], scale,
                                    None if h0 is None else h0[i:i + 1], chunk=chunk)
            outs.append(o_i)
            states.append(s_i)
        o, ht = torch.cat(outs, dim=2), torch.cat(states, dim=0)
    o = o.transpose(1, 2).to(out_dtype).contiguous()
    if not output_final_state:
        return o, None
    return o, (ht.transpose(-1, -2) if state_v_first else ht).contiguous()


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, state_v_first=False,
              cu_seqlens=None, cu_seqlens_cpu=None):
    """Drop-in for fla.ops.gla.chunk_gla."""
    return gla(q, k, v, g, scale, initial_state, output_final_state, state_v_first, cu_seqlens)


def fused_recurrent_gla(q, k, v, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False,
                        reverse=False, state_v_first=False, cu_seqlens=None, **kwargs):
    """Drop-in for fla.ops.gla.fused_recurrent_gla (the same recurrence; GLA uses it up to 64 tokens)."""
    if gv is not None or reverse or kwargs or gk is None:
        return _ORIGINAL[("fla.layers.gla", "fused_recurrent_gla")](
            q, k, v, gk=gk, gv=gv, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            reverse=reverse, state_v_first=state_v_first, cu_seqlens=cu_seqlens, **kwargs)
    return gla(q, k, v, gk, scale, initial_state, output_final_state, state_v_first, cu_seqlens)


# ---------------------------------------------------------------------------------------------------------
# Norms and SwiGLU
# ---------------------------------------------------------------------------------------------------------

def _add_residual(x, residual, residual_in_fp32):
    """x (+ residual) in float32, and the residual stream FLA hands back with prenorm=True."""
    if residual is not None:
        total = x.float() + residual.float()
        return total, total.to(residual.dtype)
    if residual_in_fp32 and x.dtype != torch.float32:
        total = x.float()
        return total, total
    return x.float(), x


def _rms(x32, weight, bias, eps):
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y


def rms_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    """Drop-in for fla.modules.norm.layernorm.rms_norm: RMSNorm(x + residual); with prenorm also x + residual."""
    total, res_out = _add_residual(x, residual, residual_in_fp32)
    y = _rms(total, weight, bias, eps).to(x.dtype)
    return (y, res_out) if prenorm else y


def rms_norm_gated(x, g, weight, bias, activation="swish", residual=None, prenorm=False, residual_in_fp32=False,
                   eps=1e-6):
    """Drop-in for fla.modules.norm.fused_norm_gate.rms_norm_gated: RMSNorm(x) * swish(g) (or * sigmoid(g))."""
    total, res_out = _add_residual(x, residual, residual_in_fp32)
    y = _rms(total, weight, bias, eps)
    g32 = g.float()
    if activation in ("swish", "silu"):
        y = y * F.silu(g32)
    elif activation == "sigmoid":
        y = y * torch.sigmoid(g32)
    else:
        raise ValueError(f"Unsupported activation: {activation}")
    y = y.to(x.dtype)
    return (y, res_out) if prenorm else y


def swiglu(x, y):
    """Drop-in for fla.modules.activations.swiglu: silu(x) * y."""
    return (F.silu(x.float()) * y.float()).to(x.dtype)


def swiglu_linear(x, y, weight, bias):
    """Drop-in for fla.modules.activations.swiglu_linear: linear(silu(x) * y, weight, bias)."""
    return F.linear(swiglu(x, y), weight, bias)


# ---------------------------------------------------------------------------------------------------------
# Installing
# ---------------------------------------------------------------------------------------------------------

# (module, name looked up at call time) -> replacement
PATCHES = {
    ("fla.layers.gla", "chunk_gla"): chunk_gla,
    ("fla.layers.gla", "fused_recurrent_gla"): fused_recurrent_gla,
    ("fla.modules.norm.layernorm", "rms_norm"): rms_norm,
    ("fla.modules.norm.fused_norm_gate", "rms_norm_gated"): rms_norm_gated,
    ("fla.modules.mlp", "swiglu"): swiglu,
    ("fla.modules.mlp", "swiglu_linear"): swiglu_linear,
}
_ORIGINAL: dict = {}


def _originals() -> dict:
    """FLA's functions behind the patched names (read once, before any patching)."""
    if not _ORIGINAL:
        for module, name in PATCHES:
            _ORIGINAL[(module, name)] = getattr(importlib.import_module(module), name)
    return _ORIGINAL


def original(module: str, name: str):
    """FLA's own function for a patched name (e.g. to compare against it while the patch is installed)."""
    return _originals()[(module, name)]


def install() -> None:
    """Point FLA's GLA modules at the PyTorch versions. Idempotent; affects the whole process."""
    _originals()
    for (module, name), fn in PATCHES.items():
        setattr(importlib.import_module(module), name, fn)


def uninstall() -> None:
    """Put FLA's functions back (the Triton kernels: under the interpreter on a CPU)."""
    for (module, name), fn in _originals().items():
        setattr(importlib.import_module(module), name, fn)


def installed() -> bool:
    return bool(_ORIGINAL) and all(getattr(importlib.import_module(m), n) is fn for (m, n), fn in PATCHES.items())


def unsupported_reason(config) -> str | None:
    """None if every Triton op this model's training step uses has a PyTorch version here, else what is not."""
    model_type = getattr(config, "model_type", None)
    if model_type != "gla":
        return f"model_type {model_type!r} (only 'gla' is covered)"
    checks = [
        (getattr(config, "attn", None) is not None, "hybrid softmax-attention layers (attn)"),
        (getattr(config, "use_short_conv", False), "use_short_conv"),
        (getattr(config, "feature_map", None) is not None, "feature_map"),
        (getattr(config, "attnres_block_size", None) is not None, "attnres_block_size"),
        (getattr(config, "attn_mode", "chunk") not in ("chunk", "fused_recurrent"), "attn_mode"),
        (getattr(config, "hidden_act", "swish") != "swish", "hidden_act other than swish"),
        (not getattr(config, "fuse_norm", True) and getattr(config, "use_output_gate", True),
         "fuse_norm = false (the output gate is then FLA's Triton swish)"),
        (getattr(config, "fuse_linear_cross_entropy", False), "fuse_linear_cross_entropy"),
        (getattr(config, "fuse_cross_entropy", False), "fuse_cross_entropy"),
        (getattr(config, "use_l2warp", False), "use_l2warp"),
    ]
    for bad, what in checks:
        if bad:
            return f"GLA with {what}"
    return None


def select(config, choice: str) -> str:
    """The trainer's switch on a CPU (model.cpu_kernels): install the PyTorch ops or keep the interpreter.
    Returns the path taken ("torch" or "triton") and logs it in one line."""
    if choice == "triton":
        uninstall()
        log.info("CPU kernels: triton (FLA's Triton kernels under the Triton interpreter; model.cpu_kernels=triton)")
        return "triton"
    if choice != "torch":
        raise ValueError(f"model.cpu_kernels = {choice!r} must be 'torch' or 'triton'")
    reason = unsupported_reason(config)
    if reason is not None:
        uninstall()
        log.info("CPU kernels: triton (FLA's Triton kernels under the Triton interpreter): model.cpu_kernels=torch "
                 "does not cover %s, so the model falls back to the interpreter", reason)
        return "triton"
    install()
    log.info("CPU kernels: torch (pure-PyTorch GLA, RMSNorm, gated norm and SwiGLU from models/cpu_torch.py; "
             "model.cpu_kernels=triton runs FLA's Triton kernels under the interpreter)")
    return "torch"
