"""RMSNorm with a fused residual add, in Triton, tiled over rows in both passes (issue 10).

Why: FLA 0.6.0's RMSNorm (`fla.modules.norm.layernorm`), for hidden size D > 512, runs its backward as
`layer_norm_bwd_kernel_row`: about one program per SM, each walking its ~250 rows one row at a time (a 1-D vector
per loop iteration). Measured on an H200: 0.31 ms per call for a [32768, 1024] bf16 tensor, about 5x slower than
memory bandwidth allows (~0.07-0.1 ms); GLA 340M makes 49 such calls per training step, ~15 ms of it.

Here every program handles a 2-D tile of BT rows x BD columns (BD = D rounded up to a power of 2, masked), so a
loop iteration moves a few thousand elements instead of one row. The backward runs a few programs per SM; each
walks its share of the tiles and keeps a [BD] fp32 partial sum of dweight, and the partials are summed by torch
afterwards (deterministic: no atomics).

What it computes (math in fp32 inside the kernels, storage in x's dtype):
    s = x + residual (rounded to x's dtype)    or  s = x without a residual
    y = s * rsqrt(mean(s^2 over the last dim) + eps) * weight
`rms_norm(..., prenorm=True)` returns (y, s): s is the new residual stream. The normalization uses the rounded s,
the same tensor the backward reads back, so forward and backward see one s. Backward: ds = d(y)/ds . dy (+ the
incoming gradient of s when prenorm, added inside the kernel); dx = dresidual = ds (one tensor); dweight summed in
fp32 and cast to weight's dtype. Saved for backward: s (or x) and one fp32 rstd per row; the normalized value is
recomputed.

No autotune (a cold autotune costs minutes on the GPU machine): tile and warp counts come from D (`tile_config`).
Runs under the Triton interpreter on CPU (tests, `models/cpu_triton.py`); a CPU tensor without the interpreter
takes `rms_norm_reference`, plain PyTorch.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from models import kernels

MAX_D = 65536  # one row must fit one tile: BD = next power of 2 >= D, and BT >= 1
_FWD_TILE = 8192  # elements per forward tile: ~32 per thread at 8 warps
_BWD_TILE = 4096  # the backward keeps ~5 tile-sized fp32 values live, so half the forward's
_CPU_PROGRAMS = 4  # backward programs under the interpreter: few, so that each walks several tiles


@triton.jit
def _row_tile(M, D, BT: tl.constexpr, BD: tl.constexpr):
    """This program's tile of BT rows x BD columns of a row-major [M, D] tensor: (rows, cols, row mask, column mask,
    element mask, element offsets)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, BD)
    row_ok = rows < M
    col_ok = cols < D
    return rows, cols, row_ok, col_ok, row_ok[:, None] & col_ok[None, :], rows.to(tl.int64)[:, None] * D + cols[None, :]


@triton.jit
def _rms_fwd_kernel(X, R, W, Y, S, RSTD, M, D, eps,
                    BT: tl.constexpr, BD: tl.constexpr, HAS_RES: tl.constexpr, STORE_S: tl.constexpr):
    rows, cols, row_ok, col_ok, mask, offs = _row_tile(M, D, BT, BD)
    s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        s_stored = s.to(Y.dtype.element_ty)  # s has x's dtype, as does y
        if STORE_S:
            tl.store(S + offs, s_stored, mask=mask)
        s = s_stored.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / D + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = s * rstd[:, None] * w[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_bwd_load(S, DY, DSO, RSTD, rows, cols, M, D, HAS_DSO: tl.constexpr):
    """One tile's inputs of the backward, in fp32 (rows past M masked to 0; without DSO, a placeholder: dy)."""
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    if HAS_DSO:
        dso = tl.load(DSO + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        dso = dy
    return s, dy, dso, rstd


@triton.jit
def _rms_bwd_kernel(S, W, RSTD, DY, DSO, DS, DWP, M, D, tiles_per_program,
                    BT: tl.constexpr, BD: tl.constexpr, HAS_DSO: tl.constexpr, PREFETCH: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BD)
    col_ok = cols < D
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BD], dtype=tl.float32)
    if PREFETCH:  # the next tile's loads are issued before this tile's math (two tiles in flight per program)
        s_n, dy_n, dso_n, rstd_n = _rms_bwd_load(S, DY, DSO, RSTD, pid * BT + tl.arange(0, BT), cols, M, D, HAS_DSO)
    for t in range(0, tiles_per_program):
        # tiles pid, pid + programs, ...; past the last tile every row is masked off
        rows = (pid + t * programs) * BT + tl.arange(0, BT)
        if PREFETCH:
            s, dy, dso, rstd = s_n, dy_n, dso_n, rstd_n
            s_n, dy_n, dso_n, rstd_n = _rms_bwd_load(S, DY, DSO, RSTD, rows + programs * BT, cols, M, D, HAS_DSO)
        else:
            s, dy, dso, rstd = _rms_bwd_load(S, DY, DSO, RSTD, rows, cols, M, D, HAS_DSO)
        mask = (rows < M)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        xhat = s * rstd[:, None]
        wdy = dy * w[None, :]
        c = tl.sum(xhat * wdy, axis=1) / D
        ds = (wdy - xhat * c[:, None]) * rstd[:, None]
        if HAS_DSO:
            ds += dso
        tl.store(DS + offs, ds.to(DS.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(DWP + pid.to(tl.int64) * D + cols, dw, mask=col_ok)


def tile_config(d: int, backward: bool) -> tuple[int, int, int]:
    """(BT rows per tile, BD columns, num_warps) for hidden size d: a tile of ~8K (forward) / ~4K (backward)
    elements, at least one row, and ~512 elements per warp (4 to 16 warps)."""
    bd = triton.next_power_of_2(d)
    bt = max(1, (_BWD_TILE if backward else _FWD_TILE) // bd)
    num_warps = min(16, max(4, bt * bd // 512))
    return bt, bd, num_warps


class BackwardConfig(NamedTuple):
    """How the backward kernel is launched: BT rows per tile, num_warps per program, programs per SM, whether
    each program loads its next tile before the math of the current one, and a cap on the registers a thread may
    take (maxnreg; 0: ptxas's choice; a cap lets more programs share an SM, ptxas spilling what does not fit).
    `backward_config(d)` gives the default; bench/norm_bench.py --bwd-sweep times others (pass one as `config=` to
    `_backward`)."""
    bt: int
    num_warps: int
    per_sm: int
    prefetch: bool = False
    maxnreg: int = 0

    def launch(self) -> dict:
        """The launch keywords besides the grid and the kernel's arguments."""
        return {"num_warps": self.num_warps, **({"maxnreg": self.maxnreg} if self.maxnreg else {})}


def parse_backward_config(text: str) -> BackwardConfig:
    """"BT,WARPS,PER_SM,PREFETCH[,MAXNREG]" (PREFETCH 0 or 1), as the benches take a launch on their command
    lines."""
    parts = [x.strip() for x in text.split(",")]
    if (len(parts) not in (4, 5) or not all(x.isdigit() and int(x) > 0 for x in parts[:3]) or parts[3] not in ("0", "1")
            or (len(parts) == 5 and not parts[4].isdigit())):
        raise ValueError(f"backward launch {text!r}: give BT,WARPS,PER_SM,PREFETCH[,MAXNREG], three positive integers, "
                         f"PREFETCH 0 or 1 and a register cap (0: none) (e.g. 2,4,8,1 or 16,4,4,1,128)")
    bt, warps, per_sm, prefetch, *cap = (int(x) for x in parts)
    return BackwardConfig(bt, warps, per_sm, bool(prefetch), cap[0] if cap else 0)


def backward_config(d: int) -> BackwardConfig:
    """The default for hidden size d: tile_config's tile height, ~1K elements per warp (4 to 16 warps), 8 warps'
    worth of programs per SM, the next tile loaded ahead. Chosen by bench/norm_bench.py --bwd-sweep (H100, d=1024,
    2026-12-06: BT 4, 4 warps, 2 per SM, prefetch took the prenorm backward from 0.136 ms to 0.100 ms, the same ds
    bit for bit; BENCHMARKS.md)."""
    bt, bd, _ = tile_config(d, backward=True)
    num_warps = min(16, max(4, bt * bd // 1024))
    return BackwardConfig(bt, num_warps, max(1, 8 // num_warps), prefetch=True)


def backward_programs(n_tiles: int, device: torch.device, num_warps: int, per_sm: int | None = None) -> int:
    """A few programs per SM (per_sm; default 8 warps' worth, as backward_config), never more than there are tiles."""
    if device.type == "cuda":
        per_sm = per_sm or max(1, 8 // num_warps)
        programs = torch.cuda.get_device_properties(device).multi_processor_count * per_sm
    else:
        programs = _CPU_PROGRAMS
    return max(1, min(programs, n_tiles))


def _use_kernel(x: torch.Tensor) -> bool:
    return kernels.runs_triton(x)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"rms_norm: x must have a non-empty last (hidden) dimension, got shape {tuple(x.shape)}")
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, but x of shape {tuple(x.shape)} needs "
                         f"a 1-D weight of shape ({d},), one value per element of the last dimension")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"rms_norm: x and weight must be floating point, got {x.dtype} and {weight.dtype}")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"rms_norm: residual must have x's shape and dtype {tuple(x.shape)} {x.dtype}, "
                             f"got {tuple(residual.shape)} {residual.dtype}; cast it with .to(x.dtype)")
        if residual.device != x.device:
            raise ValueError(f"rms_norm: residual is on {residual.device}, x on {x.device}: move them to one device")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device}, x on {x.device}: move them to one device")
    if d > MAX_D:
        raise ValueError(f"rms_norm: hidden size {d} exceeds the kernel's maximum {MAX_D} (one row per tile)")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> contiguous [M, D] (a view when it can be)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.is_contiguous() else t.contiguous()


def _forward(x2: torch.Tensor, r2: torch.Tensor | None, weight: torch.Tensor, eps: float, store_s: bool):
    m, d = x2.shape
    y = torch.empty_like(x2)
    s = torch.empty_like(x2) if (r2 is not None and store_s) else None
    rstd = torch.empty(m, dtype=torch.float32, device=x2.device)
    if m:
        bt, bd, num_warps = tile_config(d, backward=False)
        _rms_fwd_kernel[(triton.cdiv(m, bt),)](
            x2, r2 if r2 is not None else x2, weight, y, s if s is not None else y, rstd, m, d, eps,
            BT=bt, BD=bd, HAS_RES=r2 is not None, STORE_S=s is not None, num_warps=num_warps)
    return y, s, rstd


def _backward(s2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy2: torch.Tensor,
              dso2: torch.Tensor | None, config: BackwardConfig | None = None):
    m, d = s2.shape
    ds = torch.empty_like(s2)
    if m == 0:
        return ds, torch.zeros(d, dtype=torch.float32, device=s2.device)
    config = config or backward_config(d)
    bt, num_warps, per_sm, prefetch, _ = config
    bd = triton.next_power_of_2(d)
    n_tiles = triton.cdiv(m, bt)
    programs = backward_programs(n_tiles, s2.device, num_warps, per_sm)
    dw_partial = torch.empty(programs, d, dtype=torch.float32, device=s2.device)
    _rms_bwd_kernel[(programs,)](
        s2, weight, rstd, dy2, dso2 if dso2 is not None else dy2, ds, dw_partial, m, d,
        triton.cdiv(n_tiles, programs), BT=bt, BD=bd, HAS_DSO=dso2 is not None, PREFETCH=bool(prefetch),
        **config.launch())
    return ds, dw_partial.sum(0)


class _RMSNormFunction(torch.autograd.Function):
    """Returns y, or (y, s) for prenorm with a residual; prenorm without one never needs this (s is x itself)."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps, prenorm):
        shape = x.shape
        x2 = _rows(x)
        r2 = _rows(residual) if residual is not None else None
        weight = weight.contiguous()
        needs_grad = any(ctx.needs_input_grad[:3])
        y, s, rstd = _forward(x2, r2, weight, eps, store_s=prenorm or needs_grad)
        ctx.set_materialize_grads(False)
        ctx.has_residual = residual is not None
        ctx.shape = shape
        if needs_grad:
            ctx.save_for_backward(s if s is not None else x2, weight, rstd)
        y = y.view(shape)
        if prenorm and residual is not None:
            return y, s.view(shape)  # s's incoming gradient is added inside the backward kernel
        return y

    @staticmethod
    def backward(ctx, dy, dso=None):
        s2, weight, rstd = ctx.saved_tensors
        if dy is None and dso is None:
            return None, None, None, None, None
        dy2 = _rows(dy) if dy is not None else torch.zeros_like(s2)
        dso2 = _rows(dso) if dso is not None else None
        ds, dw = _backward(s2, weight, rstd, dy2, dso2)
        ds = ds.view(ctx.shape)
        dx = ds if ctx.needs_input_grad[0] else None
        dres = ds if ctx.has_residual and ctx.needs_input_grad[1] else None
        dweight = dw.to(weight.dtype) if ctx.needs_input_grad[2] else None
        return dx, dres, dweight, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
             prenorm: bool = False):
    """y = s * rsqrt(mean(s^2) + eps) * weight with s = x (+ residual); (y, s) when prenorm. See the module doc.

    x, residual: [..., D], one dtype; weight: [D], any float dtype. On CUDA (or under the Triton interpreter) the
    Triton kernels run; a CPU tensor otherwise takes `rms_norm_reference`."""
    _check_inputs(x, weight, residual)
    if not _use_kernel(x):
        return rms_norm_reference(x, weight, eps=eps, residual=residual, prenorm=prenorm)
    out = _RMSNormFunction.apply(x, residual, weight, float(eps), bool(prenorm))
    if prenorm and residual is None:
        return out, x
    return out


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                       residual: torch.Tensor | None = None, prenorm: bool = False):
    """Plain PyTorch, fp32 math, autograd: the tests' reference and the CPU path. Same rounding of s as the kernel."""
    _check_inputs(x, weight, residual)
    s = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    sf = s.float()
    y = (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return (y, s) if prenorm else y
