"""models/kernels/swiglu.py under the Triton interpreter: swiglu_linear (forward, dx, dy, dweight, dbias) against the
PyTorch reference and against FLA's own `fla.modules.activations.swiglu_linear` (its Triton kernels, interpreted), and
log_sigmoid_scaled against float64 math, on packed and row-strided inputs.

The kernels' own bf16 outputs (rounded to nearest even, as on a GPU: models/cpu_triton.py) are checked against the
fp32 math within one bf16 ulp (2^-7 of the value at most), and the autograd results, where that ulp then passes
through a GEMM, against the reference within a few ulps of the tensor's largest value.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see models/cpu_triton.py)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import cpu_triton  # noqa: E402

cpu_triton.enable()

from models.kernels import swiglu  # noqa: E402
from models.kernels.swiglu import (log_sigmoid_scaled, log_sigmoid_scaled_reference, swiglu_linear,  # noqa: E402
                                   swiglu_linear_reference)

BF16_ULP = 2 ** -7  # the largest spacing of bf16 numbers relative to their value
ROWS = 150  # not a multiple of any tile height used below
DTYPES = [torch.float32, torch.bfloat16]
IDS = ["fp32", "bf16"]


def close_within(got, want, rel, what="", atol=1e-30):
    """|got - want| <= rel * |want| + atol element by element."""
    err = (got.double() - want.double()).abs()
    bound = rel * want.double().abs() + atol
    bad = err > bound
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, worst {err.max().item():.3g} at " \
                          f"{want.flatten()[err.flatten().argmax()].item():.3g}"


def close_to_max(got, want, rel, what=""):
    """max |got - want| <= rel * max |want|: for values that went through a sum."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= rel * want.float().abs().max().item() + 1e-12, f"{what}: max abs diff {err:.3g}"


def inputs(shape, dtype, out_features=40, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(shape, generator=g)).to(dtype).requires_grad_()
    y = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(out_features, shape[-1], generator=g) / shape[-1] ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(out_features, generator=g).to(dtype).requires_grad_() if bias else None
    dout = torch.randn(*shape[:-1], out_features, generator=g).to(dtype)
    return x, y, w, b, dout


def run(fn, x, y, w, b, dout):
    """out and the gradients of every input that requires one (None for the others)."""
    leaves = [t for t in (x, y, w, b) if t is not None and t.requires_grad]
    for t in leaves:
        t.grad = None
    out = fn(x, y, w, b)
    out.backward(dout)
    return [out.detach()] + [t.grad if t is not None and t.requires_grad else None for t in (x, y, w, b)]


def exact_swiglu(x, y, dz):
    """In float64: the kernels' fp32 results differ from it by fp32 rounding only."""
    x, y, dz = x.double(), y.double(), dz.double()
    s = torch.sigmoid(x)
    return x * s * y, dz * y * s * (1 + x * (1 - s)), dz * x * s  # z, dx, dy


# ---------------------------------------------------------------------------------------------------------
# SwiGLU: the kernels themselves, element by element
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(ROWS, 97), (ROWS, 256), (1, 5)], ids=["odd-cols", "pow2-cols", "tiny"])
@pytest.mark.parametrize("strided", [False, True], ids=["packed", "row-strided"])
def test_swiglu_kernels_elementwise(dtype, shape, strided):
    g = torch.Generator().manual_seed(1)
    m, d = shape
    # row-strided: each operand a column slice of its own wider tensor, with its own row stride
    wides = [(3 * torch.randn(m, d + pad, generator=g)).to(dtype) for pad in (7, 3, d)]
    x, y, dz = (w[:, 1:d + 1] if strided else w[:, 1:d + 1].contiguous() for w in wides)
    if strided and m > 1:
        assert [t.stride() for t in (x, y, dz)] == [(d + 7, 1), (d + 3, 1), (2 * d, 1)]
    z_ref, dx_ref, dy_ref = exact_swiglu(x, y, dz)
    # fp32: a few fp32 ulps, plus an absolute 1e-6 of the largest value where 1 + x (1 - s) cancels (x near -1.28);
    # bf16: one bf16 ulp (the kernel's rounding) on top of that
    rel = 2e-6 if dtype == torch.float32 else BF16_ULP + 2e-6
    z = swiglu.swiglu_forward(x, y)
    assert z.dtype == dtype and z.is_contiguous()
    close_within(z, z_ref, rel, "z (forward)", atol=1e-6 * z_ref.abs().max().item())
    for store_z in (True, False):
        dx, dy, z2 = swiglu.swiglu_backward(x, y, dz, store_z=store_z)
        close_within(dx, dx_ref, rel, "dx", atol=1e-6 * dx_ref.abs().max().item())
        close_within(dy, dy_ref, rel, "dy", atol=1e-6 * dy_ref.abs().max().item())
        if store_z:
            assert torch.equal(z2, z), "the backward's recomputed z must be the forward's z"
        else:
            assert z2 is None


def test_tile_shapes_cover_the_edges():
    """The shapes above reach: a packed launch with a partial last tile; row-strided tiles with rows and columns
    masked off; GLA 340M's [32768, 2816] row-strided tiles padding no columns."""
    assert ROWS * 97 % swiglu.FWD_TILE != 0 and ROWS * 97 > swiglu.FWD_TILE
    assert ROWS * 97 % swiglu.BWD_TILE != 0 and ROWS * 97 > swiglu.BWD_TILE
    for backward in (False, True):
        bt, bd, _ = swiglu.tile_config(ROWS, 97, packed=False, backward=backward)
        assert bd == 128 and ROWS % bt != 0 and ROWS > bt, (bt, bd)
    assert swiglu.tile_config(32768, 2816, packed=False, backward=False) == (32, 256, 8)
    assert swiglu.tile_config(1, 32768 * 2816, packed=True, backward=False) == (1, swiglu.FWD_TILE, 8)
    assert swiglu.tile_config(1, 5, packed=True, backward=True) == (1, 8, 1)


def test_row_strided_views_are_not_copied():
    wide = torch.randn(2, 37, 200)
    x = wide[..., 100:197]  # [2, 37, 97], rows 200 apart
    x2 = swiglu._rows(x)
    assert x2.data_ptr() == x.data_ptr() and x2.stride() == (200, 1)
    xt = torch.randn(97, 74).t()  # last dim strided: copied
    assert swiglu._rows(xt).is_contiguous()


# ---------------------------------------------------------------------------------------------------------
# swiglu_linear: autograd against the reference and FLA
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(ROWS, 97), (3, 37, 64)], ids=["2d-odd-cols", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_swiglu_linear_matches_reference(dtype, shape, bias):
    x, y, w, b, dout = inputs(shape, dtype, bias=bias)
    got = run(swiglu_linear, x, y, w, b, dout)
    want = run(swiglu_linear_reference, x, y, w, b, dout)
    rel = 1e-5 if dtype == torch.float32 else 4 * BF16_ULP
    for name, a, r in zip(["out", "dx", "dy", "dweight", "dbias"], got, want):
        if r is None:
            assert a is None, name
            continue
        close_to_max(a, r, rel, name)
    assert got[0].shape == (*shape[:-1], 40) and got[1].shape == shape


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_swiglu_linear_matches_flas(dtype):
    """FLA's own SwiGLULinearFunction (its Triton kernels, interpreted: the same truncating casts as ours)."""
    from models import cpu_torch
    fla_swiglu_linear = cpu_torch.original("fla.modules.mlp", "swiglu_linear")
    x, y, w, b, dout = inputs((ROWS, 97), dtype)
    got = run(swiglu_linear, x, y, w, b, dout)
    want = run(fla_swiglu_linear, x, y, w, b, dout)
    rel = 1e-5 if dtype == torch.float32 else BF16_ULP
    for name, a, r in zip(["out", "dx", "dy", "dweight", "dbias"], got, want):
        close_to_max(a, r, rel, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_swiglu_linear_on_row_strided_views(dtype):
    """gate and up as column slices of one wider [B, T, 2D + 5] tensor: the kernels read them in place, and the
    gradients reach the wide tensor's slices."""
    g = torch.Generator().manual_seed(3)
    d = 97
    wide = (2 * torch.randn(2, 41, 2 * d + 5, generator=g)).to(dtype).requires_grad_()
    w = (torch.randn(24, d, generator=g) / d ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(24, generator=g).to(dtype).requires_grad_()
    dout = torch.randn(2, 41, 24, generator=g).to(dtype)
    results = []
    for fn in (swiglu_linear, swiglu_linear_reference):
        wide.grad = w.grad = b.grad = None
        x, y = wide[..., :d], wide[..., d + 5:]
        assert not x.is_contiguous() and not y.is_contiguous()
        out = fn(x, y, w, b)
        out.backward(dout)
        results.append([out.detach(), wide.grad.clone(), w.grad.clone(), b.grad.clone()])
    rel = 1e-5 if dtype == torch.float32 else 4 * BF16_ULP
    for name, a, r in zip(["out", "dwide", "dweight", "dbias"], *results):
        close_to_max(a, r, rel, name)
    assert not results[0][1][..., d:d + 5].any()


@pytest.mark.parametrize("which", ["weight-only", "xy-only"])
def test_swiglu_linear_partial_gradients(which, monkeypatch):
    """Only the weight needs a gradient: z is recomputed by the forward kernel. Only x and y: z is not stored."""
    x, y, w, b, dout = inputs((ROWS, 64), torch.float32)
    for t in ((x, y) if which == "weight-only" else (w, b)):
        t.requires_grad_(False)
    stores = []
    real = swiglu.swiglu_backward
    monkeypatch.setattr(swiglu, "swiglu_backward", lambda *a, **k: stores.append(k["store_z"]) or real(*a, **k))
    got = run(swiglu_linear, x, y, w, b, dout)
    want = run(swiglu_linear_reference, x, y, w, b, dout)
    assert stores == ([] if which == "weight-only" else [False])
    for name, a, r in zip(["out", "dx", "dy", "dweight", "dbias"], got, want):
        if r is None:
            assert a is None, name
        else:
            close_to_max(a, r, 1e-5, name)


def test_swiglu_linear_errors_name_the_problem():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="x and y must share shape"):
        swiglu_linear(x, torch.randn(4, 9), torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"weight must be \[out_features, 8\]"):
        swiglu_linear(x, x, torch.randn(3, 9))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        swiglu_linear(x, x, torch.randn(3, 8), torch.randn(4))


# ---------------------------------------------------------------------------------------------------------
# log_sigmoid_scaled
# ---------------------------------------------------------------------------------------------------------

def extreme_gates(dtype):
    """Values from -100 to 100, dense near 0, the ends included exactly; [2, 37, 3, 16] like GLA's [B, T, H, dk]."""
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.tensor([-100.0, -88.0, -30.0, -17.0, -1e-3, 0.0, 1e-3, 17.0, 30.0, 88.0, 100.0]),
                   torch.linspace(-100, 100, 1001), 4 * torch.randn(2 * 37 * 3 * 16 - 1012, generator=g)])
    return x.view(2, 37, 3, 16).to(dtype)


def float64_log_sigmoid(x, normalizer):
    x = x.double()
    return F.logsigmoid(x) / normalizer, torch.sigmoid(-x) / normalizer  # y, dy/dx


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("normalizer", [16, 3.0, 1])
def test_log_sigmoid_scaled_extreme_values(dtype, normalizer):
    x = extreme_gates(dtype).requires_grad_()
    y = log_sigmoid_scaled(x, normalizer)
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(x.shape, generator=g).to(dtype)
    y.backward(dy)
    assert y.dtype == dtype and y.shape == x.shape and x.grad.dtype == dtype
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    y64, dydx64 = float64_log_sigmoid(x.detach(), normalizer)
    dx64 = dy.double() * dydx64
    # fp32: a few ulps; values below fp32's normal range (|x| > ~87) keep only their denormal bits
    rel = 4e-6 if dtype == torch.float32 else BF16_ULP
    for name, got, want in (("y", y.detach(), y64), ("dx", x.grad, dx64)):
        tiny = want.abs() < 1e-37
        close_within(got[~tiny], want[~tiny], rel, name)
        assert (got[tiny].double() - want[tiny]).abs().max() < 1e-37, name
    assert (y.detach() <= 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_log_sigmoid_scaled_matches_reference_and_torch(dtype):
    x = extreme_gates(dtype).requires_grad_()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    got = [log_sigmoid_scaled(x, 16)]
    got[0].backward(dy)
    got.append(x.grad)
    x.grad = None
    for fn in (lambda t: log_sigmoid_scaled_reference(t, 16), lambda t: F.logsigmoid(t) / 16):  # fused.py's "fla"
        y = fn(x)
        y.backward(dy)
        rel = 1e-5 if dtype == torch.float32 else 2 * BF16_ULP
        close_to_max(got[0], y.detach(), rel, "y")
        close_to_max(got[1], x.grad, rel, "dx")
        x.grad = None


def test_log_sigmoid_scaled_row_strided_input_and_gradient():
    g = torch.Generator().manual_seed(7)
    wide = (10 * torch.randn(ROWS, 130, generator=g)).requires_grad_()
    x = wide[:, 3:100]  # [150, 97], rows 130 apart
    dy_wide = torch.randn(ROWS, 120, generator=g)
    dy = dy_wide[:, 10:107]
    y = log_sigmoid_scaled(x, 16)
    (dx,) = torch.autograd.grad(y, wide, dy)
    y64, dydx64 = float64_log_sigmoid(x.detach(), 16)
    close_within(y.detach(), y64, 4e-6, "y")
    close_within(dx[:, 3:100], dy.double() * dydx64, 4e-6, "dx")
    assert not dx[:, :3].any() and not dx[:, 100:].any()
    # the backward kernel itself on a row-strided incoming gradient (autograd may hand one over)
    dx2 = swiglu.log_sigmoid_scaled_backward(x.detach(), dy, 16)
    close_within(dx2, dy.double() * dydx64, 4e-6, "dx (strided dy)")


def test_log_sigmoid_scaled_rejects_a_zero_normalizer():
    for fn in (log_sigmoid_scaled, log_sigmoid_scaled_reference):
        with pytest.raises(ValueError, match="normalizer must be finite and non-zero"):
            fn(torch.randn(3), 0)


# ---------------------------------------------------------------------------------------------------------
# The CPU path without the interpreter
# ---------------------------------------------------------------------------------------------------------

def test_cpu_without_interpreter_takes_the_references(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    called = []
    for name in ("swiglu_forward", "log_sigmoid_scaled_forward"):
        monkeypatch.setattr(swiglu, name, lambda *a, **k: called.append(1))
    x, y, w, b, _ = inputs((8, 16), torch.float32)
    assert torch.equal(swiglu_linear(x, y, w, b), swiglu_linear_reference(x, y, w, b))
    assert torch.equal(log_sigmoid_scaled(x, 16), log_sigmoid_scaled_reference(x, 16))
    assert not called


def test_keeping_z_gives_the_same_gradients_without_recomputing_it(monkeypatch):
    """keep_z saves the forward's z for the weight gradient: every output and gradient bit for bit as with the
    recompute, and the backward kernel then writes no z."""
    x, y, w, b, dout = inputs((2, ROWS // 2, 64), torch.bfloat16)
    recomputed = run(swiglu_linear, x, y, w, b, dout)
    stores = []
    real = swiglu.swiglu_backward
    monkeypatch.setattr(swiglu, "swiglu_backward", lambda *a, **k: stores.append(k["store_z"]) or real(*a, **k))
    kept = run(lambda *t: swiglu_linear(*t, keep_z=True), x, y, w, b, dout)
    assert stores == [False]
    for a, c in zip(recomputed, kept):
        assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------------
# gate_up_swiglu: the gate and up projections as one GEMM, SwiGLU on its column blocks
# ---------------------------------------------------------------------------------------------------------

def gate_up_inputs(dtype, n=48, d=32, seed=0):
    """x [3, 50, d], the gate and up weights [n, d] (separate tensors) and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 50, d, generator=g).to(dtype).requires_grad_()
    wg, wu = ((torch.randn(n, d, generator=g) / d ** 0.5).to(dtype).requires_grad_() for _ in range(2))
    dz = torch.randn(3, 50, n, generator=g).to(dtype)
    return x, wg, wu, dz


def gate_up_run(fn, x, wg, wu, dz):
    for t in (x, wg, wu):
        t.grad = None
    z = fn(x, wg, wu)
    z.backward(dz)
    return z.detach(), x.grad, wg.grad, wu.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_gate_up_swiglu_matches_reference(dtype):
    x, wg, wu, dz = gate_up_inputs(dtype)
    got = gate_up_run(swiglu.gate_up_swiglu, x, wg, wu, dz)
    want = gate_up_run(swiglu.gate_up_swiglu_reference, x, wg, wu, dz)
    rel = 1e-5 if dtype == torch.float32 else 4 * BF16_ULP
    for name, a, r in zip(["z", "dx", "dgate_weight", "dup_weight"], got, want):
        close_to_max(a, r, rel, name)


def test_stacked_weights_are_a_view_only_where_adjacent():
    """The bf16 path's flat buffer holds gate then up: one [2n, d] view, no copy; any other layout is concatenated.
    The merged GEMM gives the same z and gradients either way (fp32, bit for bit)."""
    n, d = 48, 32
    flat = torch.randn(2 * n * d + 7)
    wg, wu = flat[:n * d].view(n, d), flat[n * d:2 * n * d].view(n, d)
    stacked = swiglu.stacked_weights(wg, wu)
    assert stacked.data_ptr() == wg.data_ptr() and torch.equal(stacked, torch.cat([wg, wu]))
    apart = flat[n * d + 7:].view(n, d)
    for a, b in [(wu, wg), (wg, apart), (wg, wu.t().contiguous().t())]:
        copy = swiglu.stacked_weights(a, b)
        assert copy.data_ptr() != a.data_ptr() and torch.equal(copy, torch.cat([a, b]))
    x, wg_leaf, wu_leaf, dz = gate_up_inputs(torch.float32)
    copied = gate_up_run(swiglu.gate_up_swiglu, x, wg_leaf, wu_leaf, dz)
    # the same weights as views of one buffer (the parameters' .data swapped to them, as MasterWeights does)
    buf = torch.cat([wg_leaf.detach().flatten(), wu_leaf.detach().flatten()])
    wg_leaf.data, wu_leaf.data = buf[:n * d].view(n, d), buf[n * d:].view(n, d)
    assert swiglu.stacked_weights(wg_leaf, wu_leaf).data_ptr() == buf.data_ptr()
    viewed = gate_up_run(swiglu.gate_up_swiglu, x, wg_leaf, wu_leaf, dz)
    for a, b in zip(copied, viewed):
        assert torch.equal(a, b)


def test_gate_up_swiglu_errors_and_strided_outputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"gate weight \(6, 8\) and up weight \(5, 8\) must both be \[N, 8\]"):
        swiglu.gate_up_swiglu(x, torch.randn(6, 8), torch.randn(5, 8))
    with pytest.raises(TypeError, match="one dtype"):
        swiglu.gate_up_swiglu(x, torch.randn(6, 8).double(), torch.randn(6, 8))
    a, b, dz = torch.randn(ROWS, 40), torch.randn(ROWS, 40), torch.randn(ROWS, 40)
    out = torch.empty(ROWS, 80)
    dx, dy, _ = swiglu.swiglu_backward(a, b, dz, store_z=False, out=(out[:, :40], out[:, 40:]))
    ref_dx, ref_dy, _ = swiglu.swiglu_backward(a, b, dz, store_z=False)
    assert torch.equal(out[:, :40], ref_dx) and torch.equal(out[:, 40:], ref_dy)
    with pytest.raises(ValueError, match="share one row stride"):
        swiglu.swiglu_backward(a, b, dz, store_z=False, out=(out[:, :40], torch.empty(ROWS, 40)))
