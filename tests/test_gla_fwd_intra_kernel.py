"""models/kernels/gla_fwd_intra.py under the Triton interpreter: FLA's chunk_gla_fwd_intra_gk in one kernel with the
diagonal blocks as products. Same values as FLA's kernels within fp32 rounding on the entries FLA writes (equal
lengths, cu_seqlens with lengths not multiples of 16 or 64, T < 64, K blocks, chunks of 32 and 16, K > 256), the same
entries written, error against float64 no worse than FLA's, extreme gates with both paths and no NaN or inf where
FLA's A is finite, FLA's output and dv kernels giving the same o and dv from either A, and bad inputs named.

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

from fla.ops.gla.chunk import chunk_gla_fwd_intra_gk as flas  # noqa: E402
from fla.ops.utils.constant import RCP_LN2  # noqa: E402
from fla.ops.utils.cumsum import chunk_local_cumsum  # noqa: E402

from models.kernels import gla_fwd_intra  # noqa: E402

SCALE = 0.3


def inputs(B, T, H, K, chunk_size=64, cu_seqlens=None, x=None, seed=0, dtype=torch.float32):
    """q, k random; g the chunk-local log2 cumsum of logsigmoid(x) / 16 (x random unless given)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen).to(dtype) for _ in range(2))
    x = torch.randn(B, T, H, K, generator=gen) if x is None else x
    g = chunk_local_cumsum(F.logsigmoid(x) / 16, chunk_size, scale=RCP_LN2, cu_seqlens=cu_seqlens)
    return q, k, g


def ours(q, k, g, cu_seqlens=None, chunk_size=64, config=None, scale=SCALE):
    """(A, path) with the path each program's BK block took (1 product, 0 FLA's loop, -1 no rows). A starts as NaN,
    so that an entry this kernel does not write stays NaN."""
    B, T, H, _ = q.shape
    A = torch.full((B, T, H, chunk_size), float("nan"))
    return gla_fwd_intra._launch(q, k, g, scale, cu_seqlens, chunk_size, None, config or gla_fwd_intra.CONFIG,
                                 True, A=A)


def written(T, chunk_size=64, cu_seqlens=None):
    """The entries FLA writes, bool [1, T, 1, BT]."""
    return gla_fwd_intra.written_entries(T, chunk_size, cu_seqlens)[None, :, None, :]


def written_above_diagonal(T, chunk_size=64, cu_seqlens=None):
    """The written entries above the diagonal (FLA writes 0.0 there), bool [1, T, 1, BT]."""
    t = torch.arange(T)
    if cu_seqlens is not None:  # position inside its own sequence
        t = t - cu_seqlens[:-1][torch.searchsorted(cu_seqlens[:-1], t, right=True) - 1]
    upper = torch.arange(chunk_size)[None, :] > (t % chunk_size)[:, None]
    return written(T, chunk_size, cu_seqlens) & upper[None, :, None, :]


def expected_path(g, BK, chunk_size=64, BC=16):
    """The path the module doc's rule gives, from g alone (q and k here are far below MAG_BOUND)."""
    B, T, H, K = g.shape
    NT, NC, NK = -(-T // chunk_size), chunk_size // BC, -(-K // BK)
    path = torch.full((B * H, NT * NC * NK), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            for i_t in range(NT):
                for i_i in range(NC):
                    for i_k in range(NK):
                        s = i_t * chunk_size + i_i * BC
                        if s < T:
                            tile = g[b, s:min(s + BC, T), h, i_k * BK:(i_k + 1) * BK]
                            spread = (tile.max(0).values - tile.min(0).values).max()
                            path[b * H + h, (i_t * NC + i_i) * NK + i_k] = int(spread <= gla_fwd_intra.RANGE_BOUND)
    return path


def assert_close_to_flas(got, want, cu_seqlens=None, chunk_size=64, rel=1e-5):
    """On the entries FLA writes: ours finite where FLA's is, within rel of FLA's largest value; the written entries
    above the diagonal exactly 0.0 in both."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    T = got.shape[1]
    upper = written_above_diagonal(T, chunk_size, cu_seqlens).expand_as(got)
    assert upper.any() and (got[upper] == 0).all() and (want[upper] == 0).all()
    finite = written(T, chunk_size, cu_seqlens).expand_as(want) & want.isfinite()
    assert got[finite].isfinite().all(), "A: non-finite where FLA's is finite"
    scale = want[finite].abs().max().item()
    diff = (got[finite] - want[finite]).abs().max().item()
    assert diff <= rel * scale, f"A: max |ours - FLA's| {diff:.3g}, max |FLA's| {scale:.3g}"


def assert_error_no_worse(got, want, ref, cu_seqlens=None, chunk_size=64):
    """Max error against float64 over the written entries at most 2x FLA's plus 4 fp32 ulps of the largest value."""
    sel = written(got.shape[1], chunk_size, cu_seqlens).expand_as(ref)
    scale = ref[sel].abs().max().item()
    err_ours, err_flas = ((t.double()[sel] - ref[sel]).abs().max().item() for t in (got, want))
    assert err_ours <= 2 * err_flas + 4 * EPS * scale, \
        f"A: error vs float64 {err_ours:.3g}, FLA's {err_flas:.3g}, max |ref| {scale:.3g}"


CASES = {  # shape (B, T, H, K), cu_seqlens, chunk_size, config
    "batch": ((2, 100, 2, 32), None, 64, None),
    "T<64": ((1, 40, 2, 16), None, 64, None),
    "cu_seqlens": ((1, 150, 2, 32), [0, 37, 90, 150], 64, None),
    "K48_BK32": ((1, 70, 1, 48), None, 64, gla_fwd_intra.LaunchConfig(BK=32, diag_precision="tf32x3")),
    "chunk32": ((1, 50, 1, 16), [0, 21, 50], 32, None),
    "chunk16": ((1, 40, 1, 16), None, 16, None),
    "K272": ((1, 20, 1, 272), None, 64, None),  # FLA's split + merge kernels
}


@slow
@pytest.mark.parametrize("case", CASES)
def test_matches_flas_kernels_and_float64(case):
    shape, cu, chunk_size, config = CASES[case]
    cu = torch.tensor(cu) if cu is not None else None
    q, k, g = inputs(*shape, chunk_size=chunk_size, cu_seqlens=cu)
    got, path = ours(q, k, g, cu, chunk_size, config)
    where = written(shape[1], chunk_size, cu)
    assert torch.equal(got.isnan(), ~where.expand_as(got))  # exactly the entries FLA writes
    want = flas(q, k, g, SCALE, cu_seqlens=cu, chunk_size=chunk_size)
    assert_close_to_flas(got, want, cu, chunk_size)
    assert_error_no_worse(got, want, gla_fwd_intra.reference_fwd_intra(q, k, g, SCALE, cu, chunk_size), cu, chunk_size)
    assert (path != 0).all() and (path == 1).any()  # well-conditioned gates: the product everywhere
    public = gla_fwd_intra.chunk_gla_fwd_intra_gk(q, k, g, SCALE, cu_seqlens=cu, chunk_size=chunk_size, config=config)
    assert torch.equal(public[where.expand_as(got)], got[where.expand_as(got)])


@slow
def test_given_chunk_indices_are_used():
    from fla.ops.utils import prepare_chunk_indices
    cu = torch.tensor([0, 37, 90])
    q, k, g = inputs(1, 90, 1, 16, cu_seqlens=cu)
    a = gla_fwd_intra.chunk_gla_fwd_intra_gk(q, k, g, SCALE, cu, 64, prepare_chunk_indices(cu, 64))
    b = gla_fwd_intra.chunk_gla_fwd_intra_gk(q, k, g, SCALE, cu, 64)
    where = written(90, 64, cu).expand_as(a)
    assert torch.equal(a[where], b[where])


@slow
def test_output_and_dv_from_our_A_are_flas():
    """FLA's o (chunk_gla_fwd_o_gk) and dv (chunk_gla_bwd_dv) read A: the same from ours (NaN where unwritten) as
    from FLA's; o against a float64 recurrence no worse than FLA's."""
    from fla.ops.common.chunk_h import chunk_fwd_h
    from fla.ops.gla.chunk import chunk_gla_bwd_dv, chunk_gla_fwd_o_gk
    cu = torch.tensor([0, 37, 100])
    T, H, K, V = 100, 2, 32, 16
    x = torch.randn(1, T, H, K, generator=torch.Generator().manual_seed(7))
    q, k, g = inputs(1, T, H, K, cu_seqlens=cu, x=x)
    v, do = torch.randn(2, 1, T, H, V, generator=torch.Generator().manual_seed(8))
    h, _ = chunk_fwd_h(k=k, v=v, g=None, gk=g, gv=None, h0=None, output_final_state=False, cu_seqlens=cu,
                       chunk_size=64, states_in_fp32=False)
    a_ours, _ = ours(q, k, g, cu)
    a_flas = flas(q, k, g, SCALE, cu_seqlens=cu)
    o_ours, o_flas = (chunk_gla_fwd_o_gk(q=q, v=v, g=g, A=a, h=h, scale=SCALE, cu_seqlens=cu) for a in (a_ours, a_flas))
    dv_ours, dv_flas = (chunk_gla_bwd_dv(k=k, g=g, A=a, do=do, dh=h, cu_seqlens=cu) for a in (a_ours, a_flas))
    for name, a, b in (("o", o_ours, o_flas), ("dv", dv_ours, dv_flas)):
        assert a.isfinite().all(), f"{name}: non-finite"
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), f"{name}: ours {a}, FLA's {b}"
    # float64 recurrence: S_t = exp2(a_t) * S_{t-1} + k_t v_t^T, o_t = scale q_t S_t, per sequence
    decay = (F.logsigmoid(x.double()) / 16 * RCP_LN2)[0]
    ref = torch.zeros(T, H, V, dtype=torch.float64)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        S = torch.zeros(H, K, V, dtype=torch.float64)
        for t in range(s, e):
            S = torch.exp2(decay[t])[..., None] * S + k[0, t].double()[..., None] * v[0, t].double()[:, None]
            ref[t] = SCALE * torch.einsum('hk,hkv->hv', q[0, t].double(), S)
    err_ours, err_flas = ((o[0].double() - ref).abs().max().item() for o in (o_ours, o_flas))
    assert err_ours <= 2 * err_flas + 4 * EPS * ref.abs().max().item()


@slow
def test_large_gate_range_within_the_bound_keeps_flas_precision():
    """Sub-chunks spanning up to ~30 log2 units of decay on half the channels: still the product."""
    x = torch.randn(1, 64, 2, 32, generator=torch.Generator().manual_seed(3))
    x[..., 16:] = -21 - torch.rand(1, 64, 2, 16, generator=torch.Generator().manual_seed(4))  # ~-1.9 log2 a step
    q, k, g = inputs(1, 64, 2, 32, x=x)
    got, path = ours(q, k, g)
    spread = max((g[0, s:s + 16].amax(0) - g[0, s:s + 16].amin(0)).max().item() for s in range(0, 64, 16))
    assert 20 < spread <= gla_fwd_intra.RANGE_BOUND and (path == 1).all()
    want = flas(q, k, g, SCALE)
    assert_close_to_flas(got, want)
    assert_error_no_worse(got, want, gla_fwd_intra.reference_fwd_intra(q, k, g, SCALE))


@slow
@overflow_ok
def test_extreme_gates_take_both_paths_and_stay_finite():
    B, T, H, K = 1, 100, 2, 64
    q, k, g = inputs(B, T, H, K, x=extreme_x(B, T, H, K))
    assert (g == 0).any() and g.min() < -1000
    config = gla_fwd_intra.LaunchConfig(BK=32)  # channels 0-31 (decays of -90) and 32-63 in separate blocks
    got, path = ours(q, k, g, config=config)
    assert torch.equal(path, expected_path(g, BK=32))
    assert (path == 0).any() and (path == 1).any()
    want = flas(q, k, g, SCALE)
    assert_close_to_flas(got, want)
    assert_error_no_worse(got, want, gla_fwd_intra.reference_fwd_intra(q, k, g, SCALE))


@slow
@overflow_ok
def test_huge_decays_everywhere_run_flas_loop_bit_for_bit():
    B, T, H, K = 1, 100, 1, 16
    q, k, g = inputs(B, T, H, K, x=torch.full((B, T, H, K), -1000.0))
    got, path = ours(q, k, g)
    assert (path != 1).all()
    want = flas(q, k, g, SCALE)
    where = written(T).expand_as(got)
    assert torch.equal(got[where], want[where])


@slow
def test_gate_exactly_zero():
    q, k, _ = inputs(1, 70, 1, 16)
    g = torch.zeros_like(q)
    got, path = ours(q, k, g)
    assert (path != 0).all()
    assert_close_to_flas(got, flas(q, k, g, SCALE))


@slow
def test_nan_in_k_lands_where_flas_does():
    q, k, g = inputs(1, 40, 1, 16)
    k[0, 20, 0, 3] = float("nan")  # row 20: sub-chunk 1, channel 3
    got, path = ours(q, k, g)
    want = flas(q, k, g, SCALE)
    assert path[0].tolist() == [1, 0, 1, -1]
    where = written(40).expand_as(got)
    assert want[where].isnan().any()  # column 20 of the rows from 20 on
    assert torch.equal(got[where].isnan(), want[where].isnan())
    assert_close_to_flas(got.nan_to_num(), want.nan_to_num())


@slow
def test_huge_k_takes_flas_loop():
    q, k, g = inputs(1, 40, 1, 16)
    k[0, 5] = 1e9  # sub-chunk 0: sum |k| > MAG_BOUND
    got, path = ours(q, k, g)
    assert path[0].tolist() == [0, 1, 1, -1]
    assert_close_to_flas(got, flas(q, k, g, SCALE))


@slow
def test_bf16_q_k():
    q, k, g = inputs(1, 70, 1, 16, dtype=torch.bfloat16)
    got = gla_fwd_intra.chunk_gla_fwd_intra_gk(q, k, g, SCALE)
    assert got.dtype == torch.float32 and got.shape == (1, 70, 1, 64)
    assert got[written(70).expand_as(got)].isfinite().all()
    assert_close_to_flas(got, flas(q, k, g, SCALE), rel=1e-4)


def test_bad_shapes_and_options_are_named():
    q, k, g = inputs(2, 40, 1, 16)
    f = gla_fwd_intra.chunk_gla_fwd_intra_gk
    with pytest.raises(ValueError, match=r"q, k, g must be \[B, T, H, K\]"):
        f(q, k[:, :30], g, SCALE)
    with pytest.raises(ValueError, match=r"q, k, g must be \[B, T, H, K\]"):
        f(q[0], k[0], g[0], SCALE)
    with pytest.raises(ValueError, match="chunk_size=48"):
        f(q, k, g, SCALE, chunk_size=48)
    with pytest.raises(ValueError, match="batch dimension must be 1"):
        f(q, k, g, SCALE, cu_seqlens=torch.tensor([0, 40]))
    with pytest.raises(ValueError, match="scale must be a real number"):
        f(q, k, g, torch.tensor(SCALE))
    with pytest.raises(ValueError, match="precisions must be one of"):
        f(q, k, g, SCALE, config=gla_fwd_intra.LaunchConfig(diag_precision="fp16"))


def test_written_entries():
    w = gla_fwd_intra.written_entries(70, 64)
    assert w[0].tolist() == [True] * 16 + [False] * 48 and w[63].all() and w[64].tolist() == w[0].tolist()
    w = gla_fwd_intra.written_entries(50, 32, torch.tensor([0, 21, 50]))
    assert w[20].tolist() == [True] * 32 and w[21].tolist() == [True] * 16 + [False] * 16


def test_cpu_tensors_without_the_interpreter_take_flas_function(monkeypatch):
    calls = []
    monkeypatch.setattr(gla_fwd_intra, "_fla_function", lambda: lambda *a, **kw: calls.append(1) or "fla")
    q, k, g = inputs(1, 20, 1, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert gla_fwd_intra.chunk_gla_fwd_intra_gk(q, k, g, SCALE) == "fla" and calls == [1]
