"""The MLP's SwiGLU inside its GEMMs (issue 10): the gate and up projections with SwiGLU in their epilogue, and the
down projection's input gradient with SwiGLU's backward in its epilogue. `models/fused.py` runs it only with
`install(mlp="gemm")`: timed on an H200 (2026-12-07, BENCHMARKS.md), one program per tile, its best launches ran
0.87x (forward) and 0.82x (backward) the speed of cuBLAS + the SwiGLU kernels, Triton's tile loop at 485 TFLOP/s
against cuBLAS's 718, and the trainer 0.985x. The persistent launches (`GemmConfig.persistent`, H100, same day) did
not close that gap: the backward tied the unfused path (0.999x), the forward stayed at 0.85x. Kept, off, for a
Triton whose Hopper GEMMs come nearer cuBLAS (warp specialization) and for cards where they already do.

Why. The fused path's MLP (models/fused.py `_mlp`) is two cuBLAS GEMMs x @ Wg^T, x @ Wu^T, then
models/kernels/swiglu.py's kernel z = silu(gate) * up, then z @ Wd^T; backward dz = dout @ Wd (cuBLAS), then a kernel
reading gate, up, dz and writing dgate, dup. Those two elementwise kernels run near the memory bound and are most of
the step's SwiGLU time (~10 ms of ~170 on an H200 for GLA 340M at batch 16): per layer the forward reads gate and
up again (2 x [32768, 2816] bf16, 369 MB) right after the GEMMs wrote them, and the backward writes dz and reads it
back (another 369 MB). Here

  * `gate_up_swiglu(x, wg, wu)`: one kernel computes a [BM, BN] tile of x @ wg^T AND of x @ wu^T (two accumulators,
    each tile of x loaded once for both), rounds them to the output dtype, stores gate and up (the backward needs
    them) and z = silu(gate) * up computed from those rounded values, as the separate kernel would from memory.
  * `down_grad_swiglu(dout, wd, gate, up)`: one kernel computes a tile of dz = dout @ wd, rounds it to the output
    dtype (as cuBLAS's bf16 output would be) and writes dgate = dz * up * s * (1 + gate * (1 - s)) and
    dup = dz * gate * s (s = sigmoid(gate)), optionally z again; dz itself never reaches memory.

What it costs: these GEMMs are Triton's, not cuBLAS's; they win only if Triton's tile loop is within a few percent
of cuBLAS at these shapes (M = 32768 tokens, K = 1024, N = 2816). `_gpu_check()` measures exactly that, per launch
(`GemmConfig`: tile sizes, warps, stages, TMA descriptors or pointer loads).

The math is swiglu.py's, in fp32 from the rounded bf16 operands; the GEMMs' sums run in another order than cuBLAS's,
so gate and up differ from the unfused path's in the last bit of a few elements, and everything after follows.
Runs under the Triton interpreter on CPU (tests/test_mlp_gemm.py), with pointer loads (`GemmConfig.tma=False`) and
with TMA descriptors where the interpreter supports them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["GemmConfig", "CONFIG", "gate_up_swiglu", "down_grad_swiglu", "mlp", "mlp_reference"]


@dataclass(frozen=True)
class GemmConfig:
    """A launch: BM x BN output tiles (BN per accumulator: the forward's two accumulators are 2 x [BM, BN]), BK
    deep steps over K, programs ordered in groups of GROUP_M row tiles (so a group's column tiles share its rows of
    the first operand in L2), warps, pipeline stages, and TMA descriptors (Hopper and later) or masked pointer
    loads (any GPU, the interpreter). persistent (TMA only): 0, one program per output tile; 1, one program per SM
    that walks tiles NUM_SMS apart in one flattened loop (so the pipeline fetches the next tile's operands while the
    epilogue of this one runs) and stores through TMA descriptors; 2, as 1, and the backward's epilogue operands
    (gate, up) are fetched before the tile's K loop instead of after it; 3, as 1 without flattening the loops."""
    bm: int = 128
    bn: int = 128
    bk: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    tma: bool = True
    persistent: int = 0

    @property
    def text(self) -> str:
        """The launch as config_from_text reads it."""
        return (f"{self.bm},{self.bn},{self.bk},{self.group_m},{self.num_warps},{self.num_stages},{int(self.tma)},"
                f"{self.persistent}")


def config_from_text(text: str) -> GemmConfig:
    """"BM,BN,BK,GROUP_M,WARPS,STAGES,TMA[,PERSISTENT]" (TMA 0 or 1, PERSISTENT 0 to 3), as `_gpu_check` prints a
    launch, -> GemmConfig."""
    try:
        values = [int(v) for v in text.split(",")]
        if len(values) not in (7, 8) or values[6] not in (0, 1) or (len(values) == 8 and values[7] not in (0, 1, 2, 3)):
            raise ValueError
    except ValueError:
        raise ValueError(f"launch {text!r}: use BM,BN,BK,GROUP_M,WARPS,STAGES,TMA[,PERSISTENT] (TMA 0/1, PERSISTENT "
                         f"0-3), e.g. 128,128,64,8,8,3,1,0") from None
    bm, bn, bk, group_m, warps, stages, tma = values[:7]
    return GemmConfig(bm, bn, bk, group_m, warps, stages, bool(tma), values[7] if len(values) == 8 else 0)


# "fused": the forward through gate_up_swiglu; "cublas": the forward as the unfused path runs it (two cuBLAS GEMMs, then
# models/kernels/swiglu.py's kernel) and only the backward fused (for a Triton GEMM that wins backward only)
FORWARD = os.environ.get("MLP_GEMM_FORWARD") or "fused"
if FORWARD not in ("fused", "cublas"):
    raise ValueError(f"MLP_GEMM_FORWARD={FORWARD!r}: use fused or cublas")
# The tile Triton's own Hopper matmul examples use for bf16 (0.798 ms forward on an H200; the sweep's best one
# program per tile launch, 128,128,64,8,8,4, took 0.779 ms). _gpu_check() sweeps the alternatives; a benchmark can
# launch another way through MLP_GEMM_FWD / MLP_GEMM_BWD (config_from_text) without editing this file.
CONFIG = config_from_text(os.environ.get("MLP_GEMM_FWD") or "128,128,64,8,8,3,1,0")
BWD_CONFIG = config_from_text(os.environ.get("MLP_GEMM_BWD") or "128,128,64,8,8,3,1,0")


@triton.jit
def _tile_of_program(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(first row, first column) of this program's output tile, row tiles taken GROUP_M at a time."""
    return _tile(tl.program_id(0), M, N, BM, BN, GROUP_M)


@triton.jit
def _tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(first row, first column) of output tile number `pid`, row tiles taken GROUP_M at a time."""
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    return pid_m * BM, pid_n * BN


@triton.jit
def _gemm_gate_up_swiglu_kernel(X, WG, WU, G, U, Z, M, N, K, sx, sw, so,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    TMA: tl.constexpr, STORE_GU: tl.constexpr, IEEE: tl.constexpr):
    off_m, off_n = _tile_of_program(M, N, BM, BN, GROUP_M)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    rm = off_m + tl.arange(0, BM)
    rn = off_n + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    for k in range(0, K, BK):
        if TMA:  # out-of-bounds rows and columns of a descriptor's block read as 0
            a = X.load([off_m, k])
            bg = WG.load([off_n, k])
            bu = WU.load([off_n, k])
        else:
            kmask = (k + rk) < K
            a = tl.load(X + rm[:, None].to(tl.int64) * sx + (k + rk)[None, :],
                        mask=(rm < M)[:, None] & kmask[None, :], other=0.0)
            wmask = (rn < N)[:, None] & kmask[None, :]
            bg = tl.load(WG + rn[:, None] * sw + (k + rk)[None, :], mask=wmask, other=0.0)
            bu = tl.load(WU + rn[:, None] * sw + (k + rk)[None, :], mask=wmask, other=0.0)
        if IEEE:  # fp32 operands: full fp32 products, as cuBLAS without TF32
            acc_g = tl.dot(a, tl.trans(bg), acc_g, input_precision="ieee")
            acc_u = tl.dot(a, tl.trans(bu), acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, tl.trans(bg), acc_g)
            acc_u = tl.dot(a, tl.trans(bu), acc_u)
    g = acc_g.to(Z.dtype.element_ty)
    u = acc_u.to(Z.dtype.element_ty)
    gf = g.to(tl.float32)
    z = gf * tl.sigmoid(gf) * u.to(tl.float32)
    out = rm[:, None].to(tl.int64) * so + rn[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if STORE_GU:
        tl.store(G + out, g, mask=mask)
        tl.store(U + out, u, mask=mask)
    tl.store(Z + out, z.to(Z.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_down_grad_swiglu_kernel(DO, WD, G, U, DG, DU, Z, M, N, K, sdo, swd, so,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                      TMA: tl.constexpr, STORE_Z: tl.constexpr, IEEE: tl.constexpr):
    off_m, off_n = _tile_of_program(M, N, BM, BN, GROUP_M)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    rm = off_m + tl.arange(0, BM)
    rn = off_n + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    for k in range(0, K, BK):
        if TMA:
            a = DO.load([off_m, k])
            b = WD.load([k, off_n])
        else:
            kmask = (k + rk) < K
            a = tl.load(DO + rm[:, None].to(tl.int64) * sdo + (k + rk)[None, :],
                        mask=(rm < M)[:, None] & kmask[None, :], other=0.0)
            b = tl.load(WD + (k + rk)[:, None] * swd + rn[None, :], mask=kmask[:, None] & (rn < N)[None, :],
                        other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    dz = acc.to(DG.dtype.element_ty).to(tl.float32)  # dz rounded as the unfused GEMM's output would be
    out = rm[:, None].to(tl.int64) * so + rn[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    x = tl.load(G + out, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(U + out, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(x)
    silu = x * s
    tl.store(DG + out, (dz * y * s * (1.0 + x * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + out, (dz * silu).to(DU.dtype.element_ty), mask=mask)
    if STORE_Z:
        tl.store(Z + out, (silu * y).to(Z.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_gate_up_swiglu_persistent_kernel(X, WG, WU, G, U, Z, M, N, K,
                                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                                           GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr, STORE_GU: tl.constexpr,
                                           IEEE: tl.constexpr, FLATTEN: tl.constexpr = True):
    """_gemm_gate_up_swiglu_kernel with every operand a TMA descriptor, one program walking tiles PROGRAMS apart."""
    tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=FLATTEN):
        off_m, off_n = _tile(tile, M, N, BM, BN, GROUP_M)
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            a = X.load([off_m, k])
            if IEEE:
                acc_g = tl.dot(a, tl.trans(WG.load([off_n, k])), acc_g, input_precision="ieee")
                acc_u = tl.dot(a, tl.trans(WU.load([off_n, k])), acc_u, input_precision="ieee")
            else:
                acc_g = tl.dot(a, tl.trans(WG.load([off_n, k])), acc_g)
                acc_u = tl.dot(a, tl.trans(WU.load([off_n, k])), acc_u)
        g = acc_g.to(Z.dtype)
        u = acc_u.to(Z.dtype)
        gf = g.to(tl.float32)
        if STORE_GU:
            G.store([off_m, off_n], g)
            U.store([off_m, off_n], u)
        Z.store([off_m, off_n], (gf * tl.sigmoid(gf) * u.to(tl.float32)).to(Z.dtype))


@triton.jit
def _gemm_down_grad_swiglu_persistent_kernel(DO, WD, G, U, DG, DU, Z, M, N, K,
                                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                                             GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr, STORE_Z: tl.constexpr,
                                             EARLY_GU: tl.constexpr, IEEE: tl.constexpr, FLATTEN: tl.constexpr = True):
    """_gemm_down_grad_swiglu_kernel with every operand a TMA descriptor, one program walking tiles PROGRAMS apart;
    EARLY_GU: the tile's gate and up are fetched before its K loop (their latency hidden behind it, held in
    registers through it)."""
    tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=FLATTEN):
        off_m, off_n = _tile(tile, M, N, BM, BN, GROUP_M)
        if EARLY_GU:
            xg = G.load([off_m, off_n])
            yu = U.load([off_m, off_n])
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            if IEEE:
                acc = tl.dot(DO.load([off_m, k]), WD.load([k, off_n]), acc, input_precision="ieee")
            else:
                acc = tl.dot(DO.load([off_m, k]), WD.load([k, off_n]), acc)
        if not EARLY_GU:
            xg = G.load([off_m, off_n])
            yu = U.load([off_m, off_n])
        dz = acc.to(DG.dtype).to(tl.float32)
        x = xg.to(tl.float32)
        y = yu.to(tl.float32)
        s = tl.sigmoid(x)
        silu = x * s
        DG.store([off_m, off_n], (dz * y * s * (1.0 + x * (1.0 - s))).to(DG.dtype))
        DU.store([off_m, off_n], (dz * silu).to(DU.dtype))
        if STORE_Z:
            Z.store([off_m, off_n], (silu * y).to(Z.dtype))


def _programs(device: torch.device, m: int, n: int, config: GemmConfig) -> int:
    """Persistent launches: one program per SM, at most one per output tile (4 under the interpreter, so its tests
    walk several tiles each)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(sms, _grid(m, n, config)[0]))


def _descriptor(t: torch.Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def _grid(m: int, n: int, config: GemmConfig) -> tuple[int]:
    return (triton.cdiv(m, config.bm) * triton.cdiv(n, config.bn),)


def _tma_available(device: torch.device) -> bool:
    """TMA descriptors: Hopper (sm_90) or later, a triton that has host-side descriptors; the interpreter too."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def _tma_ok(*ts: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides, and a unit last stride."""
    return _tma_available(ts[0].device) and all(t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in ts)


def gate_up_swiglu(x2: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, config: GemmConfig | None = None,
                   store_gu: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """x2 [M, K], wg and wu [N, K] (nn.Linear weights) -> (gate, up, z), each [M, N] contiguous in x2's dtype:
    gate = x2 @ wg^T, up = x2 @ wu^T, z = silu(gate) * up. store_gu=False: gate and up are not written (None)."""
    config = config or CONFIG
    (m, k), n = x2.shape, wg.shape[0]
    x2, wg, wu = (t if t.stride(-1) == 1 else t.contiguous() for t in (x2, wg, wu))
    z = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    g = torch.empty_like(z) if store_gu else None
    u = torch.empty_like(z) if store_gu else None
    if m == 0 or n == 0:
        return g, u, z
    tma = config.tma and _tma_ok(x2, wg, wu)
    if tma and config.persistent:
        outs = [_descriptor(t, [config.bm, config.bn]) for t in ((g, u, z) if store_gu else (z, z, z))]
        programs = _programs(x2.device, m, n, config)
        _gemm_gate_up_swiglu_persistent_kernel[(programs,)](
            _descriptor(x2, [config.bm, config.bk]), _descriptor(wg, [config.bn, config.bk]),
            _descriptor(wu, [config.bn, config.bk]), *outs, m, n, k, BM=config.bm, BN=config.bn, BK=config.bk,
            GROUP_M=config.group_m, PROGRAMS=programs, STORE_GU=store_gu, IEEE=x2.dtype == torch.float32,
            FLATTEN=config.persistent != 3, num_warps=config.num_warps, num_stages=config.num_stages)
        return g, u, z
    if tma:
        args = (_descriptor(x2, [config.bm, config.bk]), _descriptor(wg, [config.bn, config.bk]),
                _descriptor(wu, [config.bn, config.bk]))
    else:
        args = (x2, wg, wu)
    _gemm_gate_up_swiglu_kernel[_grid(m, n, config)](
        *args, g if store_gu else z, u if store_gu else z, z, m, n, k, x2.stride(0), wg.stride(0), n,
        BM=config.bm, BN=config.bn, BK=config.bk, GROUP_M=config.group_m, TMA=tma, STORE_GU=store_gu, IEEE=x2.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return g, u, z


def down_grad_swiglu(dout2: torch.Tensor, wd: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                     store_z: bool = False, config: GemmConfig | None = None):
    """dout2 [M, O], wd [O, N] (the down projection's nn.Linear weight), gate and up [M, N] contiguous ->
    (dgate, dup, z or None): dz = dout2 @ wd rounded to the dtype, dgate = dz * up * s * (1 + gate * (1 - s)),
    dup = dz * gate * s, z = gate * s * up (s = sigmoid(gate))."""
    config = config or BWD_CONFIG
    (m, k), n = dout2.shape, wd.shape[1]
    dout2, wd = (t if t.stride(-1) == 1 else t.contiguous() for t in (dout2, wd))
    gate, up = gate.contiguous(), up.contiguous()
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    z = torch.empty_like(gate) if store_z else None
    if m == 0 or n == 0:
        return dg, du, z
    tma = config.tma and _tma_ok(dout2, wd)
    if tma and config.persistent and _tma_ok(gate, up):
        tile = [config.bm, config.bn]
        outs = [_descriptor(t, tile) for t in (dg, du, z if store_z else dg)]
        programs = _programs(dout2.device, m, n, config)
        _gemm_down_grad_swiglu_persistent_kernel[(programs,)](
            _descriptor(dout2, [config.bm, config.bk]), _descriptor(wd, [config.bk, config.bn]),
            _descriptor(gate, tile), _descriptor(up, tile), *outs, m, n, k, BM=config.bm, BN=config.bn,
            BK=config.bk, GROUP_M=config.group_m, PROGRAMS=programs, STORE_Z=store_z, EARLY_GU=config.persistent == 2,
            IEEE=dout2.dtype == torch.float32, FLATTEN=config.persistent != 3, num_warps=config.num_warps,
            num_stages=config.num_stages)
        return dg, du, z
    args = ((_descriptor(dout2, [config.bm, config.bk]), _descriptor(wd, [config.bk, config.bn])) if tma
            else (dout2, wd))
    _gemm_down_grad_swiglu_kernel[_grid(m, n, config)](
        *args, gate, up, dg, du, z if store_z else dg, m, n, k, dout2.stride(0), wd.stride(0), n,
        BM=config.bm, BN=config.bn, BK=config.bk, GROUP_M=config.group_m, TMA=tma, STORE_Z=store_z, IEEE=dout2.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return dg, du, z


class _MLPFunction(torch.autograd.Function):
    """down(silu(x @ wg^T) * (x @ wu^T)) + bias with the two kernels above. Saves x, the weights, gate, up (and z with
    keep_z): what the unfused path's shared_linear and swiglu_linear save together."""

    @staticmethod
    def forward(ctx, x, wg, wu, wd, bias, keep_z):
        x2 = x.reshape(-1, x.shape[-1])
        if FORWARD == "cublas":
            from models.kernels import swiglu
            g, u = F.linear(x2, wg), F.linear(x2, wu)
            z = swiglu.swiglu_forward(g, u)
        else:
            g, u, z = gate_up_swiglu(x2, wg, wu)
        out = F.linear(z, wd, bias)
        ctx.save_for_backward(x, wg, wu, wd, g, u, z if keep_z else None)
        return out.view(*x.shape[:-1], wd.shape[0])

    @staticmethod
    def backward(ctx, dout):
        x, wg, wu, wd, g, u, z = ctx.saved_tensors
        need = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        dout2 = dout.reshape(-1, dout.shape[-1])
        dg, du, z_again = down_grad_swiglu(dout2, wd, g, u, store_z=need[3] and z is None)
        z = z if z is not None else z_again
        dx = None
        if need[0]:
            dx = torch.mm(dg, wg).addmm_(du, wu).view_as(x)
        return (dx, torch.mm(dg.t(), x2) if need[1] else None, torch.mm(du.t(), x2) if need[2] else None,
                torch.mm(dout2.t(), z) if need[3] else None, dout2.sum(0) if need[4] else None, None)


def _check(x, wg, wu, wd, bias) -> None:
    d = x.shape[-1] if x.dim() else None
    if x.dim() < 1 or wg.dim() != 2 or wg.shape != wu.shape or wg.shape[1] != d:
        raise ValueError(f"mlp: wg and wu must both be [intermediate, {d}] for x of shape {tuple(x.shape)}, got "
                         f"{tuple(wg.shape)} and {tuple(wu.shape)}")
    if wd.dim() != 2 or wd.shape[1] != wg.shape[0]:
        raise ValueError(f"mlp: wd must be [out, {wg.shape[0]}], got {tuple(wd.shape)}")
    if bias is not None and bias.shape != (wd.shape[0],):
        raise ValueError(f"mlp: bias must have shape ({wd.shape[0]},), got {tuple(bias.shape)}")
    if len({t.dtype for t in (x, wg, wu, wd)}) != 1:
        raise ValueError(f"mlp: x and the weights must share one dtype, got {x.dtype}, {wg.dtype}, {wu.dtype}, "
                         f"{wd.dtype}")


def mlp(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, bias: torch.Tensor | None = None,
        keep_z: bool = False) -> torch.Tensor:
    """FLA's GatedMLP with swish: (silu(x @ wg^T) * (x @ wu^T)) @ wd^T + bias, with autograd. keep_z: save z for the
    down projection's weight gradient (one [tokens, intermediate] tensor more held until backward) instead of
    writing it again in the backward's epilogue."""
    _check(x, wg, wu, wd, bias)
    return _MLPFunction.apply(x, wg, wu, wd, bias, keep_z)


def mlp_reference(x, wg, wu, wd, bias=None) -> torch.Tensor:
    """Plain PyTorch with autograd, rounding where the kernels round: gate and up to x's dtype, then z."""
    gate, up = F.linear(x, wg), F.linear(x, wu)
    z = (F.silu(gate.float()) * up.float()).to(x.dtype)
    return F.linear(z, wd, bias)


def _gpu_check(m: int = 32768, d: int = 1024, n: int = 2816, iters: int = 20, sweep: bool = True) -> None:
    """On a GPU, GLA 340M's MLP shapes: each kernel against what it replaces (cuBLAS GEMMs + models/kernels/swiglu.py's
    kernel), timed with CUDA events (median of `iters`), values compared, then a sweep of launches. Prints one line
    per case and one JSON line per launch."""
    import json

    from models.kernels import swiglu
    from models.kernels.gla_intra import _median_ms
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(m, d, device=dev, dtype=dt)
    wg, wu = (torch.randn(n, d, device=dev, dtype=dt) * d ** -0.5 for _ in range(2))
    wd = torch.randn(d, n, device=dev, dtype=dt) * n ** -0.5
    dout = torch.randn(m, d, device=dev, dtype=dt) * 1e-2
    flop_fwd, flop_bwd = 2 * 2 * m * d * n, 2 * m * d * n

    def unfused_fwd():
        g, u = x @ wg.t(), x @ wu.t()
        return g, u, swiglu.swiglu_forward(g, u)

    g_ref, u_ref, z_ref = unfused_fwd()

    def unfused_bwd():
        return swiglu.swiglu_backward(g_ref, u_ref, dout @ wd, store_z=False)

    dg_ref, du_ref, _ = unfused_bwd()
    t_fwd = _median_ms(unfused_fwd, iters, dev)
    t_gemm2 = _median_ms(lambda: (x @ wg.t(), x @ wu.t()), iters, dev)
    t_bwd = _median_ms(unfused_bwd, iters, dev)
    t_gemm1 = _median_ms(lambda: dout @ wd, iters, dev)
    print(f"cuBLAS + swiglu kernel: forward {t_fwd:.3f} ms (GEMMs alone {t_gemm2:.3f} ms, "
          f"{flop_fwd / t_gemm2 / 1e9:.0f} TFLOP/s); backward dz GEMM + kernel {t_bwd:.3f} ms (GEMM alone "
          f"{t_gemm1:.3f} ms, {flop_bwd / t_gemm1 / 1e9:.0f} TFLOP/s)", flush=True)

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

    configs = [CONFIG]
    if sweep:
        # 2026-12-07: one program per tile, best 128,128,64,8,8,4 forward (H200 0.779 ms, 0.87x the unfused path) and
        # 128,64,64,8,8,4 backward (0.603 ms, 0.82x); persistent, best backward 128,128,64,8,8,4 (H100 0.999x), no
        # forward above 0.85x (BENCHMARKS.md)
        for bm, bn, bk, w, s, p in [(128, 128, 64, 8, 4, 0), (128, 64, 64, 8, 4, 0),
                                    (128, 128, 64, 8, 3, 1), (128, 128, 64, 8, 2, 1), (128, 128, 64, 8, 4, 1),
                                    (128, 64, 64, 8, 4, 1), (128, 64, 64, 4, 4, 1), (128, 64, 64, 8, 6, 1),
                                    (128, 256, 64, 8, 3, 1), (128, 128, 64, 8, 3, 2), (128, 64, 64, 8, 4, 2),
                                    (128, 128, 128, 8, 2, 1), (64, 128, 64, 4, 4, 1), (128, 128, 64, 8, 3, 3),
                                    (128, 64, 64, 8, 4, 3)]:
            configs.append(GemmConfig(bm, bn, bk, 8, w, s, True, p))
    for c in configs:
        row = {"config": c.__dict__, "text": c.text}
        try:
            g, u, z = gate_up_swiglu(x, wg, wu, config=c)
            tf = _median_ms(lambda: gate_up_swiglu(x, wg, wu, config=c), iters, dev)
            row.update(fwd_ms=round(tf, 4), fwd_vs_unfused=round(t_fwd / tf, 3),
                       fwd_tflops=round(flop_fwd / tf / 1e9), gate_diff=rel(g, g_ref), z_diff=rel(z, z_ref))
        except Exception as e:  # a launch that does not compile (shared memory, registers) is reported, not fatal
            row["fwd_error"] = f"{type(e).__name__}: {str(e)[:160]}"
        try:
            dg, du, _ = down_grad_swiglu(dout, wd, g_ref, u_ref, config=c)
            tb = _median_ms(lambda: down_grad_swiglu(dout, wd, g_ref, u_ref, config=c), iters, dev)
            row.update(bwd_ms=round(tb, 4), bwd_vs_unfused=round(t_bwd / tb, 3),
                       bwd_tflops=round(flop_bwd / tb / 1e9), dgate_diff=rel(dg, dg_ref), dup_diff=rel(du, du_ref))
        except Exception as e:
            row["bwd_error"] = f"{type(e).__name__}: {str(e)[:160]}"
        print("MLPGEMM " + json.dumps(row), flush=True)


if __name__ == "__main__":
    _gpu_check()
