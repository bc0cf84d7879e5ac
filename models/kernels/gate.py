"""GLA's low-rank forget gate after its first projection, as one Triton kernel forward and one backward (issue 10).

GLA computes the log forget gate as gk = logsigmoid(x @ W1^T @ W2^T + b) / n: a rank-R bottleneck (R = 16 in every
GLA config here; W1 [R, D], W2 [K, R], b [K], n = gate_logit_normalizer). The first projection shares its input with
q, k, v and g (models/fused.py). What follows it, a = x @ W1^T -> gk, is a [M, 16] x [16, K] product and two
elementwise passes, yet on the GPU it ran as a cuBLAS GEMM with a bias epilogue, our logsigmoid kernel, and in
backward two GEMMs with K = 16 or M = 32k split-K, their reduction kernels, and a column reduction of a bf16
[M, K] tensor for the bias gradient (PyTorch's `sum(0)` at 0.7 TB/s): ~3.5 ms of a GLA 340M step on an H200 for
~0.1 GFLOP of math (bench/gpu_profile.py trace, 2026-12-06).

Here:
    forward   one kernel: pre = a @ W2^T + b (fp32 accumulation, never rounded), gk = logsigmoid(pre) / n; reads a
              (M x R) and writes gk (M x K). Saved for backward: a, W2, b (not the M x K pre-activation).
    backward  one kernel per block of BM rows: recomputes pre, dpre = dgk * sigmoid(-pre) / n, then
              da = dpre @ W2 (complete per program: it walks all K columns), and the program's partial sums of
              dW2 = dpre^T @ a and db = sum(dpre); a torch sum over the programs' partials (deterministic, no
              atomics) finishes dW2 and db.
dpre is rounded to the inputs' dtype before the two products, as the GEMMs it replaces received it; db sums the fp32
dpre. No autotune: fixed tiles (BM rows x BN gate columns, 8 warps). Runs under the Triton interpreter on CPU (tests);
a CPU tensor without it, or R > 128, takes `low_rank_gate_reference`.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from models import kernels

BM, BN, NUM_WARPS = 128, 64, 8
MAX_RANK = 128
FMA_PRE = False  # the pre-activation by tl.dot (False) or by rank-one fp32 updates (True); see _pre
# the forward's log1p: "exact" (the Goldberg form over tl.log, libdevice's logf) or "approx" (a series for small
# arguments, else the GPU's one-instruction lg2.approx; _log_sigmoid). Compiled for sm_90, "exact" is ~57 SASS
# instructions a value in _gate_fwd_kernel (12 FMAs of logf's polynomial among them), "approx" ~23: the kernel took
# 38-40 us per GLA 340M call for a 33 MB write (~3x its memory bound; BENCHMARKS.md), as an instruction-bound kernel
# would. "approx" is not yet timed on a GPU (bench/gla_check.py --only gate), so not the default.
LOG = "exact"
LOGS = ("exact", "approx")


@triton.jit
def _log2(x, ASM: tl.constexpr):
    """log2(x): the GPU's lg2.approx.f32 (one instruction) where ASM, else tl.log2 (the interpreter cannot run PTX)."""
    if ASM:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    return tl.log2(x)


@triton.jit
def _log_sigmoid(x, APPROX: tl.constexpr = False, ASM: tl.constexpr = False):
    """logsigmoid(x) = min(x, 0) - log1p(t), t = exp(-|x|) in (0, 1].
    APPROX False: log1p with the log of models/kernels/swiglu.py (no library log1p): log(u) * t / (u - 1), u = 1 + t
    rounded, which cancels the rounding of u. tl.log compiles to libdevice's logf, ~40 instructions with a branch.
    APPROX True: the series t - t^2/2 + t^3/3 below 2^-6 (truncation < t^3/4 < 2^-20 relative), log2(1 + t) * ln 2
    above (u's rounding < 2^-24 / t < 2^-18 relative); with ASM the log2 is lg2.approx.f32 (PTX: max error 2^-22.6),
    a few instructions a value in all (see LOG)."""
    t = tl.exp(-tl.abs(x))
    if APPROX:
        series = t * (1.0 - t * (0.5 - t * 0.3333333333333333))
        log1p_t = tl.where(t < 0.015625, series, _log2(1.0 + t, ASM) * 0.6931471805599453)
    else:
        u = 1.0 + t
        u_minus_1 = u - 1.0
        log1p_t = tl.where(u_minus_1 == 0.0, t, tl.log(u) * (t / tl.where(u_minus_1 == 0.0, 1.0, u_minus_1)))
    return tl.minimum(x, 0.0) - log1p_t


@triton.jit
def _dot(x, y, acc, IEEE: tl.constexpr):
    """x @ y (+ acc), accumulated in fp32. IEEE: the operands as fp32, multiplied exactly (not TF32): for fp32 inputs,
    and under the Triton interpreter (whose bf16 tl.dot returned garbage before models/cpu_triton.py patched it;
    bf16 values are exact in fp32, so the upcast computes the product a GPU's bf16 dot does)."""
    if IEEE:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(x, y, acc)


@triton.jit
def _pre(a, W, B, cols, r, N, R, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, FMA: tl.constexpr = False,
         A=None, rows=None, mrow=None, sa=0, BR: tl.constexpr = 16):
    """(pre-activation [BM, BN] in fp32, the W2 tile [BN, BR]) for rows `a` [BM, BR] and gate columns `cols`.
    FMA: the product as R rank-one updates in fp32 (rows' values reloaded one column at a time from A) instead of
    tl.dot, so that the pre-activation is in the plain blocked layout of the elementwise tiles."""
    mc = cols < N
    w = tl.load(W + cols[:, None] * R + r[None, :], mask=mc[:, None] & (r < R)[None, :], other=0.0)
    if FMA:
        pre = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
        for j in tl.static_range(BR):
            if j < R:
                a_j = tl.load(A + rows * sa + j, mask=mrow, other=0.0).to(tl.float32)
                w_j = tl.load(W + cols * R + j, mask=mc, other=0.0).to(tl.float32)
                pre += a_j[:, None] * w_j[None, :]
    else:
        pre = _dot(a, tl.trans(w), None, IEEE)
    if HAS_BIAS:
        pre += tl.load(B + cols, mask=mc, other=0.0).to(tl.float32)[None, :]
    return pre, w


@triton.jit
def _gate_fwd_kernel(A, W, B, Y, M, N, R, sa, scale, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, FMA: tl.constexpr,
                     APPROX_LOG: tl.constexpr = False, ASM: tl.constexpr = False):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    r = tl.arange(0, BR)
    mrow = rows < M
    a = tl.load(A + rows[:, None] * sa + r[None, :], mask=mrow[:, None] & (r < R)[None, :], other=0.0)
    pre, _ = _pre(a, W, B, cols, r, N, R, HAS_BIAS, IEEE, FMA, A, rows, mrow, sa, BR)
    y = _log_sigmoid(pre, APPROX_LOG, ASM) * scale
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mrow[:, None] & (cols < N)[None, :])


@triton.jit
def _gate_bwd_kernel(A, W, B, DY, DA, DWP, DBP, M, N, R, sa, sdy, scale, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, CN: tl.constexpr, DA_PARTIAL: tl.constexpr,
                     FMA: tl.constexpr):
    """Program (i, j): rows i*BM.., gate columns j*CN.. (BN at a time). DWP [programs along M, N, R] and DBP
    [programs along M, N]: partial sums over this program's rows. DA: da of the rows, or with DA_PARTIAL (more than
    one column group) DA is [column groups, M, R] fp32 partial sums over the group's columns."""
    pid = tl.program_id(0)
    group = tl.program_id(1)
    rows = pid.to(tl.int64) * BM + tl.arange(0, BM)
    r = tl.arange(0, BR)
    mrow = rows < M
    mr = r < R
    a = tl.load(A + rows[:, None] * sa + r[None, :], mask=mrow[:, None] & mr[None, :], other=0.0)
    da = tl.zeros([BM, BR], dtype=tl.float32)
    for n0 in range(group * CN, tl.minimum(group * CN + CN, N), BN):
        cols = n0 + tl.arange(0, BN)
        mc = cols < N
        pre, w = _pre(a, W, B, cols, r, N, R, HAS_BIAS, IEEE, FMA, A, rows, mrow, sa, BR)
        dy = tl.load(DY + rows[:, None] * sdy + cols[None, :], mask=mrow[:, None] & mc[None, :], other=0.0)
        t = tl.exp(-tl.abs(pre))
        dpre = dy.to(tl.float32) * (tl.where(pre >= 0, t, 1.0) / (1.0 + t)) * scale  # dy * sigmoid(-pre) / n
        dp = dpre.to(A.dtype.element_ty)
        da = _dot(dp, w, da, IEEE)
        dw = _dot(tl.trans(dp), a, None, IEEE)
        tl.store(DWP + (pid * N + cols[:, None]).to(tl.int64) * R + r[None, :], dw, mask=mc[:, None] & mr[None, :])
        if HAS_BIAS:
            tl.store(DBP + pid.to(tl.int64) * N + cols, tl.sum(dpre, axis=0), mask=mc)
    if DA_PARTIAL:
        tl.store(DA + (group * M + rows[:, None]) * R + r[None, :], da, mask=mrow[:, None] & mr[None, :])
    else:
        tl.store(DA + rows[:, None] * R + r[None, :], da.to(DA.dtype.element_ty), mask=mrow[:, None] & mr[None, :])


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _meta(a2: torch.Tensor, weight: torch.Tensor, config: tuple | None) -> dict:
    """Launch keywords from (rows, gate columns, warps[, fma[, maxnreg]]): maxnreg caps the registers a thread takes
    (0: ptxas's choice; the backward takes 168 at its default launch, so one 8-warp program per SM)."""
    bm, bn, warps, *rest = config or (BM, BN, NUM_WARPS)
    maxnreg = rest[1] if len(rest) > 1 else 0
    return dict(IEEE=a2.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1", BM=bm, BN=bn,
                BR=max(16, triton.next_power_of_2(weight.shape[1])), num_warps=warps,
                FMA=bool(rest[0]) if rest else FMA_PRE, **({"maxnreg": maxnreg} if maxnreg else {}))


def low_rank_gate_forward(a2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float,
                          config: tuple[int, int, int] | None = None, log: str | None = None):
    """gk [M, N] (contiguous, a2's dtype) from a2 [M, R] (row-strided allowed), weight [N, R], bias [N] or None.
    config: (rows, gate columns, warps[, fma]) per program instead of (BM, BN, NUM_WARPS, FMA_PRE)
    (bench/gla_check.py --sweep). log: one of LOGS (None: LOG)."""
    log = LOG if log is None else log
    if log not in LOGS:
        raise ValueError(f"low_rank_gate: log={log!r}: use one of {LOGS}")
    M, R = a2.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=a2.dtype, device=a2.device)
    meta = _meta(a2, weight, config)
    if M:
        grid = (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))
        _gate_fwd_kernel[grid](a2, weight.contiguous(), bias if bias is not None else weight, y, M, N, R,
                               a2.stride(0), scale, HAS_BIAS=bias is not None, APPROX_LOG=log == "approx",
                               ASM=log == "approx" and os.environ.get("TRITON_INTERPRET") != "1", **meta)
    return y


def low_rank_gate_backward(a2, weight, bias, dy2, scale, config: tuple[int, int, int, int] | None = None):
    """(da [M, R], dweight [N, R], dbias [N] or None) for dy2 [M, N] (row-strided allowed). config: (rows, gate
    columns per step, warps, gate columns per program[, fma[, maxnreg]]) instead of (BM, BN, NUM_WARPS, all N,
    FMA_PRE)."""
    M, R = a2.shape
    N = weight.shape[0]
    bm, bn, warps, cn, *fma = config or (BM, BN, NUM_WARPS, 0)
    cn = N if cn <= 0 else cn
    meta = _meta(a2, weight, (bm, bn, warps, *fma))
    programs, groups = triton.cdiv(M, bm), triton.cdiv(N, cn)
    da = torch.empty((groups, M, R) if groups > 1 else (M, R), dtype=torch.float32 if groups > 1 else a2.dtype,
                     device=a2.device)
    dwp = torch.empty((programs, N, R), dtype=torch.float32, device=a2.device)
    dbp = torch.empty((programs, N) if bias is not None else (1,), dtype=torch.float32, device=a2.device)
    if M:
        _gate_bwd_kernel[(programs, groups)](a2, weight.contiguous(), bias if bias is not None else weight, dy2, da, dwp,
                                             dbp, M, N, R, a2.stride(0), dy2.stride(0), scale,
                                             HAS_BIAS=bias is not None, CN=cn, DA_PARTIAL=groups > 1, **meta)
    if groups > 1:
        da = da.sum(0).to(a2.dtype)
    dweight = dwp.sum(0).to(weight.dtype)
    dbias = dbp.sum(0).to(bias.dtype) if bias is not None else None
    return da, dweight, dbias


class _LowRankGateFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, a, weight, bias, normalizer):
        ctx.save_for_backward(a, weight, bias)
        ctx.scale = 1.0 / normalizer
        return low_rank_gate_forward(_rows(a), weight, bias, ctx.scale).view(*a.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        a, weight, bias = ctx.saved_tensors
        da, dweight, dbias = low_rank_gate_backward(_rows(a), weight, bias, _rows(dy), ctx.scale)
        return da.view(a.shape), dweight, dbias, None


def _check(a, weight, bias, normalizer) -> float:
    n = float(normalizer)
    if n == 0 or not math.isfinite(n):
        raise ValueError(f"low_rank_gate: normalizer must be finite and non-zero, got {normalizer!r}")
    if weight.dim() != 2 or a.dim() < 1 or a.shape[-1] != weight.shape[1]:
        raise ValueError(f"low_rank_gate: weight must be [N, {a.shape[-1] if a.dim() else '?'}] for a of shape "
                         f"{tuple(a.shape)}, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"low_rank_gate: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if any(t is not None and (t.dtype != a.dtype or t.device != a.device) for t in (weight, bias)):
        raise ValueError("low_rank_gate: a, weight and bias must share dtype and device")
    return n


def covers(a: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `low_rank_gate` runs the kernels for these operands (else the reference)."""
    return kernels.runs_triton(a) and a.dtype in (torch.bfloat16, torch.float16, torch.float32) and weight.shape[1] <= MAX_RANK


def low_rank_gate(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, normalizer: float) -> torch.Tensor:
    """logsigmoid(a @ weight^T + bias) / normalizer, GLA's gate after its first low-rank projection. a: [..., R];
    weight: [N, R]; bias: [N] or None; all of one dtype. Output [..., N] in that dtype."""
    n = _check(a, weight, bias, normalizer)
    if not covers(a, weight):
        return low_rank_gate_reference(a, weight, bias, n)
    return _LowRankGateFunction.apply(a, weight, bias, n)


def low_rank_gate_reference(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            normalizer: float) -> torch.Tensor:
    """Plain PyTorch with autograd: the product, bias and logsigmoid in fp32, rounded to a's dtype once."""
    n = _check(a, weight, bias, normalizer)
    pre = F.linear(a.float(), weight.float(), bias.float() if bias is not None else None)
    return (F.logsigmoid(pre) / n).to(a.dtype)
