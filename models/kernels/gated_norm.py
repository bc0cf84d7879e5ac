"""GLA's gated output norm, y = RMSNorm(o) * weight * swish(g), in Triton, tiled over rows in both passes (issue 10).

Why: GLA normalizes each head's attention output o over its head dimension and multiplies it by swish of the output
gate g (FLA's `FusedRMSNormGated`, activation "swish"). FLA's backward for it ran at ~75-85% of the memory bound in
GLA 340M's step (BENCHMARKS.md: 2.35 ms a step on an H200 for 24 calls that move ~8 GB; its forward 1.21 ms is at
the bound). This is models/kernels/rmsnorm.py's tiling (a 2-D tile of rows per program; the backward a few programs
per SM, each walking its tiles with the next one loaded ahead, fp32 partial sums of dweight summed by torch) with
the gate in the same passes.

What it computes (fp32 math inside the kernels, storage in o's dtype), per row of D = head dimension:
    xhat = o * rsqrt(mean(o^2) + eps),   a = xhat * weight,   y = a * g * sigmoid(g)
backward, with dy:
    dg = dy * a * s * (1 + g * (1 - s))           (s = sigmoid(g))
    da = dy * g * s,  do = rstd * (da * weight - xhat * mean(xhat * da * weight)),  dweight = sum over rows of da * xhat
Saved for backward: o, g and one fp32 rstd per row (y is not kept).

No autotune: the backward launches as models/kernels/rmsnorm.py's `backward_config(D)` (tuned there at D = 1024;
GLA's head dimension is 256) unless BACKWARD_CONFIG names another, which bench/norm_bench.py --gated-bwd-sweep times.
Runs under the Triton interpreter on CPU (tests); a CPU tensor without it takes `rms_norm_gated_reference`.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from models import kernels

from models.kernels.rmsnorm import (MAX_D, BackwardConfig, _row_tile, _rows, backward_config, backward_programs,
                                    tile_config)

# how the backward kernel launches (rows per tile, warps, programs per SM, next tile loaded ahead); None:
# backward_config(D). Set by the benches (bench/norm_bench.py --gated-bwd-sweep, bench/train_bench.py --gated-norm-bwd)
BACKWARD_CONFIG: BackwardConfig | None = None


@triton.jit
def _gated_rmsnorm_fwd_kernel(X, G, W, Y, RSTD, M, D, eps, BT: tl.constexpr, BD: tl.constexpr):
    rows, cols, row_ok, col_ok, mask, offs = _row_tile(M, D, BT, BD)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :] * (g * tl.sigmoid(g))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_rmsnorm_bwd_load(X, G, DY, RSTD, rows, cols, M, D):
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    return x, g, dy, rstd


@triton.jit
def _gated_rmsnorm_bwd_kernel(X, G, W, RSTD, DY, DX, DG, DWP, M, D, sdg, tiles_per_program,
                              DG_GROUP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, PREFETCH: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BD)
    col_ok = cols < D
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BD], dtype=tl.float32)
    if PREFETCH:  # the next tile's loads are issued before this tile's math
        x_n, g_n, dy_n, rstd_n = _gated_rmsnorm_bwd_load(X, G, DY, RSTD, pid * BT + tl.arange(0, BT), cols, M, D)
    for t in range(0, tiles_per_program):
        rows = (pid + t * programs) * BT + tl.arange(0, BT)  # past the last tile every row is masked off
        if PREFETCH:
            x, g, dy, rstd = x_n, g_n, dy_n, rstd_n
            x_n, g_n, dy_n, rstd_n = _gated_rmsnorm_bwd_load(X, G, DY, RSTD, rows + programs * BT, cols, M, D)
        else:
            x, g, dy, rstd = _gated_rmsnorm_bwd_load(X, G, DY, RSTD, rows, cols, M, D)
        mask = (rows < M)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        s = tl.sigmoid(g)
        xhat = x * rstd[:, None]
        a = xhat * w[None, :]
        u = dy * s
        da = u * g  # dy * g * s
        grows = rows.to(tl.int64)  # DG's row r at (r // DG_GROUP) * sdg + (r % DG_GROUP) * D
        dg_offs = (grows // DG_GROUP * sdg + grows % DG_GROUP * D)[:, None] + cols[None, :]
        # dy * a * s * (1 + g * (1 - s)) = a * (u + da * (1 - s))
        tl.store(DG + dg_offs, (a * (u + da * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)
        wda = da * w[None, :]
        c = tl.sum(a * da, axis=1) / D  # xhat * wda = a * da
        tl.store(DX + offs, ((wda - xhat * c[:, None]) * rstd[:, None]).to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(da * xhat, axis=0)
    tl.store(DWP + pid.to(tl.int64) * D + cols, dw, mask=col_ok)


def _use_kernel(x: torch.Tensor) -> bool:
    return kernels.runs_triton(x)


def _check(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"rms_norm_gated: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if g.shape != x.shape or g.dtype != x.dtype or g.device != x.device:
        raise ValueError(f"rms_norm_gated: the gate must have x's shape, dtype and device {tuple(x.shape)} {x.dtype} "
                         f"{x.device}, got {tuple(g.shape)} {g.dtype} {g.device}")
    if weight.shape != (x.shape[-1],) or weight.device != x.device:
        raise ValueError(f"rms_norm_gated: weight has shape {tuple(weight.shape)} on {weight.device}; x of shape "
                         f"{tuple(x.shape)} needs ({x.shape[-1]},) on {x.device}")
    if x.shape[-1] > MAX_D:
        raise ValueError(f"rms_norm_gated: last dimension {x.shape[-1]} exceeds the kernel's maximum {MAX_D}")


def _forward(x2, g2, weight, eps):
    m, d = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(m, dtype=torch.float32, device=x2.device)
    if m:
        bt, bd, num_warps = tile_config(d, backward=False)
        _gated_rmsnorm_fwd_kernel[(triton.cdiv(m, bt),)](x2, g2, weight, y, rstd, m, d, eps, BT=bt, BD=bd,
                                                         num_warps=num_warps)
    return y, rstd


def _backward(x2, g2, weight, rstd, dy2, dg_out=None, config: BackwardConfig | None = None):
    """(dx, dg, dweight) for dy2. dg_out: where the gate's gradient goes, a tensor of g's shape [..., G, D] and dtype
    whose last two dimensions are packed and whose rows of G * D may be strided (a column block of a wider gradient);
    dg is then dg_out. None, or a layout the kernel cannot write: a new [M, D] tensor (copied into dg_out if given).
    config: the launch (None: BACKWARD_CONFIG, else backward_config(D))."""
    m, d = x2.shape
    dx = torch.empty_like(x2)
    layout = _dg_layout(dg_out, g2)
    dg = dg_out if layout is not None else torch.empty_like(g2)
    group, sdg = layout or (1, d)
    if m == 0:
        return dx, dg, torch.zeros(d, dtype=torch.float32, device=x2.device)
    config = config or BACKWARD_CONFIG or backward_config(d)
    bt, num_warps, per_sm, prefetch, _ = config
    n_tiles = triton.cdiv(m, bt)
    programs = backward_programs(n_tiles, x2.device, num_warps, per_sm)
    dw_partial = torch.empty(programs, d, dtype=torch.float32, device=x2.device)
    _gated_rmsnorm_bwd_kernel[(programs,)](x2, g2, weight, rstd, dy2, dx, dg, dw_partial, m, d,
                                           sdg, triton.cdiv(n_tiles, programs), DG_GROUP=group, BT=bt,
                                           BD=triton.next_power_of_2(d), PREFETCH=bool(prefetch), **config.launch())
    if dg_out is not None and layout is None:
        dg = dg_out.copy_(dg.view(dg_out.shape))
    return dx, dg, dw_partial.sum(0)


def _dg_layout(out, g2):
    """(G, row-group stride) where the backward kernel can write g2's [M, D] rows into `out` (row r at
    (r // G) * stride + (r % G) * D): out has M * D elements of g2's dtype and device, its last dimension D and the one
    before it (G, or 1) packed, the rest one strided dimension. Else None."""
    if out is None or out.dtype != g2.dtype or out.device != g2.device or out.numel() != g2.numel() or out.dim() < 2:
        return None
    d = g2.shape[1]
    group = out.shape[-2] if out.dim() > 2 else 1
    try:
        out3 = out.view(-1, group, d)
    except RuntimeError:
        return None
    if out.shape[-1] != d or out3.stride(2) != 1 or (group > 1 and out3.stride(1) != d):
        return None
    return group, out3.stride(0)


class _RMSNormGatedFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, g, weight, eps, dg_into):
        x2, g2 = _rows(x), _rows(g)
        ctx.dg_into = dg_into
        weight = weight.contiguous()
        y, rstd = _forward(x2, g2, weight, eps)
        ctx.save_for_backward(x2, g2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, g2, weight, rstd = ctx.saved_tensors
        dg_out = ctx.dg_into() if ctx.dg_into is not None and ctx.needs_input_grad[1] else None
        dx, dg, dw = _backward(x2, g2, weight, rstd, _rows(dy), dg_out)
        dg = dg.view(ctx.shape) if dg_out is None else dg
        return (dx.view(ctx.shape) if ctx.needs_input_grad[0] else None,
                dg if ctx.needs_input_grad[1] else None,
                dw.to(weight.dtype) if ctx.needs_input_grad[2] else None, None, None)


def rms_norm_gated(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                   dg_into=None) -> torch.Tensor:
    """RMSNorm(x) * weight * swish(g) over the last dimension (FLA's FusedRMSNormGated with activation "swish", no
    residual). x, g: [..., D] of one dtype; weight: [D]. dg_into: None, or a callable the backward calls for where
    the gate's gradient goes (a tensor of g's shape and dtype whose rows may be strided: a column block of one wider
    gradient, models/fused.py's GradSlab); the kernel writes it there and returns it. See the module doc."""
    _check(x, g, weight)
    if not _use_kernel(x):
        return rms_norm_gated_reference(x, g, weight, eps)
    return _RMSNormGatedFunction.apply(x, g, weight, float(eps), dg_into)


def rms_norm_gated_reference(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Plain PyTorch, fp32 math, autograd: the tests' reference and the CPU path."""
    _check(x, g, weight)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float() * F.silu(g.float())
    return y.to(x.dtype)
