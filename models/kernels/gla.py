"""GLA's chunked attention on FLA's Triton kernels, without two passes over memory that FLA's wrapper adds (issue 10).

`fla.ops.gla.chunk_gla` (FLA 0.6.0) runs the chunk algorithm as a sequence of Triton kernels. Two of the tensors it
allocates around them cost a full pass over memory each, per layer, per step:

  * The forward's output is `torch.zeros_like(v)` (a comment there: vLLM relies on zero padding), although the output
    kernel writes every element of it. A fill kernel per layer: 0.50 ms a step for GLA 340M at 16 x 2048 tokens on
    an H200 (bench/gpu_profile.py trace, 2026-12-06).
  * The backward's last kernel (`chunk_gla_bwd_kernel_inter`) writes dq, dk and dg into fp32 buffers, which are then
    cast to the inputs' dtype: `dq.to(q)`, `dk.to(k)` in FLA's backward and, for dg (fp32 whereas a bf16 gate came
    in), autograd's own cast. Three fp32 -> bf16 copy kernels per layer: 1.76 ms a step in that trace. The kernel
    computes all three from fp32 registers and rounds them at the store (`.to(p.dtype.element_ty)`), so giving it
    buffers of the inputs' dtype rounds those fp32 values once, as the casts did. Measured on an H100 at GLA 340M's
    shapes (bench/gla_check.py, 2026-12-06): o, dq, dk and dv are FLA's bits; dg differs from FLA's in a few elements
    by one bf16 ulp (max |diff| 0.00195): the kernel compiled for a bf16 store of dg computes some of its fp32 values
    with another rounding (FLA's own two runs were bitwise equal).

A third pass is FLA's by design: its backward computes the recurrent states h and the gate's chunk-local cumsum
again, which the forward had computed (`chunk_fwd_h`, one read of k, v and the gate and one write of h per layer,
and a cumsum kernel). `SAVED_STATES` chooses what the forward keeps for the backward instead:

  * "fp32": the forward computes h in fp32 (as FLA's backward does) and keeps it with the gate's cumsum. The output
    kernel casts h to the inputs' dtype before its dot, as it does FLA's bf16 h, and the backward reads the same fp32
    h FLA's recomputation writes. Memory: B * T / 64 * H * K * V * 4 bytes per layer (268 MB for GLA 340M's layer
    at 16 x 2048 tokens).
  * "bf16": the states in the inputs' dtype, forward and backward: the forward's own h (what FLA's forward writes
    and its output kernel reads) is kept, and the backward's state gradients dh are written in that dtype too. Every
    product that reads h or dh (dq's, dk's, dv's) casts them to the inputs' dtype before its dot, in FLA's kernels,
    so those come out as FLA's; only the gate gradient's inter-chunk term, sum(h * dh) in fp32, reads rounded values.
    Per layer this moves ~0.8 GB less than "fp32" at 16 x 2048 tokens (h and dh written and read at half the size)
    and keeps half its memory.
  * "none": FLA's way, recompute both in the backward.

With bf16 states FLA's last backward kernel (`chunk_gla_bwd_kernel_inter`) would compute that sum(h * dh) in bf16:
a product of two bf16 tensors is bf16 in Triton, and `tl.sum` keeps its input's dtype (triton 3.6-3.9), so every
partial sum of the reduction would be rounded to bf16. Where the states are not fp32, `_gla_bwd_inter_kernel` (ours)
runs in its place: the same sums, with h and dh taken to fp32 before their product and its reduction, so the states'
one rounding is all the precision bf16 states cost (tests/test_gla_kernel.py measures that cost against GLA's
recurrence in float64: o and every gradient within 2^-9 of their largest value).

`chunk_gla(..., grads_into=...)` hands the backward's dq, dk and dv to places its caller chooses: column blocks of
one wider gradient (models/fused.py's `projections="slab"`, where the five projections' gradients are one [tokens,
3088] tensor so their backward is one GEMM each for dx and dW). `_gla_bwd_inter_kernel` writes dq and dk there with
a row stride; `_gla_bwd_dv_kernel` (ours: FLA's dv products, fp32 for the intra-chunk one as FLA's; `DV`) writes dv
there, where FLA's chunk_gla_bwd_dv would be copied there instead.

Everything else is FLA's, called as FLA's own `chunk_gla_fwd` / `chunk_gla_bwd` call it: the gate's chunk-local
cumsum, `chunk_fwd_h`, `chunk_gla_fwd_intra_gk`, `chunk_bwd_dh`, `chunk_gla_bwd_dv`, `chunk_gla_bwd_dA`,
`chunk_gla_bwd_dqk_intra`, and the two kernels launched here (`chunk_gla_fwd_kernel_o`, `chunk_gla_bwd_kernel_inter`)
with the arguments FLA's launchers give them. Covered: training calls without an initial or final state (what the
fused GLA blocks need), equal-length batches or `cu_seqlens`. `chunk_gla` falls back to FLA's function for anything
else, and for CPU tensors unless the Triton interpreter is on (tests/test_gla_kernel.py runs both under it).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from models import kernels

SAVED_STATES = "bf16"
STATE_CHOICES = ("fp32", "bf16", "none")
# the backward's intra-chunk dq, dk: "fla" (FLA's chunk_gla_bwd_dqk_intra) or "ours" (models/kernels/gla_intra.py,
# the diagonal blocks as products)
INTRA = "ours"
INTRA_CHOICES = ("fla", "ours")
# the forward's intra-chunk attention matrix A: "fla" (FLA's chunk_gla_fwd_intra_gk) or "ours"
# (models/kernels/gla_fwd_intra.py, one kernel, the diagonal blocks as products; +1.0-1.3% of the step on an H100,
# the size of the noise, and the loss curves were run without it, so not the default: BENCHMARKS.md)
FWD_INTRA = "fla"
# the backward's last kernel (dq, dk, dg from the states): "fla" (chunk_gla_bwd_kernel_inter), "ours"
# (`_gla_bwd_inter_kernel`), or None: FLA's for fp32 states, ours for any other (module doc)
INTER = None
INTER_CHOICES = ("fla", "ours")
# the backward's dv: "fla" (chunk_gla_bwd_dv, then copied where grads_into puts it), "ours" (`_gla_bwd_dv_kernel`,
# the same products, written with any row stride: straight into a column block of a wider gradient), or None: ours
# where grads_into gives dv a place, FLA's otherwise (measured on an H100, BENCHMARKS.md: the slab path 1.018x ->
# 1.025x)
DV = None
DV_CHOICES = ("fla", "ours")
# our dv kernel's intra-chunk product A^T do (A fp32): "ieee" (fp32 FMAs, FLA's choice: it forbids tf32 there),
# "tf32x3" (three tensor-core products that recover fp32's mantissa; not yet timed) or "tf32"
DV_DOT = "ieee"
DV_DOTS = ("ieee", "tf32x3", "tf32")


def _fla():
    from fla.ops.gla import chunk as fla_chunk  # looked up per call: models/cpu_torch.py may patch FLA on a CPU
    return fla_chunk


def _chunk_size(T: int) -> int:
    return min(64, max(16, triton.next_power_of_2(T)))  # as FLA's ChunkGLAFunction


def _forward_o(q, v, g_cumsum, A, h, scale, cu_seqlens, chunk_size, chunk_indices):
    """FLA's chunk_gla_fwd_o_gk with an uninitialised output (the kernel writes every element; see the module doc)."""
    fla_chunk = _fla()
    B, T, H, K, HV, V = *q.shape, v.shape[2], v.shape[-1]
    NT = triton.cdiv(T, chunk_size) if cu_seqlens is None else len(chunk_indices)
    o = torch.empty_like(v)

    def grid(meta):
        return (triton.cdiv(V, meta['BV']) * NT, B * HV)
    fla_chunk.chunk_gla_fwd_kernel_o[grid](
        q=q, v=v, g=g_cumsum, h=h, o=o, A=A, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, scale=scale,
        T=T, H=H, HV=HV, K=K, V=V, BT=chunk_size, STATE_V_FIRST=True, USE_GRAPH=False)
    return o


def _backward_dqkg(q, k, v, h, g_cumsum, do, dh, dq, dk, scale, cu_seqlens, chunk_size, chunk_indices, dg_dtype,
                   inter: str | None = None, dq_out=None, dk_out=None):
    """FLA's chunk_gla_bwd_dqkg writing dq, dk in q's dtype and dg in `dg_dtype` (see the module doc). inter: "fla"
    (FLA's kernel), "ours" (`_gla_bwd_inter_kernel`); None: INTER, or where that is None FLA's for fp32 states and ours
    for any other. dq_out, dk_out: where dq and dk go ([B, T, H, K] of q's dtype; rows may be strided, as column
    blocks of a wider gradient are; our kernel writes them there, FLA's into a contiguous buffer then copied); None:
    new tensors."""
    fla_chunk = _fla()
    B, T, H, K, V = *k.shape, v.shape[-1]
    NT = triton.cdiv(T, chunk_size) if cu_seqlens is None else len(chunk_indices)
    inter = INTER if inter is None else inter
    if inter is None:
        inter = "fla" if h.dtype == torch.float and dh.dtype == torch.float else "ours"
    if inter not in INTER_CHOICES:
        raise ValueError(f"chunk_gla: inter={inter!r}: use one of {INTER_CHOICES} (or None)")
    dq2 = _row_strided(dq_out, q) if inter == "ours" else None
    dk2 = _row_strided(dk_out, k) if inter == "ours" else None
    dq2 = torch.empty_like(q) if dq2 is None else dq2
    dk2 = torch.empty_like(k) if dk2 is None else dk2
    dg = torch.empty(g_cumsum.shape, dtype=dg_dtype, device=g_cumsum.device)

    def grid(meta):
        return (triton.cdiv(K, meta['BK']) * NT, B * H)
    if inter == "fla":
        fla_chunk.chunk_gla_bwd_kernel_inter[grid](
            q=q, k=k, v=v, g=g_cumsum, h=h, do=do, dh=dh, dq=dq, dk=dk, dq2=dq2, dk2=dk2, dg=dg,
            cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, scale=scale, T=T, H=H, K=K, V=V, BT=chunk_size,
            STATE_V_FIRST=True)
    else:  # low-precision states: sum(h * dh) in fp32 (module doc)
        _gla_bwd_inter_kernel[grid](q, k, v, g_cumsum, h, do, dh, dq, dk, dq2, dk2, dg, cu_seqlens, chunk_indices,
                                    scale, T, dq2.stride(1), dk2.stride(1), H=H, K=K, V=V, BT=chunk_size,
                                    IS_VARLEN=cu_seqlens is not None)
    return _into(dq_out, dq2), _into(dk_out, dk2), dg


def _row_strided(out, like):
    """`out` where a kernel that indexes [B, T, H, K] as (bos + t) * row_stride + h * K + c can write it: like's shape,
    dtype and device, each row's H * K elements packed, and B's stride T rows. Else None."""
    if out is None or out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        return None
    B, T, H, K = like.shape
    st = out.stride()
    if st[3] != 1 or st[2] != K or st[1] < H * K or (B > 1 and st[0] != T * st[1]):
        return None
    return out


def _into(out, t):
    """t copied into `out` where one is given and t is not already it (the copy a kernel that cannot write there
    costs), else t."""
    if out is None or out is t:
        return t
    out.copy_(t)
    return out


@triton.jit
def _tile_of(n_blocks, H: tl.constexpr, cu_seqlens, chunk_indices, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """This program's tile of a (n_blocks * chunks, B * H) grid -> (its column block, head, the chunk's index in its
    sequence, the sequence's first row, its length, the chunk's index among all chunks: where its state lies). With
    cu_seqlens the chunks count over all sequences (FLA's chunk_indices pairs: sequence, chunk in it)."""
    pid = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_blk, i_t, i_b, i_h = pid % n_blocks, pid // n_blocks, i_bh // H, i_bh % H
    if IS_VARLEN:
        i_state = i_t.to(tl.int64)
        seq = tl.load(chunk_indices + i_t * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + seq).to(tl.int64)
        T = (tl.load(cu_seqlens + seq + 1).to(tl.int64) - bos).to(tl.int32)
    else:
        bos = i_b * T
        i_state = (i_b * tl.cdiv(T, BT) + i_t).to(tl.int64)
    return i_blk, i_h, i_t, bos, T, i_state


def _prune_inter(configs, nargs, **kwargs):
    """A tile as large as its dimension only where it is the smallest one on offer (a pipelined block load would
    prefetch past the tensor), and no BK 32 with 4 warps: the combination FLA leaves out on Hopper with triton 3.6-3.8
    (a ptxas WGMMA miscompile, triton-lang/triton#11366)."""
    args = {**(nargs or {}), **kwargs}
    K, V = args["K"], args["V"]
    min_bk = min(c.kwargs["BK"] for c in configs)
    min_bv = min(c.kwargs["BV"] for c in configs)
    kept = [c for c in configs if (c.kwargs["BK"] < K or c.kwargs["BK"] == min_bk)
            and (c.kwargs["BV"] < V or c.kwargs["BV"] == min_bv)
            and not (c.kwargs["BK"] == 32 and c.num_warps == 4)]
    return kept or configs[:1]


@triton.autotune(
    configs=[triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=s)
             for bk in (32, 64) for bv in (64, 128) for w in (2, 4, 8) for s in (2, 3)],
    key=["BT", "K", "V"],
    prune_configs_by={"early_config_prune": _prune_inter},
)
@triton.jit(do_not_specialize=["T"])  # the row strides specialized: 16-aligned rows store in vectors
def _gla_bwd_inter_kernel(q, k, v, g, h, do, dh, dq_intra, dk_intra, dq, dk, dg, cu_seqlens, chunk_indices, scale, T,
                          sdq, sdk, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    """One chunk of rows x BK channels of one (sequence, head): the inter-chunk parts of dq and dk from the chunk's
    state h and state gradient dh ([V, K], V-first), added to the intra-chunk parts, and dg, the reverse cumsum over
    the chunk of q * dq - k * dk plus the gate's share of the state's decay. h and dh go to fp32 for their
    elementwise product and its sum; the two products with do and v take them in the inputs' dtype, as FLA's.
    dq and dk are written with row strides sdq and sdk (H * K where contiguous; wider where they are column blocks
    of one gradient, models/fused.py's GradSlab)."""
    i_k, i_h, i_t, bos, T, i_state = _tile_of(tl.cdiv(K, BK), H, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    rows = i_t * BT + tl.arange(0, BT)
    cols = i_k * BK + tl.arange(0, BK)
    row_ok = rows < T
    col_ok = cols < K
    tile_ok = row_ok[:, None] & col_ok[None, :]
    # [BT, BK] offsets into the [.., T, H, K] tensors of this sequence and head
    tk = (bos + rows[:, None]) * (H * K) + i_h * K + cols[None, :]
    state = (i_state * H + i_h) * (K * V)
    last = tl.minimum(T, i_t * BT + BT) - 1
    b_g = tl.load(g + tk, mask=tile_ok, other=0.0).to(tl.float32)
    b_glast = tl.load(g + (bos + last) * (H * K) + i_h * K + cols, mask=col_ok, other=0.0).to(tl.float32)

    acc_dq = tl.zeros([BT, BK], dtype=tl.float32)
    acc_dk = tl.zeros([BT, BK], dtype=tl.float32)
    acc_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        vcols = i_v * BV + tl.arange(0, BV)
        vcol_ok = vcols < V
        tv = (bos + rows[:, None]) * (H * V) + i_h * V + vcols[None, :]
        tv_ok = row_ok[:, None] & vcol_ok[None, :]
        vk = state + vcols[:, None] * K + cols[None, :]  # [BV, BK] of the V-first state
        vk_ok = vcol_ok[:, None] & col_ok[None, :]
        b_do = tl.load(do + tv, mask=tv_ok, other=0.0)
        b_v = tl.load(v + tv, mask=tv_ok, other=0.0)
        b_h = tl.load(h + vk, mask=vk_ok, other=0.0)
        b_dh = tl.load(dh + vk, mask=vk_ok, other=0.0)
        acc_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=0)
        acc_dq = tl.dot(b_do, b_h.to(b_do.dtype), acc_dq)
        acc_dk = tl.dot(b_v, b_dh.to(b_v.dtype), acc_dk)

    b_q = tl.load(q + tk, mask=tile_ok, other=0.0).to(tl.float32)
    b_k = tl.load(k + tk, mask=tile_ok, other=0.0).to(tl.float32)
    b_dq = acc_dq * scale
    b_dq = b_dq * tl.exp2(b_g)
    b_dk = acc_dk * tl.exp2(b_glast[None, :] - b_g)
    decay = acc_hdh * tl.exp2(b_glast) + tl.sum(b_dk * b_k, axis=0)
    b_dq += tl.load(dq_intra + tk, mask=tile_ok, other=0.0)
    b_dk += tl.load(dk_intra + tk, mask=tile_ok, other=0.0)
    b_dg = b_q * b_dq - b_k * b_dk
    # the reverse cumsum over the chunk's rows: sum over s >= t = total - (inclusive cumsum at t) + value at t
    b_dg = b_dg - tl.cumsum(b_dg, axis=0) + tl.sum(b_dg, axis=0)[None, :] + decay[None, :]
    out = i_h * K + cols[None, :]
    tl.store(dq + (bos + rows[:, None]) * sdq + out, b_dq.to(dq.dtype.element_ty), mask=tile_ok)
    tl.store(dk + (bos + rows[:, None]) * sdk + out, b_dk.to(dk.dtype.element_ty), mask=tile_ok)
    tl.store(dg + tk, b_dg.to(dg.dtype.element_ty), mask=tile_ok)


@triton.autotune(
    configs=[triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=s)
             for bk in (32, 64) for bv in (64, 128) for w in (2, 4, 8) for s in (2, 3)],
    key=["BT", "K", "V"],
    prune_configs_by={"early_config_prune": _prune_inter},
)
@triton.jit(do_not_specialize=["T"])  # the row stride specialized (as sdq above)
def _gla_bwd_dv_kernel(k, g, A, do, dh, dv, cu_seqlens, chunk_indices, T, sdv, H: tl.constexpr, K: tl.constexpr,
                       V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
                       DOT: tl.constexpr):
    """One chunk of rows x BV value channels of one (sequence, head): dv = A^T do within the chunk (A [.., T, H, BT]
    fp32, row t of the chunk holding A[t, s] for s <= t; an fp32 product as FLA's chunk_gla_bwd_kernel_dv, or DOT's
    tensor-core forms) plus the inter-chunk part (k decayed to the chunk's end) dh^T from the V-first state gradient
    dh [V, K], written with row stride sdv (H * V where contiguous)."""
    i_v, i_h, i_t, bos, T, i_state = _tile_of(tl.cdiv(V, BV), H, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    rows = i_t * BT + tl.arange(0, BT)
    row_ok = rows < T
    vcols = i_v * BV + tl.arange(0, BV)
    vcol_ok = vcols < V
    tv_ok = row_ok[:, None] & vcol_ok[None, :]
    # A transposed: [s, t] = A[t, s], kept where s <= t
    s_idx = tl.arange(0, BT)
    b_at = tl.load(A + (bos + rows[None, :]) * (H * BT) + i_h * BT + s_idx[:, None], mask=row_ok[None, :], other=0.0)
    b_at = tl.where(s_idx[:, None] <= s_idx[None, :], b_at, 0.0)
    b_do = tl.load(do + (bos + rows[:, None]) * (H * V) + i_h * V + vcols[None, :], mask=tv_ok, other=0.0)
    b_dv = tl.dot(b_at, b_do.to(b_at.dtype), input_precision=DOT)
    last = tl.minimum(T, i_t * BT + BT) - 1
    state = (i_state * H + i_h) * (K * V)
    for i_k in range(0, tl.cdiv(K, BK)):
        cols = i_k * BK + tl.arange(0, BK)
        col_ok = cols < K
        tk = (bos + rows[:, None]) * (H * K) + i_h * K + cols[None, :]
        tile_ok = row_ok[:, None] & col_ok[None, :]
        b_k = tl.load(k + tk, mask=tile_ok, other=0.0)
        b_g = tl.load(g + tk, mask=tile_ok, other=0.0).to(tl.float32)
        b_glast = tl.load(g + (bos + last) * (H * K) + i_h * K + cols, mask=col_ok, other=0.0).to(tl.float32)
        b_kd = (b_k * tl.exp2(b_glast[None, :] - b_g)).to(b_k.dtype)
        b_dh = tl.load(dh + state + vcols[None, :] * K + cols[:, None], mask=col_ok[:, None] & vcol_ok[None, :],
                       other=0.0)  # [BK, BV] of the V-first state gradient
        b_dv = tl.dot(b_kd, b_dh.to(b_kd.dtype), b_dv)
    tl.store(dv + (bos + rows[:, None]) * sdv + i_h * V + vcols[None, :], b_dv.to(dv.dtype.element_ty), mask=tv_ok)


def _backward_dv(k, g_cumsum, A, do, dh, cu_seqlens, chunk_size, chunk_indices, dv_out=None, dot=None):
    """dv [B, T, H, V] in do's dtype by `_gla_bwd_dv_kernel`, written into dv_out where one is given (v's shape and
    dtype, each row's H * V elements packed, any row stride), else a new tensor. dot: the intra-chunk product's
    precision, one of DV_DOTS; None: DV_DOT."""
    dot = DV_DOT if dot is None else dot
    if dot not in DV_DOTS:
        raise ValueError(f"chunk_gla: dv dot {dot!r}: use one of {DV_DOTS}")
    B, T, H, K, V = *k.shape, do.shape[-1]
    NT = triton.cdiv(T, chunk_size) if cu_seqlens is None else len(chunk_indices)
    dv = _row_strided(dv_out, do)
    dv = torch.empty_like(do) if dv is None else dv

    def grid(meta):
        return (triton.cdiv(V, meta["BV"]) * NT, B * H)
    _gla_bwd_dv_kernel[grid](k, g_cumsum, A, do, dh, dv, cu_seqlens, chunk_indices, T, dv.stride(1), H=H, K=K, V=V,
                             BT=chunk_size, IS_VARLEN=cu_seqlens is not None, DOT=dot)
    return _into(dv_out, dv)


def _cumsum(g, chunk_size, cu_seqlens):
    from fla.ops.utils.constant import RCP_LN2
    from fla.ops.utils.cumsum import chunk_local_cumsum
    return chunk_local_cumsum(g, chunk_size, scale=RCP_LN2, cu_seqlens=cu_seqlens)


class _ChunkGLAFunction(torch.autograd.Function):
    """o = GLA(q, k, v, g) with the recurrent state stored V-first, no initial or final state."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, cu_seqlens, saved_states, intra, fwd_intra, grads_into):
        from fla.ops.common.chunk_h import chunk_fwd_h
        from fla.ops.utils import prepare_chunk_indices
        fla_chunk = _fla()
        q, k, v, g = (t.contiguous() for t in (q, k, v, g))
        chunk_size = _chunk_size(q.shape[1])
        chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size) if cu_seqlens is not None else None
        g_cumsum = _cumsum(g, chunk_size, cu_seqlens)
        h, _ = chunk_fwd_h(k=k, v=v, g=None, gk=g_cumsum, gv=None, h0=None, output_final_state=False,
                           cu_seqlens=cu_seqlens, chunk_size=chunk_size, states_in_fp32=saved_states == "fp32",
                           state_v_first=True)
        fwd_a = fla_chunk.chunk_gla_fwd_intra_gk
        if fwd_intra == "ours":
            from models.kernels import gla_fwd_intra
            fwd_a = gla_fwd_intra.chunk_gla_fwd_intra_gk
        A = fwd_a(q=q, k=k, g=g_cumsum, scale=scale, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                  chunk_indices=chunk_indices)
        o = _forward_o(q, v, g_cumsum, A, h, scale, cu_seqlens, chunk_size, chunk_indices)
        if saved_states == "none":
            # as FLA: a low-precision gate is kept and its cumsum recomputed in backward, an fp32 one kept summed
            keep_g = g.dtype != torch.float
            ctx.save_for_backward(q, k, v, g if keep_g else g_cumsum, A, chunk_indices, cu_seqlens, None)
        else:  # the backward recomputes nothing (module doc)
            keep_g = False
            ctx.save_for_backward(q, k, v, g_cumsum, A, chunk_indices, cu_seqlens, h)
        ctx.keep_g, ctx.g_dtype, ctx.chunk_size, ctx.scale = keep_g, g.dtype, chunk_size, scale
        ctx.saved_states, ctx.intra, ctx.grads_into = saved_states, intra, grads_into
        return o

    @staticmethod
    def backward(ctx, do):
        from fla.ops.common.chunk_h import chunk_bwd_dh, chunk_fwd_h
        fla_chunk = _fla()
        q, k, v, g_saved, A, chunk_indices, cu_seqlens, h = ctx.saved_tensors
        chunk_size, scale = ctx.chunk_size, ctx.scale
        do = do.contiguous()
        g_cumsum = _cumsum(g_saved, chunk_size, cu_seqlens) if ctx.keep_g else g_saved
        if h is None:
            h, _ = chunk_fwd_h(k=k, v=v, g=None, gk=g_cumsum, gv=None, h0=None, output_final_state=False,
                               cu_seqlens=cu_seqlens, chunk_size=chunk_size, states_in_fp32=True, state_v_first=True)
        dh, _ = chunk_bwd_dh(q=q, k=k, v=v, g=None, gk=g_cumsum, gv=None, do=do, h0=None, dht=None, scale=scale,
                             cu_seqlens=cu_seqlens, chunk_size=chunk_size, states_in_fp32=ctx.saved_states != "bf16",
                             state_v_first=True)
        dq_out, dk_out, dv_out = (f() if f is not None else None for f in (ctx.grads_into or (None,) * 3))
        if DV == "ours" or (DV is None and dv_out is not None):
            dv = _backward_dv(k, g_cumsum, A, do, dh, cu_seqlens, chunk_size, chunk_indices, dv_out)
        else:
            dv = _into(dv_out, fla_chunk.chunk_gla_bwd_dv(
                k=k, g=g_cumsum, A=A, do=do, dh=dh, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                chunk_indices=chunk_indices, state_v_first=True))
        dA = fla_chunk.chunk_gla_bwd_dA(v=v, do=do, scale=scale, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                                        chunk_indices=chunk_indices)
        intra = fla_chunk.chunk_gla_bwd_dqk_intra
        if ctx.intra == "ours":
            from models.kernels import gla_intra
            intra = gla_intra.chunk_gla_bwd_dqk_intra
        dq, dk = intra(q=q, k=k, g=g_cumsum, dA=dA, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                       chunk_indices=chunk_indices)
        dq, dk, dg = _backward_dqkg(q, k, v, h, g_cumsum, do, dh, dq, dk, scale, cu_seqlens, chunk_size,
                                    chunk_indices, ctx.g_dtype, dq_out=dq_out, dk_out=dk_out)
        return dq, dk, dv.to(v.dtype), dg, None, None, None, None, None, None


def covers(q: torch.Tensor) -> bool:
    """Whether `chunk_gla` runs the kernels here for this input (else FLA's chunk_gla)."""
    return kernels.runs_triton(q)


def chunk_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float | None = None,
              cu_seqlens: torch.LongTensor | None = None, saved_states: str | None = None,
              intra: str | None = None, fwd_intra: str | None = None, grads_into=None) -> torch.Tensor:
    """FLA's `chunk_gla(q, k, v, g, scale, state_v_first=True, cu_seqlens=...)[0]`: q, k, g [B, T, H, K], v [B, T, H, V]
    (B = 1 with cu_seqlens), no initial or final state. Returns o [B, T, H, V]. saved_states: what the forward keeps
    for the backward, one of STATE_CHOICES (module doc); None: SAVED_STATES. intra: the backward's intra-chunk dq,
    dk kernel, one of INTRA_CHOICES; None: INTRA. fwd_intra: the forward's intra-chunk A kernel, one of INTRA_CHOICES;
    None: FWD_INTRA. grads_into: None, or three callables (or None each) that the backward calls for where dq, dk
    and dv go: tensors of q's, k's and v's shape and dtype whose rows may be strided (column blocks of one wider
    gradient, models/fused.py's GradSlab); dq and dk are written there by the kernel that computes them, dv copied
    (FLA's kernel writes it), and those tensors are the gradients returned. Ignored where FLA's chunk_gla runs."""
    saved_states = SAVED_STATES if saved_states is None else saved_states
    if saved_states not in STATE_CHOICES:
        raise ValueError(f"chunk_gla: saved_states={saved_states!r}: use one of {STATE_CHOICES}")
    intra = INTRA if intra is None else intra
    if intra not in INTRA_CHOICES:
        raise ValueError(f"chunk_gla: intra={intra!r}: use one of {INTRA_CHOICES}")
    fwd_intra = FWD_INTRA if fwd_intra is None else fwd_intra
    if fwd_intra not in INTRA_CHOICES:
        raise ValueError(f"chunk_gla: fwd_intra={fwd_intra!r}: use one of {INTRA_CHOICES}")
    if q.shape != k.shape or q.shape != g.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"chunk_gla: q, k, g must be [B, T, H, K] and v [B, T, H, V], got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}")
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"chunk_gla: with cu_seqlens the batch dimension must be 1, got {q.shape[0]}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not covers(q):
        from fla.layers import gla as fla_gla  # models/cpu_torch.py's CPU version where it is installed
        return fla_gla.chunk_gla(q=q, k=k, v=v, g=g, scale=scale, state_v_first=True, cu_seqlens=cu_seqlens)[0]
    if q.is_cuda:
        with torch.cuda.device(q.device):  # FLA's input_guard does the same: kernels launch on the inputs' device
            return _ChunkGLAFunction.apply(q, k, v, g, scale, cu_seqlens, saved_states, intra, fwd_intra, grads_into)
    return _ChunkGLAFunction.apply(q, k, v, g, scale, cu_seqlens, saved_states, intra, fwd_intra, grads_into)
