"""GLA's forward intra-chunk attention matrix (FLA's `chunk_gla_fwd_intra_gk`) in one kernel, the diagonal blocks as
products (issue 10). NOT TIMED ON A GPU: written and tested under the Triton interpreter only; `_gpu_check()` is the
measurement still to be made.

What it computes. Per chunk of BT = 64 tokens, with g the chunk-local cumsum of the log2 gate (non-increasing inside a
chunk for GLA), the fp32 matrix A [B, T, H, BT]:

    A[i, j] = scale * sum_c q_ic k_jc exp2(g_ic - g_jc)    for j <= i in the same chunk (column: j's place in it)

FLA 0.6.0 splits a chunk into sub-chunks of BC = 16 rows and launches two kernels (at GLA 340M's shapes, B 16, T 2048,
H 4, K 128, ~0.2 ms a call together on an H100/H200):

  * `chunk_gla_fwd_A_kernel_intra_sub_inter`: one program per (chunk, pair of sub-chunks, batch x head), of which the
    pairs with a row sub-chunk after the column one compute a [16, 16] block as a product over K (`tl.dot` with
    tl.dot's default precision, the exponent split at the first row of the row sub-chunk); the other 10 of 16 return.
  * `chunk_gla_fwd_A_kernel_intra_sub_intra` (K <= 256; K > 256: `_split` per 128 channels then `_merge`): the
    diagonal 16 x 16 blocks as a loop over the 16 columns j with `exp2(g - g_j)` on the whole [16, K] tile (16 exp2
    per row and channel), then zeros in the block's strict upper triangle.

What FLA writes, and so what this writes: every row of a sequence gets its blocks left of the diagonal block and the
diagonal block (values on and below its diagonal, 0.0 above); the blocks right of the diagonal block are never
written (`new_empty`: whatever the memory held). Its readers (`chunk_gla_fwd_kernel_o`, `chunk_gla_bwd_kernel_dv`)
mask everything above the diagonal. `written_entries` gives that region.

One kernel here: one program per (sub-chunk of rows, chunk, batch x head) computes that sub-chunk's whole row of
blocks: the blocks left of the diagonal with FLA's sub_inter code (the same products, one earlier sub-chunk at a
time), then the diagonal block. Why one kernel rather than FLA's sub_inter beside a new diagonal kernel: one launch
instead of two; no programs that only return (FLA's sub_inter grid: 10 of 16); a row sub-chunk's q and g are loaded by
one program (again per block, from cache after the first) instead of by up to four. Against it: the programs are
uneven (the last sub-chunk of a chunk does 3 blocks and the diagonal, the first only the diagonal), and the diagonal's
loop over K holds FLA's loop as its fallback, so num_stages may pipeline only the left blocks' loops. Not measured.

The factorisation (as in models/kernels/gla_intra.py). For a per-channel reference r of the sub-chunk,
exp2(g_i - g_j) = exp2(g_i - r) * exp2(r - g_j), so the diagonal block is

    A_diag = scale * tril((q * exp2(g - r)) @ (k * exp2(r - g))^T)

a [16, BK] x [BK, 16] product per BK channels (`tl.dot`, precision a launch option: "ieee" fp32 by default), 2 exp2
per row and channel instead of 16. r = (max g + min g) / 2 over the sub-chunk's valid rows, per channel.

The safety rule is gla_intra's (its RANGE_BOUND and MAG_BOUND, imported), applied per program and BK channels: the
product only if the range max g - min g of every channel is <= RANGE_BOUND = 32 (the factors stay within 2^+-32 and
the rounding of g - r costs no more than FLA's own error; gla_intra.py's module doc has the numbers), the sums of |q|
and |k| over the [16, BK] tiles are <= MAG_BOUND = 2^24 (products at most 2^24 * 2^24 * 2^64 = 2^112, no fp32
overflow, also above the diagonal where the product computes values that are then masked), and the sum of |g| is
<= 1e30 (sums, so that a NaN or an inf in q, k or g is caught too); else FLA's elementwise loop for those channels,
which keeps NaN exactly where FLA has it. With one BK block covering K (BK >= K), that loop is FLA's expression and
gives FLA's bits.

Measured under the Triton interpreter only (tests/test_gla_fwd_intra_kernel.py, fp32 inputs): FLA's values within
2.0e-7 of the largest on the entries FLA writes (equal lengths, cu_seqlens of 37/53/60 tokens, T < 64, BK 32 with K
48, chunks of 32 and 16, K 272), the same entries written and the same 0.0 above the diagonal; error against a float64
reference 0.8 to 1.8 fp32 ulps of the largest value where FLA's is 0.7 to 1.8 (on the diagonal blocks alone, at most
1.7x FLA's); extreme gates (per-step decays of -90 log2 beside 0) with 86% of the BK blocks on the product, no
non-finite value where FLA's is finite; NaN in k exactly where FLA has it; FLA's loop alone gives FLA's bits; FLA's
output and dv kernels give FLA's o and dv from this A. `_gpu_check()` times it against FLA's function on a GPU, checks
values and extreme gates there, and sweeps the launch options (`LaunchConfig`).

Extra over FLA's: any K in one kernel (no split + merge above 256), a varlen `chunk_indices` row with a negative
sequence id (FLA's static, padded indices) returns at once, and `record_path` (tests, `_gpu_check`) reports which
path each program took for each of its BK blocks.
"""
from __future__ import annotations

import numbers
from dataclasses import replace

import torch
import triton
import triton.language as tl

from fla.ops.utils.op import exp2  # FLA's own exp2 (FLA_USE_FAST_OPS applies alike)
from models.kernels import gla_intra
from models.kernels.gla_intra import (MAG_BOUND, PRECISIONS, RANGE_BOUND, LaunchConfig, _median_ms, check_qkg,
                                      covers)

__all__ = ["chunk_gla_fwd_intra_gk", "LaunchConfig", "CONFIG", "written_entries", "reference_fwd_intra"]


# The fastest of _gpu_check()'s 12 launches on an H200 (2026-12-06, BENCHMARKS.md): 0.196 ms against FLA's 0.248 ms,
# within 3.1e-7 of FLA's values (the same launch in ieee: 0.241 ms, 4.6e-7; 2 warps, 2 stages, ieee, the first
# default: 0.350 ms). In the trainer it gained 1.0-1.3%, about the noise between calls, so gla.FWD_INTRA stays "fla".
CONFIG = LaunchConfig(num_warps=1, num_stages=1, diag_precision="tf32x3")


@triton.jit(do_not_specialize=['T'])
def _gla_fwd_intra_kernel(q, k, g, A, path, cu_seqlens, chunk_indices, scale, T,
                      H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                      NC: tl.constexpr, NK: tl.constexpr, IS_VARLEN: tl.constexpr, DIAG_PRECISION: tl.constexpr,
                      OFF_PRECISION: tl.constexpr, RANGE_BOUND: tl.constexpr, MAG_BOUND: tl.constexpr,
                      RECORD_PATH: tl.constexpr):
    """One program: the BC rows of sub-chunk `sub` of chunk `chunk` of one (sequence, head), all K channels; writes
    those rows' blocks left of the diagonal block and the diagonal block. Rows are local to the sequence; q, k, g are
    [.., T, H, K] and A [.., T, H, BT]."""
    pid = tl.program_id(0).to(tl.int64)
    sub = pid % NC
    chunk = pid // NC
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
    first = chunk * BT + sub * BC
    if first >= T:
        return
    idx = tl.arange(0, BC)
    rows = first + idx
    row_ok = rows < T
    base = (bos * H + head) * K  # row 0, channel 0 of this sequence and head
    a_rows = A + (bos * H + head) * BT + rows[:, None] * (H * BT)

    # Left of the diagonal: A[i, m] = scale * sum_c q_ic exp2(g_ic - g_fc) k_mc exp2(g_fc - g_mc), f the first row
    for other in range(0, sub):
        o_rows = chunk * BT + other * BC + idx
        o_ok = o_rows < T
        block = tl.zeros([BC, BC], dtype=tl.float32)
        for kb in range(0, NK):
            cols = kb * BK + tl.arange(0, BK)
            col_ok = cols < K
            g_first = tl.load(g + base + first * (H * K) + cols, mask=col_ok, other=0)
            here = base + rows[:, None] * (H * K) + cols[None, :]
            here_ok = row_ok[:, None] & col_ok[None, :]
            q_s = tl.load(q + here, mask=here_ok, other=0.0) * exp2(tl.load(g + here, mask=here_ok, other=0.0)
                                                                    - g_first[None, :]) * scale
            there = base + cols[:, None] + o_rows[None, :] * (H * K)  # [channel, row m]
            there_ok = col_ok[:, None] & o_ok[None, :]
            k_s = tl.load(k + there, mask=there_ok, other=0.0) * exp2(g_first[:, None]
                                                                      - tl.load(g + there, mask=there_ok, other=0.0))
            block = tl.dot(q_s, k_s, block, input_precision=OFF_PRECISION)
        tl.store(a_rows + other * BC + idx[None, :], block.to(A.dtype.element_ty), mask=row_ok[:, None])

    # The diagonal block, BK channels at a time: a product where the module doc's rule allows, else per column
    diag = tl.zeros([BC, BC], dtype=tl.float32)
    for kb in range(0, NK):
        cols = kb * BK + tl.arange(0, BK)
        col_ok = cols < K
        here = base + rows[:, None] * (H * K) + cols[None, :]
        here_ok = row_ok[:, None] & col_ok[None, :]
        g_rows = tl.load(g + here, mask=here_ok, other=0.0)
        q_rows = tl.load(q + here, mask=here_ok, other=0.0).to(tl.float32)
        k_rows = tl.load(k + here, mask=here_ok, other=0.0).to(tl.float32)
        g_max = tl.max(tl.where(row_ok[:, None], g_rows, float('-inf')), axis=0)
        g_min = tl.min(tl.where(row_ok[:, None], g_rows, float('inf')), axis=0)
        # sums, not maxima: a NaN or an inf anywhere makes them fail the test
        fast = ((tl.max(g_max - g_min, axis=0) <= RANGE_BOUND) & (tl.sum(tl.abs(g_rows)) <= 1e30)
                & (tl.sum(tl.abs(q_rows)) <= MAG_BOUND) & (tl.sum(tl.abs(k_rows)) <= MAG_BOUND))
        if RECORD_PATH:
            tl.store(path + (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * NK + kb, fast.to(tl.int32))
        if fast:
            ref = g_max * 0.5 + g_min * 0.5
            g_safe = tl.where(row_ok[:, None], g_rows, ref[None, :])  # rows past the end: factors of 1
            diag = tl.dot(q_rows * exp2(g_safe - ref[None, :]), tl.trans(k_rows * exp2(ref[None, :] - g_safe)), diag,
                          input_precision=DIAG_PRECISION)
        else:  # column j: sum_c q_ic k_jc exp2(g_ic - g_jc), an exp2 per element
            for j in range(0, tl.minimum(BC, T - first)):
                k_j = tl.load(k + base + (first + j) * (H * K) + cols, mask=col_ok, other=0).to(tl.float32)
                g_j = tl.load(g + base + (first + j) * (H * K) + cols, mask=col_ok, other=0).to(tl.float32)
                column = tl.sum(q_rows * k_j[None, :] * exp2(g_rows - g_j[None, :]), 1)
                diag += tl.where(idx[None, :] == j, column[:, None], 0.)
    # scaled after the sum, as FLA's kernel; 0.0 above the diagonal, as FLA's kernel writes it
    diag = tl.where(idx[:, None] >= idx[None, :], diag * scale, 0.)
    tl.store(a_rows + sub * BC + idx[None, :], diag.to(A.dtype.element_ty), mask=row_ok[:, None])


def _fla_function():
    from fla.ops.gla import chunk as fla_chunk  # looked up per call: models/cpu_torch.py may patch FLA on a CPU
    return fla_chunk.chunk_gla_fwd_intra_gk


def _check(q, k, g, scale, cu_seqlens, chunk_size) -> None:
    name = "chunk_gla_fwd_intra_gk"
    check_qkg(name, q, k, g, cu_seqlens, chunk_size)
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise ValueError(f"{name}: scale must be a real number (a Python float), got {type(scale).__name__}")


def _launch(q, k, g, scale, cu_seqlens, chunk_size, chunk_indices, config: LaunchConfig, record_path: bool, A=None):
    """(A, path): path [B * H, NT * NC * NK] int32, per program and BK block: 1 (product), 0 (FLA's loop), -1 (no
    rows); or None. A: an fp32 [B, T, H, chunk_size] buffer to write into (tests), else a new empty one."""
    from fla.ops.utils import prepare_chunk_indices
    if config.diag_precision not in PRECISIONS or (config.offdiag_precision or "tf32") not in PRECISIONS:
        raise ValueError(f"chunk_gla_fwd_intra_gk: config {config}: precisions must be one of {PRECISIONS}")
    B, T, H, K = q.shape
    BT = chunk_size
    BC = min(16, BT)
    BK = min(config.BK, max(16, triton.next_power_of_2(K)))
    if chunk_indices is None and cu_seqlens is not None:
        chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size)
    NT = triton.cdiv(T, BT) if cu_seqlens is None else len(chunk_indices)
    NC = triton.cdiv(BT, BC)
    NK = triton.cdiv(K, BK)
    q, k, g = (t.contiguous() for t in (q, k, g))
    if A is None:
        A = q.new_empty(B, T, H, BT, dtype=torch.float)  # as FLA: the blocks right of the diagonal stay unwritten
    grid = (NC * NT, B * H)
    path = torch.full((B * H, NC * NT * NK), -1, dtype=torch.int32, device=q.device) if record_path else None
    # tl.dot's own default for None (triton 3.9), resolved here: a constexpr None does not reach tl.dot as None
    knobs = getattr(getattr(triton, "knobs", None), "language", None)
    off = config.offdiag_precision or getattr(knobs, "fp32_default", None) or "tf32"
    _gla_fwd_intra_kernel[grid](
        q, k, g, A, path if record_path else A, cu_seqlens, chunk_indices, float(scale), T,
        H=H, K=K, BT=BT, BC=BC, BK=BK, NC=NC, NK=NK, IS_VARLEN=cu_seqlens is not None,
        DIAG_PRECISION=config.diag_precision, OFF_PRECISION=off, RANGE_BOUND=RANGE_BOUND, MAG_BOUND=MAG_BOUND,
        RECORD_PATH=record_path, num_warps=config.num_warps, num_stages=config.num_stages)
    return A, path


def chunk_gla_fwd_intra_gk(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, scale: float,
                           cu_seqlens: torch.LongTensor | None = None, chunk_size: int = 64,
                           chunk_indices: torch.LongTensor | None = None, config: LaunchConfig | None = None):
    """FLA's `chunk_gla_fwd_intra_gk`: q, k, g [B, T, H, K] (g: chunk-local cumsum of the log2 gate); B = 1 with
    cu_seqlens. Returns A, fp32 [B, T, H, chunk_size], written where FLA writes it (`written_entries`). config:
    launch options (None: CONFIG). CPU tensors without the Triton interpreter take FLA's function."""
    _check(q, k, g, scale, cu_seqlens, chunk_size)
    if not covers(q):
        return _fla_function()(q, k, g, scale, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                               chunk_indices=chunk_indices)
    args = (q, k, g, scale, cu_seqlens, chunk_size, chunk_indices, config or CONFIG, False)
    if q.is_cuda:
        with torch.cuda.device(q.device):  # launch on the inputs' device, as FLA's input_guard
            return _launch(*args)[0]
    return _launch(*args)[0]


def written_entries(T: int, chunk_size: int = 64, cu_seqlens=None, device=None) -> torch.Tensor:
    """bool [T, chunk_size]: the entries of A's rows that FLA (and this) write, for every batch and head: a row's
    blocks up to and including the diagonal one (16 columns each). The rest is never written."""
    BC = min(16, chunk_size)
    t = torch.arange(T, device=device)
    if cu_seqlens is not None:  # position inside its own sequence
        starts = cu_seqlens.to(device)[:-1]
        t = t - starts[torch.searchsorted(starts, t, right=True) - 1]
    row_block = (t % chunk_size) // BC
    col_block = torch.arange(chunk_size, device=device) // BC
    return col_block[None, :] <= row_block[:, None]


def reference_fwd_intra(q, k, g, scale, cu_seqlens=None, chunk_size: int = 64):
    """The same sums in float64 with plain torch (tests, `_gpu_check`): float64 [B, T, H, chunk_size], 0 above the
    diagonal."""
    B, T, H, K = q.shape
    q, k, g = (t.double() for t in (q, k, g))
    A = torch.zeros(B, T, H, chunk_size, dtype=torch.float64, device=q.device)
    bounds = [(b, 0, T) for b in range(B)] if cu_seqlens is None else \
        [(0, int(s), int(e)) for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
    for b, bos, eos in bounds:
        for s in range(bos, eos, chunk_size):
            e = min(s + chunk_size, eos)
            n = e - s
            tril = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[:, :, None, None]  # [i, j]: j <= i
            gi = g[b, s:e]  # [n, H, K]
            diff = gi[:, None] - gi[None, :]  # [i, j, H, K]: g_i - g_j
            w = torch.where(tril, torch.exp2(torch.where(tril, diff, 0.0)), 0.0)
            A[b, s:e, :, :n] = scale * torch.einsum('ihc,jhc,ijhc->ihj', q[b, s:e], k[b, s:e], w)
    return A


# ----------------------------------------------------------------------------------------------------------------
# GPU check: python -c "from models.kernels import gla_fwd_intra; gla_fwd_intra._gpu_check()"
# ----------------------------------------------------------------------------------------------------------------

def _gpu_inputs(B, T, H, K, device, extreme=False, seed=0):
    """q, k, g as gla_intra's GPU check builds them (the same draws)."""
    return gla_intra._gpu_inputs(B, T, H, K, device, extreme=extreme, seed=seed)[:3]


def _diff(a, b, where):
    """(max |a - b|, that over max |b|), over the entries `where` (bool, broadcast to b) where b is finite."""
    sel = where.expand_as(b) & b.isfinite()
    d = (a.double()[sel] - b.double()[sel]).abs().max().item()
    return d, d / max(b.double()[sel].abs().max().item(), 1e-30)


def _gpu_check(B=16, T=2048, H=4, K=128, iters=20, device="cuda", full_sweep=False):
    """On a CUDA machine: FLA's function against ours (values, float64 error, time, extreme gates), then a sweep of
    LaunchConfig, one line per configuration, and the fastest. device="cpu" under the interpreter: a dry run.
    full_sweep: BK 32/64/128 x 1-8 warps x 1-3 stages x every precision (108, minutes of compiling); else 12."""
    import itertools
    from fla.ops.gla.chunk import chunk_gla_fwd_intra_gk as fla_intra
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name() if device == "cuda" else device
    print(f"device {name}, triton {triton.__version__}, B {B} T {T} H {H} K {K}, default {CONFIG}", flush=True)
    scale = K ** -0.5
    q, k, g = _gpu_inputs(B, T, H, K, device)
    where = written_entries(T, 64, device=device)[None, :, None, :]  # [1, T, 1, BT]
    want = fla_intra(q, k, g, scale)
    got = chunk_gla_fwd_intra_gk(q, k, g, scale)
    d, rel = _diff(got, want, where)
    upper = (torch.ones(64, 64, dtype=torch.bool, device=device).triu(1)[(torch.arange(T, device=device) % 64)]
             & where[0, :, 0])[None, :, None, :].expand_as(got)
    print(f"A: ours vs FLA max abs {d:.3g} (rel to max |FLA| {rel:.3g}); non-finite where written: ours "
          f"{(~got.isfinite() & where).sum().item()}, FLA {(~want.isfinite() & where).sum().item()}; written entries "
          f"above the diagonal all 0.0: ours {bool((got[upper] == 0).all())}, FLA {bool((want[upper] == 0).all())}",
          flush=True)
    ref = reference_fwd_intra(q[:1], k[:1], g[:1], scale)  # float64, the first sequence
    print(f"A vs float64 (batch 0), max abs error / max |ref|: FLA {_diff(want[:1], ref, where)[1]:.3g}, "
          f"ours {_diff(got[:1], ref, where)[1]:.3g}", flush=True)
    t_fla = _median_ms(lambda: fla_intra(q, k, g, scale), iters, device)
    t_ours = _median_ms(lambda: chunk_gla_fwd_intra_gk(q, k, g, scale), iters, device)
    nbytes = sum(t.numel() * t.element_size() for t in (q, k, g)) + int(got.numel() * 4 * 10 / 16)
    print(f"median ms: FLA {t_fla:.4f}, ours (default) {t_ours:.4f}; at least {nbytes / 1e6:.0f} MB moved "
          f"({nbytes / t_ours / 1e6:.0f} GB/s ours, {nbytes / t_fla / 1e6:.0f} GB/s FLA)", flush=True)

    qe, ke, ge = _gpu_inputs(B, T, H, K, device, extreme=True, seed=1)
    we = fla_intra(qe, ke, ge, scale)
    ae, path = _launch(qe, ke, ge, scale, None, 64, None, CONFIG, True)
    bad = ((~ae.isfinite()) & we.isfinite() & where).sum().item()
    print(f"extreme gates: product in {(path == 1).sum().item() / (path >= 0).sum().item():.1%} of program BK "
          f"blocks; A vs FLA where finite: max abs {_diff(ae, we, where)[0]:.3g}, rel {_diff(ae, we, where)[1]:.3g}; "
          f"non-finite where FLA is finite: {bad}", flush=True)

    results = []
    grid = (((32, 64, 128), (1, 2, 4, 8), (1, 2, 3), PRECISIONS) if full_sweep
            else ((CONFIG.BK,), (1, 2, 4), (1, 2), ("ieee", "tf32x3")))
    for bk, warps, stages, prec in itertools.product(*grid):
        cfg = replace(CONFIG, BK=bk, num_warps=warps, num_stages=stages, diag_precision=prec)
        line = f"BK {bk} warps {warps} stages {stages} {prec:6}"
        try:
            out = chunk_gla_fwd_intra_gk(q, k, g, scale, config=cfg)
            sync()
            ms = _median_ms(lambda: chunk_gla_fwd_intra_gk(q, k, g, scale, config=cfg), iters, device)
        except Exception as e:  # a configuration that does not compile or run: report it, go on
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"{line}: FAILED {type(e).__name__}: {first[:200]}", flush=True)
            continue
        rel = _diff(out, want, where)[1]
        results.append((ms, cfg, rel))
        print(f"{line}: {ms:.4f} ms, max diff from FLA / max |FLA| {rel:.3g}", flush=True)
    if results:
        ms, cfg, rel = min(results, key=lambda x: x[0])
        print(f"fastest: {cfg}: {ms:.4f} ms (FLA {t_fla:.4f} ms, x{t_fla / ms:.2f}), max diff from FLA / max |FLA| "
              f"{rel:.3g}", flush=True)
