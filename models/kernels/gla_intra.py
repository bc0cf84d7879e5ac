"""GLA's backward intra-chunk dq, dk (FLA's `chunk_gla_bwd_dqk_intra`) with the diagonal blocks as products (issue 10).

What it computes. Per chunk of BT = 64 tokens, with g the chunk-local cumsum of the log2 gate (non-increasing inside a
chunk for GLA) and dA [B, T, H, BT] the gradient of the intra-chunk attention matrix:

    dq_i = sum_{j <= i} dA[i, j] k_j exp2(g_i - g_j)        dk_j = sum_{i >= j} dA[i, j] q_i exp2(g_i - g_j)

(elementwise over the K channels, i, j in the same chunk). FLA 0.6.0 splits a chunk into sub-chunks of BC = 16 rows;
one program per (sub-chunk, K block of BK = 64 channels, chunk, batch x head). The pairs of different sub-chunks are
products already (`tl.dot` on [16, 16] x [16, BK] tiles, the exponent split at a sub-chunk boundary row). The
diagonal 16 x 16 block is a loop over its 16 rows j with `exp2(g - g_j)` on the whole [16, BK] tile: 16 exp2 per
output element for dq and 16 for dk. On an H100/H200 at GLA 340M's shapes (B 16, T 2048, H 4, K 128) that kernel
took ~0.53 ms a call, about 5x its memory traffic.

Measured on an H100 (`_gpu_check`, 2026-12-06, B 16, T 2048, H 4, K 128, median of 20): FLA's kernel 0.563 ms, this
one 0.315 ms (1.79x) at CONFIG; its dq, dk within 2.0e-7 and 2.7e-7 of the largest of FLA's, the same error against
float64 (6.9e-4 and 8.3e-4 of the largest, the inputs' bf16 rounding); with extreme gates 87.5% of the programs
took the fast path, no non-finite value where FLA's is finite.

The factorisation. For a per-channel reference value r of the sub-chunk,

    exp2(g_i - g_j) = exp2(g_i - r) * exp2(r - g_j)

so the diagonal block becomes dq = e+ * (tril(dA) @ (k * e-)) and dk = e- * (tril(dA)^T @ (q * e+)) with
e+ = exp2(g - r), e- = exp2(r - g): 2 exp2 per element shared by dq and dk instead of 32, and two [16, 16] x [16, BK]
products (`tl.dot`, precision a launch option: "ieee" fp32 by default, "tf32x3" or "tf32" for a GPU sweep). The
off-diagonal sums are products as in FLA's kernel (the exponent split at the sub-chunk's first row for dq, its last
row for dk); their final factors exp2(g - g_first) and exp2(g_last - g) are taken as
e+ * exp2(r - g_first) and e- * exp2(g_last - r) (a per-channel exp2 instead of one per element). In all: about 5
exp2 per output element of dq and dk together, against about 36 in FLA's kernel.

r is the middle of the sub-chunk's range per channel, r = (max g + min g) / 2 over its valid rows, so that
|g - r| <= R / 2 with R = max - min (and <= R whatever the rounding of r: r lies in [min, max]).

The safety bound. The factors grow as 2^(R/2) where exp2(g_i - g_j) <= 1, so a program takes the fast path only if

  * R <= RANGE_BOUND = 32 (log2 units) for every channel of its tile: e+ and e- stay in [2^-32, 2^32] even in the
    worst case |g - r| <= R, and
  * the sums of |q|, |k| and |tril(dA)| over its tiles are <= MAG_BOUND = 2^24 (the products with dA and k or q,
    at most 2^24 * 2^24 * 2^32 * 2^32 = 2^112, cannot overflow fp32's 2^128), and the sum of |g| is <= 1e30
    (a sum, not a max, so that a NaN or an inf in any input is caught: it sends the program to FLA's loop, which
    keeps NaN where FLA has it and nowhere else);

otherwise it runs FLA's elementwise loop for both dq and dk (a scalar `if` per program). The bound 32 is set by
precision rather than overflow: the rounding of g - r costs up to ulp(R / 2) / 2 in each exponent, which is no longer
negligible against FLA's error beyond R ~ 40 (numpy fp32 emulation of one diagonal block, 16 x 256, max error over
the block's largest value: FLA 4e-8 to 1.4e-7 for R from 0.1 to 85; this factorisation at most 1.7e-7 up to R 21,
3.5e-7 at R 42, 7.5e-7 at R 84, the larger ones where the sub-chunk starts near g = 0). GLA's gate (logsigmoid / 16,
in log2 units about |x| / 11 a step for a very negative pre-activation x) gives R above 32 only where x averages
below about -24 over a sub-chunk's 15 steps.

Measured under the Triton interpreter (tests/test_gla_intra_kernel.py, fp32 inputs): FLA's kernel's values within
3.5e-7 of the largest (equal lengths, cu_seqlens, T < 64, partial K blocks, chunk 32); error against a float64
reference 0.8 to 2.2 fp32 ulps of the largest value where FLA's is 0.9 to 1.9 (at most 1.9x FLA's); extreme gates
(per-step decays of -90 log2 next to decays of exactly 0, g = 0, a NaN in k, |k| = 1e9) with both paths, NaN
exactly where FLA's has it and no inf; FLA's loop alone gives FLA's bits. `_gpu_check()` times it against FLA's
kernel on a GPU, checks values and extreme gates there, and sweeps the launch options (`LaunchConfig`).

Extra over FLA's: a varlen `chunk_indices` row with a negative sequence id (FLA's static, padded indices) returns
at once, and `record_path` (tests, `_gpu_check`) reports which path each program took.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from fla.ops.utils.op import exp2  # FLA's own exp2 (FLA_USE_FAST_OPS applies alike)

from models import kernels

RANGE_BOUND = 32.0  # max g - min g over a sub-chunk's rows (log2 units) for the fast path; see the module doc
MAG_BOUND = 2.0 ** 24  # sum of |q|, |k|, |tril(dA)| over a program's tiles for the fast path
CHUNK_SIZES = (16, 32, 64)
PRECISIONS = ("ieee", "tf32x3", "tf32")


@dataclass(frozen=True)
class LaunchConfig:
    """Launch options of the intra-chunk kernels (this one and gla_fwd_intra's). BK: channels per program, or per step
    of a program's loop (capped at K rounded up to a power of two, at least 16). diag_precision: the diagonal block's
    tl.dot. offdiag_precision: the tl.dot of the blocks off the diagonal; None: tl.dot's default ("tf32" on NVIDIA
    unless TRITON_F32_DEFAULT says otherwise), as FLA's kernels."""
    BK: int = 64
    num_warps: int = 2
    num_stages: int = 2
    diag_precision: str = "ieee"
    offdiag_precision: str | None = None


# 2 warps, 2 stages: the fastest "ieee" launch of the sweep on an H100 (_gpu_check, 2026-12-06, B 16 T 2048 H 4 K 128:
# 0.315 ms; 4 warps 0.406 ms, 8 warps 0.556 ms; FLA's kernel 0.563 ms). "tf32x3" at 2 warps was 2% faster (0.309 ms)
# and 1.3x further from FLA's values (3.5e-7 against 2.7e-7 of the largest): not taken.
CONFIG = LaunchConfig()


@triton.jit(do_not_specialize=['T'])
def _gla_bwd_intra_kernel(q, k, g, dA, dq, dk, path, cu_seqlens, chunk_indices, T,
                      H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                      NC: tl.constexpr, IS_VARLEN: tl.constexpr, DIAG_PRECISION: tl.constexpr,
                      OFF_PRECISION: tl.constexpr, RANGE_BOUND: tl.constexpr, MAG_BOUND: tl.constexpr,
                      RECORD_PATH: tl.constexpr):
    """One program: the BC rows of sub-chunk `sub` of chunk `chunk`, BK channels, one (sequence, head); FLA's grid
    (channel block and sub-chunk fastest in axis 0, batch x head in axis 1). Rows are local to the sequence; q, k, g,
    dq, dk are [.., T, H, K] and dA [.., T, H, BT] (row m's column c: dA[m, chunk start + c])."""
    pid = tl.program_id(0).to(tl.int64)
    per_chunk = tl.cdiv(K, BK) * NC
    chunk = pid // per_chunk
    kblock = (pid % per_chunk) // NC
    sub = pid % NC
    bh = tl.program_id(1).to(tl.int64)
    head = bh % H
    if IS_VARLEN:
        seq = tl.load(chunk_indices + chunk * 2).to(tl.int32)
        chunk = tl.load(chunk_indices + chunk * 2 + 1).to(tl.int64)
        if seq < 0:  # a padded row of a static chunk_indices
            return
        bos = tl.load(cu_seqlens + seq).to(tl.int64)
        T = tl.load(cu_seqlens + seq + 1).to(tl.int64) - bos
    else:
        bos = (bh // H) * T
    first = chunk * BT + sub * BC  # the sub-chunk's first row
    if first >= T:
        return
    idx = tl.arange(0, BC)
    rows = first + idx
    row_ok = rows < T
    cols = kblock * BK + tl.arange(0, BK)
    col_ok = cols < K
    tile_ok = row_ok[:, None] & col_ok[None, :]
    base = (bos * H + head) * K  # row 0, channel 0 of this sequence and head
    a_base = (bos * H + head) * BT
    tile = base + rows[:, None] * (H * K) + cols[None, :]
    g_rows = tl.load(g + tile, mask=tile_ok, other=0.0)
    q_rows = tl.load(q + tile, mask=tile_ok, other=0.0).to(tl.float32)
    k_rows = tl.load(k + tile, mask=tile_ok, other=0.0).to(tl.float32)
    # the diagonal block of dA: [row i, column j] = dA[first + i, sub * BC + j], kept for j <= i
    dA_diag = tl.load(dA + a_base + rows[:, None] * (H * BT) + sub * BC + idx[None, :], mask=row_ok[:, None],
                      other=0.0).to(tl.float32)
    dA_diag = tl.where(idx[:, None] >= idx[None, :], dA_diag, 0.0)

    # Which path (module doc). Sums, not maxima: a NaN or an inf anywhere makes them fail the test.
    g_max = tl.max(tl.where(row_ok[:, None], g_rows, float('-inf')), axis=0)
    g_min = tl.min(tl.where(row_ok[:, None], g_rows, float('inf')), axis=0)
    fast = ((tl.max(g_max - g_min, axis=0) <= RANGE_BOUND) & (tl.sum(tl.abs(g_rows)) <= 1e30)
            & (tl.sum(tl.abs(q_rows)) <= MAG_BOUND) & (tl.sum(tl.abs(k_rows)) <= MAG_BOUND)
            & (tl.sum(tl.abs(dA_diag)) <= MAG_BOUND))
    if RECORD_PATH:
        tl.store(path + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), fast.to(tl.int32))
    ref = g_max * 0.5 + g_min * 0.5  # per channel
    g_safe = tl.where(row_ok[:, None], g_rows, ref[None, :])  # rows past the end: factors of 1
    up = exp2(g_safe - ref[None, :])  # exp2(g_i - ref); only used on the fast path (may overflow otherwise)
    down = exp2(ref[None, :] - g_safe)  # exp2(ref - g_i)

    # dq, earlier sub-chunks: sum_j dA[i, j] k_j exp2(g_i - g_j), split at the sub-chunk's first row
    g_first = tl.load(g + base + first * (H * K) + cols, mask=col_ok, other=0.0)
    acc = tl.zeros([BC, BK], dtype=tl.float32)
    for other in range(0, sub):
        o_rows = chunk * BT + other * BC + idx
        o_tile = base + o_rows[:, None] * (H * K) + cols[None, :]
        o_ok = (o_rows[:, None] < T) & col_ok[None, :]
        k_o = tl.load(k + o_tile, mask=o_ok, other=0.0)
        g_o = tl.load(g + o_tile, mask=o_ok, other=0.0)
        block = tl.load(dA + a_base + rows[:, None] * (H * BT) + other * BC + idx[None, :],
                        mask=row_ok[:, None], other=0.0)
        acc = tl.dot(block, k_o * exp2(g_first[None, :] - g_o), acc, input_precision=OFF_PRECISION)
    if fast:
        acc = (acc * (up * exp2(ref - g_first)[None, :])
               + up * tl.dot(dA_diag, k_rows * down, input_precision=DIAG_PRECISION))
    else:  # one diagonal column at a time, exp2(g_i - g_j) per element
        if sub > 0:
            acc *= exp2(g_rows - g_first[None, :])
        for j in range(0, tl.minimum(BC, T - first)):
            dA_col = tl.load(dA + a_base + rows * (H * BT) + sub * BC + j, mask=row_ok, other=0.0)
            k_j = tl.load(k + base + (first + j) * (H * K) + cols, mask=col_ok, other=0.0).to(tl.float32)
            g_j = tl.load(g + base + (first + j) * (H * K) + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc += tl.where(idx[:, None] >= j, dA_col[:, None] * k_j[None, :] * exp2(g_rows - g_j[None, :]), 0.)
    tl.store(dq + tile, acc.to(dq.dtype.element_ty), mask=tile_ok)

    tl.debug_barrier()
    # dk, later sub-chunks: sum_m dA[m, i] q_m exp2(g_m - g_i), split at the sub-chunk's last row
    n_sub = tl.minimum(NC, tl.cdiv(T - chunk * BT, BC))  # sub-chunks of this chunk with rows
    last = tl.minimum(first + BC, T) - 1
    g_last = tl.load(g + base + last * (H * K) + cols, mask=col_ok, other=0.0)
    acc = tl.zeros([BC, BK], dtype=tl.float32)
    for other in range(sub + 1, n_sub):
        o_rows = chunk * BT + other * BC + idx
        o_in = o_rows < T
        o_tile = base + o_rows[:, None] * (H * K) + cols[None, :]
        o_ok = o_in[:, None] & col_ok[None, :]
        q_o = tl.load(q + o_tile, mask=o_ok, other=0.0)
        g_o = tl.load(g + o_tile, mask=o_ok, other=0.0)
        # [i, m] = dA[o_rows[m], sub * BC + i]
        block = tl.load(dA + a_base + o_rows[None, :] * (H * BT) + sub * BC + idx[:, None], mask=o_in[None, :],
                        other=0.0)
        acc = tl.dot(block, q_o * tl.where(o_in[:, None], exp2(g_o - g_last[None, :]), 0),
                     acc, input_precision=OFF_PRECISION)
    if fast:
        acc = (acc * (down * exp2(g_last - ref)[None, :])
               + down * tl.dot(tl.trans(dA_diag), q_rows * up, input_precision=DIAG_PRECISION))
    else:  # one diagonal row at a time
        if sub < n_sub - 1:
            acc *= exp2(g_last[None, :] - g_rows)
        for j in range(0, tl.minimum(BC, T - first)):
            dA_row = tl.load(dA + a_base + (first + j) * (H * BT) + sub * BC + idx)
            q_j = tl.load(q + base + (first + j) * (H * K) + cols, mask=col_ok, other=0.0).to(tl.float32)
            g_j = tl.load(g + base + (first + j) * (H * K) + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc += tl.where(idx[:, None] <= j, dA_row[:, None] * q_j[None, :] * exp2(g_j[None, :] - g_rows), 0.)
    tl.store(dk + tile, acc.to(dk.dtype.element_ty), mask=tile_ok)


def _fla_function():
    from fla.ops.gla import chunk as fla_chunk  # looked up per call: models/cpu_torch.py may patch FLA on a CPU
    return fla_chunk.chunk_gla_bwd_dqk_intra


def covers(q: torch.Tensor) -> bool:
    """Whether the kernel here runs for this input (else FLA's function): CUDA, or CPU under the interpreter."""
    return kernels.runs_triton(q)


def check_qkg(name: str, q, k, g, cu_seqlens, chunk_size) -> None:
    """The argument checks the intra-chunk kernels share (this one and gla_fwd_intra's): q, k, g of one [B, T, H, K]
    shape, a supported chunk size, B = 1 and 1-D cu_seqlens where given. Raises ValueError naming `name`."""
    if q.dim() != 4 or k.shape != q.shape or g.shape != q.shape:
        raise ValueError(f"{name}: q, k, g must be [B, T, H, K] of one shape, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, g {tuple(g.shape)}")
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"{name}: chunk_size={chunk_size!r}: use one of {CHUNK_SIZES}")
    if cu_seqlens is not None and (q.shape[0] != 1 or cu_seqlens.dim() != 1):
        raise ValueError(f"{name}: with cu_seqlens the batch dimension must be 1 and cu_seqlens 1-D, got q "
                         f"{tuple(q.shape)}, cu_seqlens {tuple(cu_seqlens.shape)}")


def _check(q, k, g, dA, cu_seqlens, chunk_size) -> None:
    name = "chunk_gla_bwd_dqk_intra"
    check_qkg(name, q, k, g, cu_seqlens, chunk_size)
    if tuple(dA.shape) != (*q.shape[:3], chunk_size):
        raise ValueError(f"{name}: dA must be [B, T, H, chunk_size] = {(*q.shape[:3], chunk_size)}, "
                         f"got {tuple(dA.shape)}")


def _launch(q, k, g, dA, cu_seqlens, chunk_size, chunk_indices, config: LaunchConfig, record_path: bool):
    """(dq, dk, path): path [NK * NC * NT, B * H] int32 with 1 (fast), 0 (the elementwise loop), -1 (no rows), or
    None."""
    from fla.ops.utils import prepare_chunk_indices
    if config.diag_precision not in PRECISIONS or (config.offdiag_precision or "tf32") not in PRECISIONS:
        raise ValueError(f"chunk_gla_bwd_dqk_intra: config {config}: precisions must be one of {PRECISIONS}")
    B, T, H, K = q.shape
    BT = chunk_size
    BC = min(16, BT)
    BK = min(config.BK, max(16, triton.next_power_of_2(K)))
    if chunk_indices is None and cu_seqlens is not None:
        chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size)
    NT = triton.cdiv(T, BT) if cu_seqlens is None else len(chunk_indices)
    NC = triton.cdiv(BT, BC)
    NK = triton.cdiv(K, BK)
    q, k, g, dA = (t.contiguous() for t in (q, k, g, dA))
    dq = torch.empty_like(q, dtype=torch.float)
    dk = torch.empty_like(k, dtype=torch.float)
    grid = (NK * NC * NT, B * H)
    path = torch.full(grid[::-1], -1, dtype=torch.int32, device=q.device) if record_path else None
    # tl.dot's own default for None (triton 3.9), resolved here: a constexpr None does not reach tl.dot as None
    knobs = getattr(getattr(triton, "knobs", None), "language", None)
    off = config.offdiag_precision or getattr(knobs, "fp32_default", None) or "tf32"
    _gla_bwd_intra_kernel[grid](
        q, k, g, dA, dq, dk, path if record_path else dq, cu_seqlens, chunk_indices, T,
        H=H, K=K, BT=BT, BC=BC, BK=BK, NC=NC, IS_VARLEN=cu_seqlens is not None,
        DIAG_PRECISION=config.diag_precision, OFF_PRECISION=off, RANGE_BOUND=RANGE_BOUND, MAG_BOUND=MAG_BOUND,
        RECORD_PATH=record_path, num_warps=config.num_warps, num_stages=config.num_stages)
    return dq, dk, path


def chunk_gla_bwd_dqk_intra(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, dA: torch.Tensor,
                            cu_seqlens: torch.LongTensor | None = None, chunk_size: int = 64,
                            chunk_indices: torch.LongTensor | None = None, config: LaunchConfig | None = None):
    """FLA's `chunk_gla_bwd_dqk_intra`: q, k, g [B, T, H, K] (g: chunk-local cumsum of the log2 gate), dA
    [B, T, H, chunk_size]; B = 1 with cu_seqlens. Returns (dq, dk), fp32 [B, T, H, K]. config: launch options
    (None: CONFIG). CPU tensors without the Triton interpreter take FLA's function."""
    _check(q, k, g, dA, cu_seqlens, chunk_size)
    if not covers(q):
        return _fla_function()(q, k, g, dA, cu_seqlens=cu_seqlens, chunk_size=chunk_size, chunk_indices=chunk_indices)
    args = (q, k, g, dA, cu_seqlens, chunk_size, chunk_indices, config or CONFIG, False)
    if q.is_cuda:
        with torch.cuda.device(q.device):  # launch on the inputs' device, as FLA's input_guard
            return _launch(*args)[:2]
    return _launch(*args)[:2]


def reference_dqk_intra(q, k, g, dA, cu_seqlens=None, chunk_size: int = 64):
    """The same sums in float64 with plain torch (tests, `_gpu_check`). Returns (dq, dk) float64."""
    B, T, H, K = q.shape
    q, k, g, dA = (t.double() for t in (q, k, g, dA))
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    bounds = [(b, 0, T) for b in range(B)] if cu_seqlens is None else \
        [(0, int(s), int(e)) for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
    for b, bos, eos in bounds:
        for s in range(bos, eos, chunk_size):
            e = min(s + chunk_size, eos)
            n = e - s
            tril = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()  # [i, j]: j <= i
            gi = g[b, s:e]  # [n, H, K]
            diff = gi[:, None] - gi[None, :]  # [i, j, H, K]: g_i - g_j
            w = torch.where(tril[:, :, None, None], torch.exp2(torch.where(tril[:, :, None, None], diff, 0.0)), 0.0)
            a = torch.where(tril[:, :, None], dA[b, s:e, :, :n].permute(0, 2, 1), 0.0)  # [i, j, H], j <= i
            dq[b, s:e] = torch.einsum('ijh,ijhc,jhc->ihc', a, w, k[b, s:e])
            dk[b, s:e] = torch.einsum('ijh,ijhc,ihc->jhc', a, w, q[b, s:e])
    return dq, dk


# ----------------------------------------------------------------------------------------------------------------
# GPU check: python -c "from models.kernels import gla_intra; gla_intra._gpu_check()"
# ----------------------------------------------------------------------------------------------------------------

def _gpu_inputs(B, T, H, K, device, extreme=False, seed=0):
    import torch.nn.functional as F
    from fla.ops.utils.constant import RCP_LN2
    from fla.ops.utils.cumsum import chunk_local_cumsum
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, H, K, device=device, generator=gen).to(torch.bfloat16)
    k = torch.randn(B, T, H, K, device=device, generator=gen).to(torch.bfloat16)
    x = torch.randn(B, T, H, K, device=device, generator=gen)
    if extreme:  # pre-activations of -1000 (log2 decay ~-90 a step) in every chunk's second sub-chunk on half the
        rows = (torch.arange(T, device=device) % 64) // 16 == 1  # channels, 1e4 (decay exactly 0) on a quarter
        x[:, rows, :, :K // 2] = -1000.0
        x[:, :, :, K // 2:K // 2 + K // 4] = 1e4
    g = chunk_local_cumsum(F.logsigmoid(x) / 16, 64, scale=RCP_LN2)
    dA = torch.randn(B, T, H, 64, device=device, generator=gen)
    return q, k, g, dA


def _median_ms(fn, iters, device):
    """Median of `iters` calls: CUDA events on a GPU, wall clock elsewhere (a dry run under the interpreter)."""
    import time
    fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _diff(a, b):
    """(max |a - b|, that over max |b|), over the elements where b is finite."""
    finite = b.isfinite()
    d = (a.float()[finite] - b.float()[finite]).abs().max().item()
    return d, d / max(b.float()[finite].abs().max().item(), 1e-30)


def _gpu_check(B=16, T=2048, H=4, K=128, iters=20, device="cuda", full_sweep=False):
    """On a CUDA machine: FLA's kernel against ours (values, float64 error, time, extreme gates), then a sweep of
    LaunchConfig, one line per configuration, and the fastest. device="cpu" under the interpreter: a dry run.
    full_sweep: BK 32/64 x 1-8 warps x 1-3 stages x every precision (72, minutes of compiling); else 12 of them."""
    import itertools
    from fla.ops.gla.chunk import chunk_gla_bwd_dqk_intra as fla_intra
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name() if device == "cuda" else device
    print(f"device {name}, triton {triton.__version__}, B {B} T {T} H {H} K {K}, default {CONFIG}", flush=True)
    q, k, g, dA = _gpu_inputs(B, T, H, K, device)
    want = fla_intra(q, k, g, dA)
    got = chunk_gla_bwd_dqk_intra(q, k, g, dA)
    for name, a, b in zip(("dq", "dk"), got, want):
        d, rel = _diff(a, b)
        print(f"{name}: ours vs FLA max abs {d:.3g} (rel to max |FLA| {rel:.3g}); non-finite: ours "
              f"{(~a.isfinite()).sum().item()}, FLA {(~b.isfinite()).sum().item()}", flush=True)
    ref = reference_dqk_intra(q[:1], k[:1], g[:1], dA[:1])  # float64, the first sequence
    for name, a, b, r in zip(("dq", "dk"), got, want, ref):
        print(f"{name} vs float64 (batch 0), max abs error / max |ref|: FLA {_diff(b[:1].double(), r)[1]:.3g}, "
              f"ours {_diff(a[:1].double(), r)[1]:.3g}", flush=True)
    t_fla = _median_ms(lambda: fla_intra(q, k, g, dA), iters, device)
    t_ours = _median_ms(lambda: chunk_gla_bwd_dqk_intra(q, k, g, dA), iters, device)
    nbytes = sum(t.numel() * t.element_size() for t in (q, k, g, dA)) + 2 * q.numel() * 4
    print(f"median ms: FLA {t_fla:.4f}, ours (default) {t_ours:.4f}; at least {nbytes / 1e6:.0f} MB moved "
          f"({nbytes / t_ours / 1e6:.0f} GB/s ours, {nbytes / t_fla / 1e6:.0f} GB/s FLA)", flush=True)

    qe, ke, ge, dAe = _gpu_inputs(B, T, H, K, device, extreme=True, seed=1)
    we = fla_intra(qe, ke, ge, dAe)
    dqe, dke, path = _launch(qe, ke, ge, dAe, None, 64, None, CONFIG, True)
    bad = sum(((~a.isfinite()) & b.isfinite()).sum().item() for a, b in zip((dqe, dke), we))
    print(f"extreme gates: fast path in {(path == 1).sum().item() / (path >= 0).sum().item():.1%} of programs; "
          f"dq, dk vs FLA where finite: max abs {_diff(dqe, we[0])[0]:.3g}, {_diff(dke, we[1])[0]:.3g}; "
          f"non-finite where FLA is finite: {bad}", flush=True)

    results = []
    grid = (((32, 64), (1, 2, 4, 8), (1, 2, 3), PRECISIONS) if full_sweep
            else ((64,), (2, 4, 8), (1, 2), ("ieee", "tf32x3")))
    for bk, warps, stages, prec in itertools.product(*grid):
        cfg = replace(CONFIG, BK=bk, num_warps=warps, num_stages=stages, diag_precision=prec)
        line = f"BK {bk} warps {warps} stages {stages} {prec:6}"
        try:
            out = chunk_gla_bwd_dqk_intra(q, k, g, dA, config=cfg)
            sync()
            ms = _median_ms(lambda: chunk_gla_bwd_dqk_intra(q, k, g, dA, config=cfg), iters, device)
        except Exception as e:  # a configuration that does not compile or run: report it, go on
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"{line}: FAILED {type(e).__name__}: {first[:200]}", flush=True)
            continue
        rel = max(_diff(out[0], want[0])[1], _diff(out[1], want[1])[1])
        results.append((ms, cfg, rel))
        print(f"{line}: {ms:.4f} ms, max diff from FLA / max |FLA| {rel:.3g}", flush=True)
    if results:
        ms, cfg, rel = min(results, key=lambda x: x[0])
        print(f"fastest: {cfg}: {ms:.4f} ms (FLA {t_fla:.4f} ms, x{t_fla / ms:.2f}), max diff from FLA / max |FLA| "
              f"{rel:.3g}", flush=True)
