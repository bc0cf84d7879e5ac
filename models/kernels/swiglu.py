"""SwiGLU + down projection, and the GLA gate's scaled log-sigmoid, as streaming Triton kernels (issue 10).

Why: FLA 0.6.0's SwiGLU kernels (`fla.modules.activations.ops.swiglu_fwd_kernel` / `swiglu_fwdbwd_kernel`) walk the
flattened elements and compute `row = offs // D; col = offs % D` in int64 for every element, with autotuned block
sizes. Measured on an H200 for GLA 340M ([32768, 2816] bf16): 0.20 ms per forward and 0.36 ms per forward+backward
call, 2.7-3.1 TB/s where the card copies at ~4.3 TB/s; 48 calls per training step, ~13.5 ms. The GLA gate's
`F.logsigmoid(gk) / gate_logit_normalizer` is two torch elementwise kernels forward and more backward.

Layout. Every kernel here moves a 2-D tile of BT rows x BD columns per program, addressed as
`row * row_stride + col` (no per-element division). A tensor whose rows are packed (contiguous) is handed to the
kernels as ONE row of M*D elements: the tile is then 1 x BLOCK, contiguous, with no column masking except at the very
end, whatever D is. Row-strided inputs (last dimension contiguous, rows `stride` apart, e.g. a column slice of a wider
tensor) take a tile of several rows with a column width that wastes few lanes on D (`tile_config`). Anything else
(a last dimension with a stride, or leading dimensions that cannot be flattened into one row stride) is copied to a
contiguous tensor first by `reshape`/`contiguous`. Outputs are always contiguous.

What it computes (fp32 math inside the kernels, outputs in the inputs' dtype):
    swiglu_linear(x, y, W, b) = (silu(x) * y) @ W^T + b        silu(x) = x * sigmoid(x)
      forward: z = silu(x) * y (kernel), then F.linear. Saved: x, y, W (and z with keep_z).
      backward: dz = dout @ W; one kernel reads x, y, dz and writes dx = dz * y * s * (1 + x * (1 - s)),
                dy = dz * x * s (s = sigmoid(x)) and the recomputed z when W needs a gradient (unless kept);
                dW = dout^T @ z, db = sum of dout over rows.
    log_sigmoid_scaled(x, n) = logsigmoid(x) / n,   logsigmoid(x) = min(x, 0) - log1p(exp(-|x|))
      backward: dx = dy * sigmoid(-x) / n, from exp(-|x|) again (no overflow at any |x|). Saved: x.

No autotune (a cold autotune costs minutes on the GPU machine): tile sizes and warps come from the shape
(`tile_config`). Runs under the Triton interpreter on CPU (tests); a CPU tensor without the interpreter takes the
PyTorch references (`swiglu_linear_reference`, `log_sigmoid_scaled_reference`). Not covered: autocast (FLA's
function casts under autocast; models/fused.py never calls this under autocast).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from models import kernels

# Elements per program. A 1 x BLOCK tile of packed rows: 8192 elements at 8 warps is 32 per thread, four 16-byte
# vectors of bf16 per loaded tensor. The backward keeps ~6 tile-sized fp32 values live and stores three tensors, so
# half of that. Not measured per setting on a GPU yet: bench/elementwise_bench.py --sweep times the alternatives.
FWD_TILE = 8192
BWD_TILE = 4096
NUM_WARPS = 8
_BD_CHOICES = (1024, 512, 256, 128)  # column widths for row-strided tiles; the least padding of D wins


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def _tile(M, D, BT: tl.constexpr, BD: tl.constexpr):
    """Rows, columns and mask of this program's tile. One scalar division per program picks the tile."""
    pid = tl.program_id(0).to(tl.int64)
    col_tiles = tl.cdiv(D, BD)
    rows = (pid // col_tiles) * BT + tl.arange(0, BT)
    cols = (pid % col_tiles) * BD + tl.arange(0, BD)
    mask = (rows < M)[:, None] & (cols < D)[None, :]
    return rows, cols, mask


@triton.jit
def _swiglu_fwd_kernel(X, Y, Z, M, D, sx, sy, so, BT: tl.constexpr, BD: tl.constexpr):
    rows, cols, mask = _tile(M, D, BT, BD)
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + rows[:, None] * sy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = x * tl.sigmoid(x) * y
    tl.store(Z + rows[:, None] * so + cols[None, :], z.to(Z.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(X, Y, DZ, DX, DY, Z, M, D, sx, sy, sdz, so,
                       BT: tl.constexpr, BD: tl.constexpr, STORE_Z: tl.constexpr):
    rows, cols, mask = _tile(M, D, BT, BD)
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + rows[:, None] * sy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(DZ + rows[:, None] * sdz + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(x)
    silu = x * s
    out = rows[:, None] * so + cols[None, :]
    tl.store(DX + out, (dz * y * s * (1.0 + x * (1.0 - s))).to(DX.dtype.element_ty), mask=mask)
    tl.store(DY + out, (dz * silu).to(DY.dtype.element_ty), mask=mask)
    if STORE_Z:
        tl.store(Z + out, (silu * y).to(Z.dtype.element_ty), mask=mask)


@triton.jit
def _logsig_fwd_kernel(X, Y, M, D, sx, so, scale, BT: tl.constexpr, BD: tl.constexpr):
    rows, cols, mask = _tile(M, D, BT, BD)
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    t = tl.exp(-tl.abs(x))  # in (0, 1]: no overflow for any x
    # log1p(t) without a library log1p (the interpreter has none): log(u) * t / (u - 1) with u = 1 + t rounded
    # cancels the rounding of u (Goldberg); where u rounds to 1, log1p(t) = t to fp32 precision.
    u = 1.0 + t
    u_minus_1 = u - 1.0
    log1p_t = tl.where(u_minus_1 == 0.0, t, tl.log(u) * (t / tl.where(u_minus_1 == 0.0, 1.0, u_minus_1)))
    y = (tl.minimum(x, 0.0) - log1p_t) * scale
    tl.store(Y + rows[:, None] * so + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _logsig_bwd_kernel(X, DY, DX, M, D, sx, sdy, so, scale, BT: tl.constexpr, BD: tl.constexpr):
    rows, cols, mask = _tile(M, D, BT, BD)
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * sdy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    t = tl.exp(-tl.abs(x))
    sig_neg = tl.where(x >= 0, t, 1.0) / (1.0 + t)  # sigmoid(-x)
    tl.store(DX + rows[:, None] * so + cols[None, :], (dy * sig_neg * scale).to(DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------------------

def tile_config(m: int, d: int, packed: bool, backward: bool) -> tuple[int, int, int]:
    """(BT rows, BD columns, num_warps) for an [m, d] launch.

    packed (every operand contiguous, launched as one row of m*d elements): a 1 x TILE tile, masked only at the end.
    Row-strided: BD from _BD_CHOICES with the fewest padded columns (ties: the widest), or next_pow2(d) when d is
    narrower than 128; BT = TILE // BD rows (at least 1). num_warps: NUM_WARPS, fewer for small tiles (~512 elements
    per warp at least)."""
    tile = BWD_TILE if backward else FWD_TILE
    if packed:
        bt, bd = 1, min(tile, triton.next_power_of_2(max(1, m * d)))
    else:
        if d <= _BD_CHOICES[-1]:
            bd = triton.next_power_of_2(d)
        else:
            bd = min(_BD_CHOICES, key=lambda b: (triton.cdiv(d, b) * b, -b))
        bt = max(1, min(tile // bd, triton.next_power_of_2(m)))
    num_warps = max(1, min(NUM_WARPS, bt * bd // 512))
    return bt, bd, num_warps


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [M, D] with a contiguous last dimension: a view when the leading dims flatten to one row stride
    (including row-strided views of a wider tensor), a contiguous copy otherwise."""
    t2 = t.reshape(-1, t.shape[-1])
    if t2.stride(-1) != 1 and t2.shape[-1] > 1:
        t2 = t2.contiguous()
    return t2


def _launch(kernel, ins: list[torch.Tensor], outs: list[torch.Tensor | None], backward: bool, *extra,
            config: tuple[int, int, int] | None = None, **constexprs) -> None:
    """Run an elementwise kernel over [M, D] operands `ins` (row-strided) into [M, D] `outs` (None: not written; a
    placeholder pointer is passed), contiguous or row-strided with one row stride for all of them (e.g. the column
    blocks of one wider tensor). config overrides tile_config (bench sweeps)."""
    m, d = ins[0].shape
    if m * d == 0:
        return
    written = [o for o in outs if o is not None]
    out_stride = written[0].stride(0) if m > 1 else d
    if any(o.stride(-1) != 1 or (m > 1 and o.stride(0) != out_stride) for o in written):
        raise ValueError("swiglu kernels: the outputs must share one row stride and have contiguous rows")
    packed = all(t.is_contiguous() for t in ins + written)
    if packed:  # one row of m*d elements: row strides multiply row 0 only; 0 tells the compiler they are aligned
        m_, d_ = 1, m * d
        strides = [0] * (len(ins) + 1)
    else:
        m_, d_ = m, d
        strides = [t.stride(0) if m > 1 else d for t in ins] + [out_stride]  # the inputs', then the outputs'
    bt, bd, num_warps = config or tile_config(m_, d_, packed, backward)
    grid = (triton.cdiv(m_, bt) * triton.cdiv(d_, bd),)
    placeholder = next(o for o in outs if o is not None)
    kernel[grid](*ins, *(o if o is not None else placeholder for o in outs), m_, d_, *strides, *extra,
                 BT=bt, BD=bd, num_warps=num_warps, **constexprs)


def _use_kernel(x: torch.Tensor) -> bool:
    return kernels.runs_triton(x)


def swiglu_forward(x2: torch.Tensor, y2: torch.Tensor, config=None) -> torch.Tensor:
    """z = silu(x) * y for [M, D] operands (row-strided allowed); z contiguous, in x's dtype."""
    z = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    _launch(_swiglu_fwd_kernel, [x2, y2], [z], False, config=config)
    return z


def swiglu_backward(x2: torch.Tensor, y2: torch.Tensor, dz2: torch.Tensor, store_z: bool, config=None,
                    out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(dx, dy, z or None) from [M, D] x, y, dz (row-strided allowed); outputs contiguous, in x's dtype, or dx and dy
    written into `out` (two [M, D] tensors with one row stride, e.g. the column blocks of one [M, 2D] gradient; then
    store_z must be False)."""
    if out is not None and store_z:
        raise ValueError("swiglu_backward: store_z with out= is not supported")
    dx, dy = out if out is not None else (torch.empty(x2.shape, dtype=x2.dtype, device=x2.device) for _ in range(2))
    z = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device) if store_z else None
    _launch(_swiglu_bwd_kernel, [x2, y2, dz2], [dx, dy, z], True, config=config, STORE_Z=store_z)
    return dx, dy, z


def log_sigmoid_scaled_forward(x2: torch.Tensor, normalizer: float, config=None) -> torch.Tensor:
    y = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    _launch(_logsig_fwd_kernel, [x2], [y], False, 1.0 / normalizer, config=config)
    return y


def log_sigmoid_scaled_backward(x2: torch.Tensor, dy2: torch.Tensor, normalizer: float, config=None) -> torch.Tensor:
    dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    _launch(_logsig_bwd_kernel, [x2, dy2], [dx], True, 1.0 / normalizer, config=config)
    return dx


# ---------------------------------------------------------------------------------------------------------
# Autograd functions and the public entry points
# ---------------------------------------------------------------------------------------------------------

class _SwiGLULinearFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, y, weight, bias, keep_z):
        x2, y2 = _rows(x), _rows(y)
        z = swiglu_forward(x2, y2)
        out = F.linear(z, weight, bias)
        ctx.save_for_backward(x, y, weight, z if keep_z else None)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dout):
        x, y, weight, z = ctx.saved_tensors
        dout2 = dout.reshape(-1, dout.shape[-1])
        need_xy = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_w = ctx.needs_input_grad[2]
        x2, y2 = _rows(x), _rows(y)
        dx = dy = dweight = dbias = None
        if need_xy:
            dz = torch.mm(dout2, weight)
            dx, dy, z_again = swiglu_backward(x2, y2, dz, store_z=need_w and z is None)
            z = z if z is not None else z_again
            dx, dy = dx.view(x.shape), dy.view(y.shape)
        elif need_w and z is None:
            z = swiglu_forward(x2, y2)
        if need_w:
            dweight = torch.mm(dout2.t(), z)
        if ctx.needs_input_grad[3]:
            dbias = dout2.sum(0)
        return (dx if ctx.needs_input_grad[0] else None, dy if ctx.needs_input_grad[1] else None, dweight, dbias,
                None)


def stacked_weights(*weights: torch.Tensor) -> torch.Tensor:
    """[W1; W2; ...] as one [N1 + N2 + ..., K] matrix: a view where each weight's rows follow the previous one's in one
    storage (the bf16 training path keeps every bf16 weight in one flat buffer in parameter order, trainer/precision.py,
    so a block's MLP gate and up weights, and its attention's q, k, v, g and first gate projections, are adjacent
    there), else a concatenated copy."""
    a = weights[0]
    adjacent = a.dim() == 2 and a.is_contiguous()
    end = a.storage_offset() + a.numel()
    for b in weights[1:]:
        adjacent = (adjacent and b.dtype == a.dtype and b.device == a.device and b.dim() == 2
                    and b.shape[1] == a.shape[1] and b.is_contiguous()
                    and b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() and b.storage_offset() == end)
        end = b.storage_offset() + b.numel()
    if adjacent:
        return a.as_strided((sum(w.shape[0] for w in weights), a.shape[1]), (a.shape[1], 1))
    return torch.cat(weights, 0)


class _GateUpSwiGLUFunction(torch.autograd.Function):
    """z = silu(x @ Wg^T) * (x @ Wu^T) with the gate and up projections as ONE GEMM over [Wg; Wu] (`stacked_weights`):
    SwiGLU reads the two column blocks of its [M, 2N] output; backward writes dgate and dup as the column blocks of
    one [M, 2N] gradient, so that dx and d[Wg; Wu] are one GEMM each. Saved: x, the stacked weights, the GEMM output."""

    @staticmethod
    def forward(ctx, x, wg, wu):
        x2 = x.reshape(-1, x.shape[-1])
        w = stacked_weights(wg, wu)
        gu = torch.mm(x2, w.t())
        n = wg.shape[0]
        z = swiglu_forward(gu[:, :n], gu[:, n:])
        ctx.save_for_backward(x2, w, gu)
        ctx.x_shape = x.shape
        return z.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dz):
        x2, w, gu = ctx.saved_tensors
        n = gu.shape[1] // 2
        dgu = torch.empty_like(gu)
        swiglu_backward(gu[:, :n], gu[:, n:], _rows(dz), store_z=False, out=(dgu[:, :n], dgu[:, n:]))
        dx = torch.mm(dgu, w).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        dw = torch.mm(dgu.t(), x2) if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] else None
        return (dx, dw[:n] if ctx.needs_input_grad[1] else None, dw[n:] if ctx.needs_input_grad[2] else None)


class _LogSigmoidScaledFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, normalizer):
        ctx.save_for_backward(x)
        ctx.normalizer = normalizer
        return log_sigmoid_scaled_forward(_rows(x), normalizer).view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dx = log_sigmoid_scaled_backward(_rows(x), _rows(dy), ctx.normalizer)
        return dx.view(x.shape), None


def _check_swiglu(x, y, weight, bias) -> None:
    if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
        raise ValueError(f"swiglu_linear: x and y must share shape, dtype and device, got {tuple(x.shape)} {x.dtype} "
                         f"{x.device} and {tuple(y.shape)} {y.dtype} {y.device}")
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"swiglu_linear: weight must be [out_features, {x.shape[-1] if x.dim() else '?'}] for x of "
                         f"shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"swiglu_linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def swiglu_linear(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None, keep_z: bool = False) -> torch.Tensor:
    """(silu(x) * y) @ weight^T + bias, as FLA's `fla.modules.activations.swiglu_linear`. x, y: [..., D] of one dtype;
    weight: [O, D] and bias: [O] of that dtype (F.linear's rule). On CUDA (or under the Triton interpreter) the Triton
    kernels run; a CPU tensor otherwise takes `swiglu_linear_reference`. keep_z: save z = silu(x) * y from the
    forward for the weight gradient instead of writing it again in backward (one [M, D] tensor more held per call
    until backward, one [M, D] write less)."""
    _check_swiglu(x, y, weight, bias)
    if not _use_kernel(x):
        return swiglu_linear_reference(x, y, weight, bias)
    return _SwiGLULinearFunction.apply(x, y, weight, bias, keep_z)


def swiglu_linear_reference(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch with autograd: silu(x) * y in fp32, rounded to x's dtype once, then F.linear."""
    _check_swiglu(x, y, weight, bias)
    z = (F.silu(x.float()) * y.float()).to(x.dtype)
    return F.linear(z, weight, bias)


def gate_up_swiglu(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate_weight^T) * (x @ up_weight^T): an MLP's gate and up projections as one GEMM, then SwiGLU
    (`_GateUpSwiGLUFunction`). x: [..., D]; the weights: [N, D], x's dtype, no bias. A CPU tensor without the Triton
    interpreter takes `gate_up_swiglu_reference`."""
    if gate_weight.shape != up_weight.shape or gate_weight.shape[-1] != x.shape[-1]:
        raise ValueError(f"gate_up_swiglu: gate weight {tuple(gate_weight.shape)} and up weight "
                         f"{tuple(up_weight.shape)} must both be [N, {x.shape[-1]}] for x of shape {tuple(x.shape)}")
    if not (x.dtype == gate_weight.dtype == up_weight.dtype):
        raise TypeError(f"gate_up_swiglu: x and the weights must have one dtype, got {x.dtype}, {gate_weight.dtype} "
                        f"and {up_weight.dtype}")
    if not _use_kernel(x):
        return gate_up_swiglu_reference(x, gate_weight, up_weight)
    return _GateUpSwiGLUFunction.apply(x, gate_weight, up_weight)


def gate_up_swiglu_reference(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch with autograd, rounding where the kernels round: gate and up to x's dtype, then z."""
    gate, up = F.linear(x, gate_weight), F.linear(x, up_weight)
    return (F.silu(gate.float()) * up.float()).to(x.dtype)


def _check_normalizer(normalizer) -> float:
    n = float(normalizer)
    if n == 0 or not math.isfinite(n):
        raise ValueError(f"log_sigmoid_scaled: normalizer must be finite and non-zero, got {normalizer!r}")
    return n


def log_sigmoid_scaled(x: torch.Tensor, normalizer: float) -> torch.Tensor:
    """logsigmoid(x) / normalizer (GLA's gate_logit_normalizer), stable for any |x|; output in x's dtype. On CUDA (or
    under the Triton interpreter) one Triton kernel forward and one backward; a CPU tensor otherwise takes
    `log_sigmoid_scaled_reference`."""
    n = _check_normalizer(normalizer)
    if not x.is_floating_point():
        raise TypeError(f"log_sigmoid_scaled: x must be floating point, got {x.dtype}")
    if not _use_kernel(x):
        return log_sigmoid_scaled_reference(x, n)
    return _LogSigmoidScaledFunction.apply(x, n)


def log_sigmoid_scaled_reference(x: torch.Tensor, normalizer: float) -> torch.Tensor:
    """Plain PyTorch with autograd, fp32 math, rounded to x's dtype once."""
    return (F.logsigmoid(x.float()) / _check_normalizer(normalizer)).to(x.dtype)
