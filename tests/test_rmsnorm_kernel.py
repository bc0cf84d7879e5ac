"""models/kernels/rmsnorm.py: the Triton RMSNorm (+ residual) under the Triton interpreter vs the PyTorch reference,
forward and backward (dx, dresidual, dweight).

bf16 runs as on a GPU (models/cpu_triton.py widens bf16 to fp32 and rounds back to nearest even): the reference is
fed s = x + residual rounded to bf16 by torch, and the kernel's s is checked against that bit for bit; y, dx and
dweight are then compared with tolerances of about one bf16 ulp (the two sum in other orders).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see models/cpu_triton.py)

import pytest  # noqa: E402
import torch  # noqa: E402

from models import cpu_triton  # noqa: E402

cpu_triton.enable()

from models.kernels import rmsnorm  # noqa: E402
from models.kernels.rmsnorm import rms_norm, rms_norm_reference  # noqa: E402

# (rtol, atol) per output dtype. fp32: the two differ only in summation order. bf16: an ulp or two (2^-8 relative)
# from rounding fp32 sums taken in other orders, plus the reference's own rounding when autograd adds two bf16
# gradients (prenorm).
TOL = {torch.float32: (2e-6, 2e-6), torch.bfloat16: (2 ** -6, 2 ** -6)}
ROWS = 150  # not a multiple of any tile height used below


def rounded_sum(x, r):
    """x + r in fp32, rounded to x's dtype (to nearest even, as the GPU's and the patched interpreter's casts)."""
    return (x.float() + r.float()).to(x.dtype)


def run(fn, x, weight, residual, prenorm, grads):
    """Forward + backward of fn with the given output gradients; returns outputs and input gradients."""
    for t in (x, weight, residual):
        if t is not None:
            t.grad = None
    out = fn(x, weight, residual=residual, prenorm=prenorm)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grads[:len(outs)])
    return [o.detach() for o in outs], x.grad, weight.grad, (residual.grad if residual is not None else None)


def make(shape, dtype, weight_dtype=torch.float32, residual=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    r = torch.randn(shape, generator=g).to(dtype).requires_grad_() if residual else None
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(weight_dtype).requires_grad_()
    grads = [torch.randn(shape, generator=g).to(dtype) for _ in range(2)]  # for y, and s when prenorm
    return x, r, w, grads


def check_against_reference(x, r, w, grads, prenorm):
    dtype = x.dtype
    rtol, atol = TOL[dtype]
    y, dx, dw, dr = run(rms_norm, x, w, r, prenorm, grads)

    # The reference, on the same s as the kernel (see the module doc); its gradient w.r.t. s is dx = dresidual.
    s_ref = (x.detach() if r is None else rounded_sum(x.detach(), r.detach())).requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    y_ref, ds_ref, dw_ref, _ = run(rms_norm_reference, s_ref, w_ref, None, prenorm, grads)

    torch.testing.assert_close(y[0], y_ref[0], rtol=rtol, atol=atol)
    if prenorm:
        assert y[1].dtype == dtype
        assert torch.equal(y[1], y_ref[1]), "s must be x + residual rounded to x's dtype, exactly"
    torch.testing.assert_close(dx, ds_ref, rtol=rtol, atol=atol)
    assert dx.dtype == dtype and dx.shape == x.shape
    if r is not None:
        torch.testing.assert_close(dr, ds_ref, rtol=rtol, atol=atol)
    assert dw.dtype == w.dtype and dw.shape == w.shape
    w_rtol = 1e-5 if w.dtype == torch.float32 else 2 ** -7  # summed in fp32 either way; bf16 rounds once at the end
    torch.testing.assert_close(dw, dw_ref, rtol=w_rtol, atol=w_rtol * dw_ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [64, 96, 256])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("prenorm", [False, True], ids=["y", "prenorm"])
def test_matches_reference(dtype, d, residual, prenorm):
    x, r, w, grads = make((ROWS, d), dtype, residual=residual)
    check_against_reference(x, r, w, grads, prenorm)


def test_shapes_cover_partial_tiles_and_the_program_loop():
    """The shapes above must reach the kernels' edge cases: a last tile with rows masked off, columns masked off
    (D=96), and backward programs that walk several tiles (some past the end)."""
    for d in (64, 96, 256):
        for backward in (False, True):
            bt, bd, _ = rmsnorm.tile_config(d, backward)
            assert ROWS % bt != 0 and ROWS > bt, (d, backward, bt)
    assert rmsnorm.tile_config(96, True)[1] == 128
    for d in (96, 256):
        bt = rmsnorm.tile_config(d, True)[0]
        tiles = -(-ROWS // bt)
        programs = rmsnorm.backward_programs(tiles, torch.device("cpu"), 8)
        assert tiles > programs and tiles % programs != 0, (d, tiles, programs)


@pytest.mark.parametrize("prenorm", [False, True], ids=["y", "prenorm"])
def test_3d_input_bf16_with_bf16_weight(prenorm):
    x, r, w, grads = make((3, 37, 96), torch.bfloat16, weight_dtype=torch.bfloat16)
    check_against_reference(x, r, w, grads, prenorm)


def test_fp32_input_with_bf16_weight():
    x, r, w, grads = make((2, 41, 64), torch.float32, weight_dtype=torch.bfloat16)
    check_against_reference(x, r, w, grads, prenorm=True)


@pytest.mark.parametrize("d", [6000, 8192])
def test_wide_rows_one_per_tile(d):
    """D up to 8192 (and not a power of 2 there): one row per tile."""
    x, r, w, grads = make((5, d), torch.bfloat16)
    check_against_reference(x, r, w, grads, prenorm=True)


def test_non_contiguous_inputs():
    """A transposed view (last dim contiguous, rows not) and a last dim with a stride: both are made contiguous."""
    x, r, w, grads = make((37, 2, 96), torch.float32)
    xt = x.transpose(0, 1)  # [2, 37, 96]: rows not evenly strided
    rt = torch.randn(2, 96, 37).transpose(1, 2).requires_grad_()  # last dim has stride 37
    assert not xt.is_contiguous() and rt.stride(-1) != 1
    gy, gs = (g.transpose(0, 1) for g in grads)
    y, s = rms_norm(xt, w, residual=rt, prenorm=True)
    torch.autograd.backward([y, s], [gy, gs])
    dx, dr, dw = x.grad.clone(), rt.grad.clone(), w.grad.clone()
    x.grad = rt.grad = w.grad = None
    y_ref, s_ref = rms_norm_reference(xt, w, residual=rt, prenorm=True)
    torch.autograd.backward([y_ref, s_ref], [gy, gs])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(dx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dr, rt.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, w.grad, rtol=1e-4, atol=1e-4)


def test_prenorm_gradient_of_s_only_and_of_y_only():
    """When only one of (y, s) reaches the loss, the other's gradient is None inside backward."""
    x, r, w, _ = make((50, 64), torch.float32)
    for use in ("y", "s"):
        for t in (x, r, w):
            t.grad = None
        y, s = rms_norm(x, w, residual=r, prenorm=True)
        ((y if use == "y" else s) * 1.5).sum().backward()
        got = x.grad.clone(), r.grad.clone(), (w.grad.clone() if w.grad is not None else None)
        for t in (x, r, w):
            t.grad = None
        y, s = rms_norm_reference(x, w, residual=r, prenorm=True)
        ((y if use == "y" else s) * 1.5).sum().backward()
        torch.testing.assert_close(got[0], x.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], r.grad, rtol=1e-5, atol=1e-5)
        if use == "s":
            assert torch.equal(got[0], torch.full_like(x, 1.5))
        else:
            torch.testing.assert_close(got[2], w.grad, rtol=1e-4, atol=1e-4)


def test_no_grad_forward_and_prenorm_without_residual():
    x, r, w, _ = make((20, 96), torch.float32)
    with torch.no_grad():
        y = rms_norm(x, w, residual=r)  # s is not stored when nothing needs gradients
        torch.testing.assert_close(y, rms_norm_reference(x, w, residual=r), rtol=1e-5, atol=1e-5)
    y, s = rms_norm(x, w, prenorm=True)
    assert s is x
    torch.testing.assert_close(y, rms_norm_reference(x, w), rtol=1e-5, atol=1e-5)


def test_wrong_weight_shape_is_a_clear_error():
    x = torch.randn(4, 64)
    for bad in (torch.ones(63), torch.ones(1, 64)):
        for fn in (rms_norm, rms_norm_reference):
            with pytest.raises(ValueError, match=r"weight has shape .* needs a 1-D weight of shape \(64,\)"):
                fn(x, bad)


def test_mismatched_residual_is_a_clear_error():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="residual must have x's shape and dtype"):
        rms_norm(x, torch.ones(64), residual=torch.randn(4, 64, dtype=torch.bfloat16))


def test_cpu_without_interpreter_takes_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    x, r, w, _ = make((8, 64), torch.float32)
    called = []
    monkeypatch.setattr(rmsnorm, "_forward", lambda *a, **k: called.append(1))
    y, s = rms_norm(x, w, residual=r, prenorm=True)
    assert not called
    torch.testing.assert_close(y, rms_norm_reference(x, w, residual=r), rtol=0, atol=0)


@pytest.mark.parametrize("dso", [True, False], ids=["dso", "nodso"])
@pytest.mark.parametrize("d", [96, 256])
def test_backward_launch_configs_give_the_same_gradients(dso, d):
    """bench/norm_bench.py --bwd-sweep times other launches of the backward kernel (tile height, warps, the next
    tile loaded ahead): each must give the default's ds bit for bit and its dweight up to summation order, with
    programs walking several tiles, some past the end."""
    g = torch.Generator().manual_seed(3)
    s2, dy2, dso2 = (torch.randn(ROWS, d, generator=g).to(torch.bfloat16) for _ in range(3))
    w = 1 + 0.2 * torch.randn(d, generator=g)
    rstd = torch.rsqrt(s2.float().pow(2).mean(-1) + 1e-6)
    base = rmsnorm.backward_config(d)
    ds0, dw0 = rmsnorm._backward(s2, w, rstd, dy2, dso2 if dso else None)
    for cfg in [base._replace(prefetch=not base.prefetch), rmsnorm.BackwardConfig(1, 4, 4, True),
                rmsnorm.BackwardConfig(2, 4, 2, False), rmsnorm.BackwardConfig(8, 8, 1, True),
                rmsnorm.BackwardConfig(1, 4, 4, True, 128)]:
        ds, dw = rmsnorm._backward(s2, w, rstd, dy2, dso2 if dso else None, config=cfg)
        assert torch.equal(ds, ds0), cfg
        if cfg.bt == base.bt:  # same tiles, same programs: the same partial sums in the same order
            assert torch.equal(dw, dw0), cfg
        else:
            torch.testing.assert_close(dw, dw0, rtol=1e-5, atol=1e-4)
