"""models/kernels/mlp_gemm.py under the Triton interpreter: the gate/up GEMM with SwiGLU in its epilogue and the down
projection's input-gradient GEMM with SwiGLU's backward in its epilogue, against fp32 math and against the unfused
path they replace (cuBLAS-style GEMMs + models/kernels/swiglu.py's kernels); the MLP's autograd function; the fused
GLA blocks with install(mlp="gemm") against FLA's blocks.

fp32 only (written when the unpatched interpreter's bf16 tl.dot returned garbage; models/cpu_triton.py now computes
it as a GPU does): bf16 is checked on a GPU (`mlp_gemm._gpu_check`). Edge tiles: every size below is a non-multiple of its tile.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see models/cpu_triton.py)

import pytest  # noqa: E402
import torch  # noqa: E402

from models import cpu_triton  # noqa: E402

cpu_triton.enable()

from models.kernels import mlp_gemm, swiglu  # noqa: E402
from models.kernels.mlp_gemm import GemmConfig  # noqa: E402

M, D, N, O = 70, 48, 40, 36
SMALL = [GemmConfig(32, 32, 16, 2, 4, 2, tma=False), GemmConfig(32, 16, 32, 1, 4, 2, tma=True)]
IDS = ["pointers", "tma"]


def weights(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, generator=g)
    wg, wu = (torch.randn(N, D, generator=g) / D ** 0.5 for _ in range(2))
    wd = torch.randn(O, N, generator=g) / N ** 0.5
    b = torch.randn(O, generator=g) if bias else None
    dout = torch.randn(M, O, generator=g)
    return x, wg, wu, wd, b, dout


def close_to_max(got, want, rel, what=""):
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rel * want.double().abs().max().item() + 1e-12, f"{what}: max abs diff {err:.3g}"


@pytest.mark.parametrize("config", SMALL, ids=IDS)
def test_gate_up_swiglu_is_two_gemms_and_the_swiglu_kernel(config):
    x, wg, wu, *_ = weights()
    g, u, z = mlp_gemm.gate_up_swiglu(x, wg, wu, config=config)
    close_to_max(g, (x.double() @ wg.double().t()).float(), 1e-6, "gate")
    close_to_max(u, (x.double() @ wu.double().t()).float(), 1e-6, "up")
    assert torch.equal(z, swiglu.swiglu_forward(g, u)), "z is the SwiGLU kernel's result on the same gate and up"
    _, _, z_only = mlp_gemm.gate_up_swiglu(x, wg, wu, config=config, store_gu=False)
    assert torch.equal(z_only, z)


@pytest.mark.parametrize("config", SMALL, ids=IDS)
def test_down_grad_swiglu_is_the_gemm_and_the_swiglu_backward(config):
    x, wg, wu, wd, _, dout = weights()
    g, u = x @ wg.t(), x @ wu.t()
    dg, du, z = mlp_gemm.down_grad_swiglu(dout, wd, g, u, store_z=True, config=config)
    want_dg, want_du, want_z = swiglu.swiglu_backward(g, u, dout @ wd, store_z=True)
    close_to_max(dg, want_dg, 1e-6, "dgate")
    close_to_max(du, want_du, 1e-6, "dup")
    assert torch.equal(z, want_z)
    assert mlp_gemm.down_grad_swiglu(dout, wd, g, u, config=config)[2] is None


def test_row_strided_input_and_empty_batch():
    """A column slice of a wider tensor (rows a stride apart) as x; zero rows give empty outputs."""
    x, wg, wu, *_ = weights()
    wide = torch.cat([x, torch.randn(M, 16)], dim=1)[:, :D]
    assert not wide.is_contiguous()
    for config in SMALL:
        got = mlp_gemm.gate_up_swiglu(wide, wg, wu, config=config)
        want = mlp_gemm.gate_up_swiglu(x, wg, wu, config=config)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    g, u, z = mlp_gemm.gate_up_swiglu(x[:0], wg, wu)
    assert g.shape == u.shape == z.shape == (0, N)


@pytest.mark.parametrize("forward", ["fused", "cublas"])
@pytest.mark.parametrize("keep_z", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_mlp_matches_the_unfused_path(keep_z, bias, forward, monkeypatch):
    """Output and every gradient of mlp() against shared_linear + swiglu_linear (the fused path's MLP until now) on
    [2, 35, D] inputs; keep_z gives the same bits either way; FORWARD "cublas" (only the backward fused) too."""
    from models import fused
    monkeypatch.setattr(mlp_gemm, "FORWARD", forward)
    monkeypatch.setattr(mlp_gemm, "CONFIG", SMALL[0])
    monkeypatch.setattr(mlp_gemm, "BWD_CONFIG", SMALL[1])
    x, wg, wu, wd, b, dout = weights(bias=bias)
    x3, dout3 = x.view(2, 35, D), dout.view(2, 35, O)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x3, wg, wu, wd) + ((b,) if bias else ())]
        out = fn(*leaves[:4], leaves[4] if bias else None)
        out.backward(dout3)
        return [out.detach()] + [t.grad for t in leaves]

    def unfused(x_, wg_, wu_, wd_, b_):
        gate, up = fused.shared_linear(x_, [wg_, wu_])
        return swiglu.swiglu_linear(gate, up, wd_, b_)

    want = grads(unfused)
    got = grads(lambda *a: mlp_gemm.mlp(*a, keep_z=keep_z))
    for name, a, w in zip(["out", "dx", "dwg", "dwu", "dwd", "db"], got, want):
        close_to_max(a, w, 2e-6, name)
    other = grads(lambda *a: mlp_gemm.mlp(*a, keep_z=not keep_z))
    assert all(torch.equal(a, o) for a, o in zip(got, other))
    close_to_max(got[0], mlp_gemm.mlp_reference(x3, wg, wu, wd, b), 2e-6, "reference")


def test_mlp_partial_gradients():
    """Frozen weights get no gradient and cost no GEMM; frozen input likewise."""
    x, wg, wu, wd, _, dout = weights()
    xg = x.clone().requires_grad_()
    out = mlp_gemm.mlp(xg, wg, wu, wd.clone().requires_grad_())
    out.backward(dout)
    assert xg.grad is not None
    wdg = wd.clone().requires_grad_()
    mlp_gemm.mlp(x, wg, wu, wdg).backward(dout)
    close_to_max(wdg.grad, dout.t() @ swiglu.swiglu_forward(x @ wg.t(), x @ wu.t()), 1e-5, "dwd alone")


def test_mlp_errors_name_the_problem():
    x, wg, wu, wd, b, _ = weights()
    with pytest.raises(ValueError, match=r"wg and wu must both be \[intermediate, 48\]"):
        mlp_gemm.mlp(x, wg, wu[:, :10], wd)
    with pytest.raises(ValueError, match=r"wd must be \[out, 40\]"):
        mlp_gemm.mlp(x, wg, wu, wd.t())
    with pytest.raises(ValueError, match=r"bias must have shape \(36,\)"):
        mlp_gemm.mlp(x, wg, wu, wd, b[:3])
    with pytest.raises(ValueError, match="share one dtype"):
        mlp_gemm.mlp(x, wg.double(), wu, wd)


def test_fused_blocks_with_the_gemm_mlp_give_flas_loss_and_gradients(monkeypatch):
    """install(mlp="gemm"): every layer's MLP goes through mlp_gemm's kernels (checked to be called), and the model's
    loss and gradients are FLA's blocks' (document boundaries too)."""
    from models import build, cpu_torch, fused
    from tests.test_fused import CONFIG, assert_same, ids, loss_and_grads
    monkeypatch.setattr(mlp_gemm, "CONFIG", SMALL[0])
    monkeypatch.setattr(mlp_gemm, "BWD_CONFIG", SMALL[1])
    calls = []
    for name in ("gate_up_swiglu", "down_grad_swiglu"):
        real = getattr(mlp_gemm, name)
        monkeypatch.setattr(mlp_gemm, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    cpu_torch.install()
    try:
        config = build.load_config(CONFIG)
        stock = build.build_model(config, "cpu", seed=0)
        other = build.build_model(config, "cpu", seed=0)
        assert "in the MLP GEMMs" in fused.install(other, norm="ours", swiglu="ours", mlp="gemm")
        x = ids()
        assert_same(loss_and_grads(stock, x), loss_and_grads(other, x))
        assert sorted(calls) == ["down_grad_swiglu"] * 3 + ["gate_up_swiglu"] * 3
        cu = torch.tensor([0, 30, 95, 120])
        x = ids(batch=1, length=120)
        assert_same(loss_and_grads(stock, x, cu_seqlens=cu), loss_and_grads(other, x, cu_seqlens=cu))
        for kwargs, message in [({"swiglu": "fla", "mlp": "gemm"}, 'mlp="gemm" runs our SwiGLU kernels'),
                                ({"mlp": "big"}, "mlp='big': use one of"), ({"gate": "big"}, "gate='big': use one of")]:
            refused = build.build_model(config, "cpu", seed=0)
            with pytest.raises(ValueError, match=message):
                fused.install(refused, **kwargs)
            assert not fused.installed(refused), f"{kwargs}: a refused install left the model half switched"
    finally:
        cpu_torch.uninstall()


def test_launch_text_round_trips_and_bad_text_is_named():
    c = mlp_gemm.config_from_text("64,128,32,4,4,3,0")  # the 7-field form: one program per tile
    assert c == GemmConfig(64, 128, 32, 4, 4, 3, tma=False)
    c = GemmConfig(128, 64, 64, 8, 8, 4, True, 2)
    assert mlp_gemm.config_from_text(c.text) == c
    for bad in ("64,128", "128,128,64,8,8,3,1,4", "128,128,64,8,8,3,2,0", "a,b,c,d,e,f,g"):
        with pytest.raises(ValueError, match=r"use BM,BN,BK,GROUP_M,WARPS,STAGES,TMA\[,PERSISTENT\]"):
            mlp_gemm.config_from_text(bad)


PERSISTENT = [GemmConfig(32, 16, 16, 2, 4, 2, tma=True, persistent=1), GemmConfig(32, 16, 16, 2, 4, 2, tma=True, persistent=3),
              GemmConfig(16, 32, 32, 1, 4, 2, tma=True, persistent=2)]


@pytest.mark.parametrize("config", PERSISTENT, ids=["persistent", "not-flattened", "persistent-early-gu"])
def test_persistent_launches_give_the_one_tile_per_program_results_bit_for_bit(config):
    """One program per SM walking tiles (4 programs under the interpreter, 15-20 tiles here: each walks several,
    edge tiles included) computes what one program per tile does, in the same order: the same bits."""
    x, wg, wu, wd, _, dout = weights(3)
    plain = GemmConfig(config.bm, config.bn, config.bk, config.group_m, 4, 2, tma=False)
    for store_gu in (True, False):
        got = mlp_gemm.gate_up_swiglu(x, wg, wu, config=config, store_gu=store_gu)
        want = mlp_gemm.gate_up_swiglu(x, wg, wu, config=plain, store_gu=store_gu)
        for a, b in zip(got, want):
            assert (a is None and b is None) or torch.equal(a, b)
    g, u = x @ wg.t(), x @ wu.t()
    for store_z in (True, False):
        got = mlp_gemm.down_grad_swiglu(dout, wd, g, u, store_z=store_z, config=config)
        want = mlp_gemm.down_grad_swiglu(dout, wd, g, u, store_z=store_z, config=plain)
        for a, b in zip(got, want):
            assert (a is None and b is None) or torch.equal(a, b)

