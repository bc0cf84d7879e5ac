"""models/kernels/gated_norm.py: GLA's gated output norm under the Triton interpreter against the PyTorch reference
and against FLA's FusedRMSNormGated (its Triton kernels interpreted too): y, do, dg, dweight.

fp32 only for the bit-level comparisons (the kernels and the references round bf16 sums taken in other orders); bf16 is
checked within a few ulps of the reference."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see models/cpu_triton.py)

import pytest  # noqa: E402
import torch  # noqa: E402

from models import cpu_triton  # noqa: E402

cpu_triton.enable()

from models.kernels import gated_norm  # noqa: E402

ROWS = 150  # not a multiple of the tile heights


def make(shape, dtype, seed=0):
    g_ = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g_).to(dtype).requires_grad_()
    g = (2 * torch.randn(shape, generator=g_)).to(dtype).requires_grad_()
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g_)).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=g_).to(dtype)
    return x, g, w, dy


def run(fn, x, g, w, dy, **kw):
    for t in (x, g, w):
        t.grad = None
    y = fn(x, g, w, **kw)
    y.backward(dy)
    return y.detach(), x.grad, g.grad, w.grad


def close_to_max(a, b, rel, what):
    err = (a.float() - b.float()).abs().max().item()
    assert err <= rel * b.float().abs().max().item() + 1e-12, f"{what}: max abs diff {err:.3g}"


@pytest.mark.parametrize("shape", [(ROWS, 256), (2, 37, 3, 96)], ids=["head256", "odd-dim-4d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(shape, dtype):
    x, g, w, dy = make(shape, dtype)
    got = run(gated_norm.rms_norm_gated, x, g, w, dy)
    want = run(gated_norm.rms_norm_gated_reference, x, g, w, dy)
    rel = 2e-6 if dtype == torch.float32 else 2 ** -6
    for name, a, b in zip(["y", "dx", "dg", "dweight"], got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        close_to_max(a, b, rel if name != "dweight" else 10 * rel, name)


def test_matches_flas_gated_norm():
    from fla.modules import FusedRMSNormGated
    x, g, w, dy = make((ROWS, 256), torch.float32)
    fla = FusedRMSNormGated(256, eps=1e-5, activation="swish")
    with torch.no_grad():
        fla.weight.copy_(w)
    got = run(gated_norm.rms_norm_gated, x, g, w, dy)
    x.grad = g.grad = None
    y = fla(x, g)
    y.backward(dy)
    for name, a, b in zip(["y", "dx", "dg", "dweight"], got, (y.detach(), x.grad, g.grad, fla.weight.grad)):
        close_to_max(a, b, 1e-5, name)


@pytest.mark.parametrize("shape", [(2, 37, 3, 96), (ROWS, 256)], ids=["heads", "rows"])
def test_dg_goes_into_a_column_block_of_a_wider_gradient(shape):
    """dg_into: the gate's gradient written by the kernel into a column block of one [tokens, W] gradient (rows of
    heads x D strided by W, models/fused.py's GradSlab); the same bits as a new tensor, the other columns untouched,
    and that block is the gradient handed back."""
    x, g, w, dy = make(shape, torch.float32)
    want = run(gated_norm.rms_norm_gated, x, g, w, dy)
    tokens, width = (shape[0] * shape[1], shape[2] * shape[3]) if len(shape) == 4 else shape
    wide = torch.full((tokens, width + 7), float("nan"))
    place = wide[:, 5:5 + width].view(shape)
    assert gated_norm._dg_layout(place, g.detach().reshape(-1, shape[-1])) is not None
    got = run(gated_norm.rms_norm_gated, x, g, w, dy, dg_into=lambda: place)
    for name, a, b in zip(["y", "dx", "dg", "dweight"], got, want):
        assert torch.equal(a, b), name
    assert torch.equal(place, want[2]) and wide[:, :5].isnan().all() and wide[:, 5 + width:].isnan().all()
    # a place the kernel cannot index as (row groups, packed heads): computed, then copied there
    odd = torch.full((shape[-1], tokens * (shape[2] if len(shape) == 4 else 1)), float("nan")).t().view(shape)
    assert gated_norm._dg_layout(odd, g.detach().reshape(-1, shape[-1])) is None
    got = run(gated_norm.rms_norm_gated, x, g, w, dy, dg_into=lambda: odd)
    assert torch.equal(got[2], want[2]) and torch.equal(odd, want[2])


def test_bad_inputs_are_named():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="the gate must have x's shape"):
        gated_norm.rms_norm_gated(x, torch.randn(4, 9), torch.ones(8))
    with pytest.raises(ValueError, match=r"needs \(8,\)"):
        gated_norm.rms_norm_gated(x, torch.randn(4, 8), torch.ones(9))


def test_backward_launch_configs_give_the_same_gradients(monkeypatch):
    """bench/norm_bench.py --gated-bwd-sweep times other launches of the backward kernel (rows per tile, warps,
    programs per SM, the next tile loaded ahead), and gated_norm.BACKWARD_CONFIG makes one the launch everywhere: each
    must give the default's dx and dg bit for bit (dg into a column block of a wider gradient, as in GLA's step) and its
    dweight up to summation order, with programs walking several tiles, some past the end."""
    from models.kernels.rmsnorm import BackwardConfig, backward_config
    x, g, w, dy = (t.detach() for t in make((ROWS, 256), torch.bfloat16, seed=3))
    w = w.float()
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6)
    tokens, heads = ROWS // 3, 3  # 150 rows: 50 tokens of 3 heads
    wide = torch.full((tokens, heads * 256 + 7), float("nan"), dtype=torch.bfloat16)
    place = wide[:, 5:5 + heads * 256].view(tokens, heads, 256)
    dx0, _, dw0 = gated_norm._backward(x, g, w, rstd, dy, place)
    dg0 = place.clone()
    base = backward_config(256)
    for cfg in [base._replace(prefetch=not base.prefetch), BackwardConfig(1, 4, 4, True),
                BackwardConfig(2, 2, 2, False), BackwardConfig(32, 8, 1, True), BackwardConfig(16, 4, 4, True, 128)]:
        place.fill_(float("nan"))
        dx, dg, dw = gated_norm._backward(x, g, w, rstd, dy, place, config=cfg)
        assert dg is place and torch.equal(dx, dx0) and torch.equal(place, dg0), cfg
        if cfg.bt == base.bt:  # same tiles, same programs: the same partial sums in the same order
            assert torch.equal(dw, dw0), cfg
        else:
            torch.testing.assert_close(dw, dw0, rtol=1e-5, atol=1e-4)
    assert wide[:, :5].isnan().all() and wide[:, -2:].isnan().all()
    # BACKWARD_CONFIG is the launch of the autograd path's backward (what the trainer runs)
    launches = []
    real = gated_norm.backward_programs
    monkeypatch.setattr(gated_norm, "backward_programs", lambda n, dev, warps, per_sm: launches.append(
        (warps, per_sm)) or real(n, dev, warps, per_sm))
    monkeypatch.setattr(gated_norm, "BACKWARD_CONFIG", BackwardConfig(2, 2, 3, False))
    xr, gr, wr = (t.clone().requires_grad_() for t in (x, g, w))
    run(gated_norm.rms_norm_gated, xr, gr, wr, dy, eps=1e-6)
    assert launches == [(2, 3)]


def test_norm_bench_gated_sweep_checks_each_launch_against_the_default(capsys, monkeypatch):
    """bench/norm_bench.py --gated-bwd-sweep's loop, on the interpreter with a stand-in timer (the GPU call times
    it): every launch of its grid gives the default's dx and dg bits with dg in the slab's column block, the default is
    among them, and the GATED_SWEEP line lists them fastest first."""
    import json
    import types
    from bench import norm_bench
    from models.kernels.rmsnorm import backward_config
    args = types.SimpleNamespace(heads=4, dim=1024, rows=5, slab_width=1031, slab_offset=5, dtype="bf16",
                                 weight_dtype="fp32", eps=1e-6)
    times = iter(range(1000, 0, -1))  # each launch "faster" than the one before it
    assert norm_bench.gated_bwd_sweep(args, lambda fn: fn() is None or next(times) / 1000, device="cpu") == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("GATED_SWEEP "))
    rows = json.loads(line[len("GATED_SWEEP "):])["results"]
    assert len(rows) == len(norm_bench.launch_grid(256, backward_config(256), bts=(1, 2, 4, 8, 16, 32), caps=True)) > 150
    # register caps where more than 8 warps would share an SM: all of a config's programs fit 65536 registers
    capped = [r["config"] for r in rows if r["config"]["maxnreg"]]
    assert capped and all(64 <= c["maxnreg"] <= 255 and c["maxnreg"] * 32 * c["num_warps"] * c["per_sm"] <= 65536
                          for c in capped)
    assert all(r["same"] for r in rows) and sum(r["default"] for r in rows) == 1
    assert [r["ms"] for r in rows] == sorted(r["ms"] for r in rows)
