"""models/kernels/gla_intra.py under the Triton interpreter: FLA's chunk_gla_bwd_dqk_intra with the diagonal blocks as
products. Same values as FLA's kernel within fp32 rounding (equal lengths, cu_seqlens, T < 64, partial K blocks,
chunk 32), error against float64 no worse than FLA's, extreme gates with both paths and no NaN or inf where FLA's
result is finite, and bad shapes named.

Inputs are fp32 (tight comparisons); neither kernel dots bf16 operands (both cast to fp32 first), and the bf16 test
compares values too, loosely.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see models/cpu_triton.py)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import cpu_triton  # noqa: E402

cpu_triton.enable()

from tests.gla_intra_common import EPS, extreme_x, overflow_ok, slow  # noqa: E402

from fla.ops.gla.chunk import chunk_gla_bwd_dqk_intra as flas  # noqa: E402
from fla.ops.utils.constant import RCP_LN2  # noqa: E402
from fla.ops.utils.cumsum import chunk_local_cumsum  # noqa: E402

from models.kernels import gla_intra  # noqa: E402

def inputs(B, T, H, K, chunk_size=64, cu_seqlens=None, x=None, seed=0, dtype=torch.float32):
    """q, k, dA random; g the chunk-local log2 cumsum of logsigmoid(x) / 16 (x random unless given)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen).to(dtype) for _ in range(2))
    x = torch.randn(B, T, H, K, generator=gen) if x is None else x
    g = chunk_local_cumsum(F.logsigmoid(x) / 16, chunk_size, scale=RCP_LN2, cu_seqlens=cu_seqlens)
    dA = torch.randn(B, T, H, chunk_size, generator=gen)
    return q, k, g, dA


def ours(q, k, g, dA, cu_seqlens=None, chunk_size=64, config=None):
    """(dq, dk, path) with the path each program took (1 fast, 0 FLA's loop, -1 no rows)."""
    return gla_intra._launch(q, k, g, dA, cu_seqlens, chunk_size, None, config or gla_intra.CONFIG, True)


def expected_path(g, BK, chunk_size=64, BC=16):
    """The path the module doc's rule gives, from g alone (q, k, dA here are far below MAG_BOUND)."""
    B, T, H, K = g.shape
    NT, NC, NK = -(-T // chunk_size), chunk_size // BC, -(-K // BK)
    path = torch.full((B * H, NT * NK * NC), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            for i_t in range(NT):
                for i_k in range(NK):
                    for i_i in range(NC):
                        s = i_t * chunk_size + i_i * BC
                        if s < T:
                            tile = g[b, s:min(s + BC, T), h, i_k * BK:(i_k + 1) * BK]
                            spread = (tile.max(0).values - tile.min(0).values).max()
                            path[b * H + h, (i_t * NK + i_k) * NC + i_i] = int(spread <= gla_intra.RANGE_BOUND)
    return path


def assert_close_to_flas(got, want, rel=1e-5):
    for name, a, b in zip(("dq", "dk"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        finite = b.isfinite()
        assert a[finite].isfinite().all(), f"{name}: non-finite where FLA's is finite"
        scale = b[finite].abs().max().item()
        diff = (a[finite] - b[finite]).abs().max().item()
        assert diff <= rel * scale, f"{name}: max |ours - FLA's| {diff:.3g}, max |FLA's| {scale:.3g}"


def assert_error_no_worse(got, want, ref):
    """Max error against float64 at most 2x FLA's plus 4 fp32 ulps of the largest value."""
    for name, a, b, r in zip(("dq", "dk"), got, want, ref):
        scale = r.abs().max().item()
        err_ours, err_flas = ((t.double() - r).abs().max().item() for t in (a, b))
        assert err_ours <= 2 * err_flas + 4 * EPS * scale, \
            f"{name}: error vs float64 {err_ours:.3g}, FLA's {err_flas:.3g}, max |ref| {scale:.3g}"


CASES = {  # shape (B, T, H, K), cu_seqlens, chunk_size, config
    "batch": ((2, 100, 2, 32), None, 64, None),
    "T<64": ((1, 40, 2, 16), None, 64, None),
    "cu_seqlens": ((1, 150, 2, 32), [0, 37, 90, 150], 64, None),
    "K48_BK32": ((1, 70, 1, 48), None, 64, gla_intra.LaunchConfig(BK=32, diag_precision="tf32x3")),
    "chunk32": ((1, 50, 1, 16), [0, 21, 50], 32, None),
}


@slow
@pytest.mark.parametrize("case", CASES)
def test_matches_flas_kernel_and_float64(case):
    shape, cu, chunk_size, config = CASES[case]
    cu = torch.tensor(cu) if cu is not None else None
    q, k, g, dA = inputs(*shape, chunk_size=chunk_size, cu_seqlens=cu)
    *got, path = ours(q, k, g, dA, cu, chunk_size, config)
    want = flas(q, k, g, dA, cu_seqlens=cu, chunk_size=chunk_size)
    assert_close_to_flas(got, want)
    assert_error_no_worse(got, want, gla_intra.reference_dqk_intra(q, k, g, dA, cu, chunk_size))
    assert (path != 0).all() and (path == 1).any()  # well-conditioned gates: the fast path everywhere
    public = gla_intra.chunk_gla_bwd_dqk_intra(q, k, g, dA, cu_seqlens=cu, chunk_size=chunk_size, config=config)
    assert all(torch.equal(a, b) for a, b in zip(public, got))


@slow
def test_given_chunk_indices_are_used():
    from fla.ops.utils import prepare_chunk_indices
    cu = torch.tensor([0, 37, 90])
    q, k, g, dA = inputs(1, 90, 1, 16, cu_seqlens=cu)
    a = gla_intra.chunk_gla_bwd_dqk_intra(q, k, g, dA, cu, 64, prepare_chunk_indices(cu, 64))
    b = gla_intra.chunk_gla_bwd_dqk_intra(q, k, g, dA, cu, 64)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@slow
def test_large_gate_range_within_the_bound_keeps_flas_precision():
    """Sub-chunks spanning up to ~30 log2 units of decay on half the channels: still the fast path."""
    x = torch.randn(1, 64, 2, 32, generator=torch.Generator().manual_seed(3))
    x[..., 16:] = -21 - torch.rand(1, 64, 2, 16, generator=torch.Generator().manual_seed(4))  # ~-1.9 log2 a step
    q, k, g, dA = inputs(1, 64, 2, 32, x=x)
    *got, path = ours(q, k, g, dA)
    spread = max((g[0, s:s + 16].amax(0) - g[0, s:s + 16].amin(0)).max().item() for s in range(0, 64, 16))
    assert 20 < spread <= gla_intra.RANGE_BOUND and (path == 1).all()
    want = flas(q, k, g, dA)
    assert_close_to_flas(got, want)
    assert_error_no_worse(got, want, gla_intra.reference_dqk_intra(q, k, g, dA))


@slow
@overflow_ok
def test_extreme_gates_take_both_paths_and_stay_finite():
    B, T, H, K = 1, 100, 2, 32
    q, k, g, dA = inputs(B, T, H, K, x=extreme_x(B, T, H, K))
    assert (g == 0).any() and g.min() < -1000
    *got, path = ours(q, k, g, dA)
    assert torch.equal(path, expected_path(g, BK=32))
    assert (path == 0).any() and (path == 1).any()
    want = flas(q, k, g, dA)
    assert_close_to_flas(got, want)
    assert_error_no_worse(got, want, gla_intra.reference_dqk_intra(q, k, g, dA))


@slow
@overflow_ok
def test_huge_decays_everywhere_run_flas_loop_bit_for_bit():
    B, T, H, K = 1, 100, 1, 16
    q, k, g, dA = inputs(B, T, H, K, x=torch.full((B, T, H, K), -1000.0))
    *got, path = ours(q, k, g, dA)
    assert (path != 1).all()
    want = flas(q, k, g, dA)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@slow
def test_gate_exactly_zero():
    q, k, _, dA = inputs(1, 70, 1, 16)
    g = torch.zeros_like(q)
    *got, path = ours(q, k, g, dA)
    assert (path != 0).all()
    assert_close_to_flas(got, flas(q, k, g, dA))


@slow
def test_nan_in_k_lands_where_flas_does():
    q, k, g, dA = inputs(1, 40, 1, 16)
    k[0, 20, 0, 3] = float("nan")  # row 20: sub-chunk 1, channel 3
    *got, path = ours(q, k, g, dA)
    want = flas(q, k, g, dA)
    assert path[0, 1] == 0 and path[0, 0] == 1
    assert want[0].isnan().any()  # dq of the rows at and after 20 in the sub-chunk (k enters dq only)
    for a, b in zip(got, want):
        assert torch.equal(a.isnan(), b.isnan())
        assert_close_to_flas([a.nan_to_num()], [b.nan_to_num()])


@slow
def test_huge_k_takes_flas_loop():
    q, k, g, dA = inputs(1, 40, 1, 16)
    k[0, 5] = 1e9  # sub-chunk 0: sum |k| > MAG_BOUND
    *got, path = ours(q, k, g, dA)
    assert path[0].tolist() == [0, 1, 1, -1]
    assert_close_to_flas(got, flas(q, k, g, dA))


@slow
def test_bf16_q_k():
    q, k, g, dA = inputs(1, 70, 1, 16, dtype=torch.bfloat16)
    dq, dk = gla_intra.chunk_gla_bwd_dqk_intra(q, k, g, dA)
    assert dq.dtype == dk.dtype == torch.float32 and dq.shape == dk.shape == q.shape
    assert dq.isfinite().all() and dk.isfinite().all()
    assert_close_to_flas([dq, dk], flas(q, k, g, dA), rel=1e-4)


def test_bad_shapes_and_options_are_named():
    q, k, g, dA = inputs(2, 40, 1, 16)
    f = gla_intra.chunk_gla_bwd_dqk_intra
    with pytest.raises(ValueError, match=r"q, k, g must be \[B, T, H, K\]"):
        f(q, k[:, :30], g, dA)
    with pytest.raises(ValueError, match=r"dA must be \[B, T, H, chunk_size\]"):
        f(q, k, g, dA[..., :32])
    with pytest.raises(ValueError, match="chunk_size=48"):
        f(q, k, g, dA, chunk_size=48)
    with pytest.raises(ValueError, match="batch dimension must be 1"):
        f(q, k, g, dA, cu_seqlens=torch.tensor([0, 40]))
    with pytest.raises(ValueError, match="precisions must be one of"):
        f(q, k, g, dA, config=gla_intra.LaunchConfig(diag_precision="fp16"))


def test_cpu_tensors_without_the_interpreter_take_flas_function(monkeypatch):
    calls = []
    monkeypatch.setattr(gla_intra, "_fla_function", lambda: lambda *a, **kw: calls.append(1) or ("fla", "fla"))
    q, k, g, dA = inputs(1, 20, 1, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert gla_intra.chunk_gla_bwd_dqk_intra(q, k, g, dA) == ("fla", "fla") and calls == [1]
