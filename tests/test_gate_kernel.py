"""models/kernels/gate.py under the Triton interpreter: GLA's low-rank gate after its first projection,
logsigmoid(a @ W^T + b) / n, forward and every gradient, against float64 math.

fp32 inputs are checked tightly. bf16 outputs within about one bf16 ulp of the exact value (the kernel rounds once,
to nearest even as on a GPU: models/cpu_triton.py); dW, whose products take dpre rounded
to bf16 (as the GEMMs this kernel replaces did), within two ulps of its largest value.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see models/cpu_triton.py)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import cpu_triton  # noqa: E402

cpu_triton.enable()

from models.kernels import gate  # noqa: E402
from models.kernels.gate import low_rank_gate, low_rank_gate_reference  # noqa: E402

BF16_ULP = 2 ** -7


def operands(M, R, N, dtype, bias=True, stride_pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(M, R + stride_pad, generator=g).to(dtype)
    a = wide[:, :R].requires_grad_() if not stride_pad else wide[:, stride_pad:].detach().requires_grad_()
    w = (torch.randn(N, R, generator=g) / R ** 0.5 * 3).to(dtype).requires_grad_()
    b = torch.randn(N, generator=g).to(dtype).requires_grad_() if bias else None
    dy = torch.randn(M, N, generator=g).to(dtype)
    return a, w, b, dy


def exact(a, w, b, dy, n):
    """Forward and gradients in float64."""
    leaves = [t.detach().double().requires_grad_() for t in (a, w, b) if t is not None]
    pre = F.linear(leaves[0], leaves[1], leaves[2] if b is not None else None)
    y = F.logsigmoid(pre) / n
    y.backward(dy.double())
    return [y.detach()] + [t.grad for t in leaves]


def kernel(a, w, b, dy, n):
    y = low_rank_gate(a, w, b, n)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in (a, w, b) if t is not None]


def close(got, want, rel_max, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = (got.double() - want).abs().max().item()
    assert err <= rel_max * want.abs().max().item() + 1e-12, f"{what}: max abs diff {err:.3g}"


@pytest.mark.parametrize("M,R,N,bias,stride_pad", [
    (300, 16, 96, True, 0),     # rows and gate columns not multiples of the tiles
    (128, 16, 512, True, 0),    # GLA 340M's gate width
    (77, 8, 40, False, 0),      # a rank below tl.dot's 16 (padded), no bias
    (200, 16, 64, True, 48),    # a row-strided a: a column slice of a wider tensor, as models/fused.py passes it
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_and_gradients_match_exact_math(M, R, N, bias, stride_pad, dtype):
    a, w, b, dy = operands(M, R, N, dtype, bias, stride_pad)
    got = kernel(a, w, b, dy, 16.0)
    want = exact(a, w, b, dy, 16.0)
    names = ["gk", "da", "dW", "db"][:len(got)]
    assert [t.dtype for t in got] == [dtype] * len(got)
    if dtype == torch.float32:
        for name, x, y in zip(names, got, want):
            close(x, y, 1e-5, name)
        return
    y, da, dw, *db = got
    # one rounding of the exact value (plus the bf16 rounding of the inputs themselves: compare with exact math on
    # the bf16 inputs, which `exact` does)
    err = (y.double() - want[0]).abs()
    assert (err <= 2 * BF16_ULP * want[0].abs() + 1e-30).all(), f"gk: worst {err.max().item():.3g}"
    close(da, want[1], 2 * BF16_ULP, "da")
    close(dw, want[2], 2 * BF16_ULP, "dW")
    if db:
        close(db[0], want[3], 2 * BF16_ULP, "db")


def test_reference_is_the_same_math():
    a, w, b, dy = operands(50, 16, 32, torch.float32)
    want = exact(a, w, b, dy, 8.0)
    y = low_rank_gate_reference(a, w, b, 8.0)
    y.backward(dy)
    for name, x, ref in zip(["gk", "da", "dW", "db"], [y.detach(), a.grad, w.grad, b.grad], want):
        close(x, ref, 1e-5, name)


def test_cpu_without_the_interpreter_and_wide_ranks_take_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(gate._LowRankGateFunction, "apply", lambda *a: calls.append(1))
    a, w, b, _ = operands(10, 16, 32, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not gate.covers(a, w)
    low_rank_gate(a, w, b, 16.0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    wide_a, wide_w, wide_b, _ = operands(10, gate.MAX_RANK + 1, 32, torch.float32)
    assert not gate.covers(wide_a, wide_w)
    low_rank_gate(wide_a, wide_w, wide_b, 16.0)
    assert calls == []


def test_bad_arguments_are_named():
    a, w, b, _ = operands(10, 16, 32, torch.float32)
    with pytest.raises(ValueError, match="normalizer must be finite and non-zero"):
        low_rank_gate(a, w, b, 0.0)
    with pytest.raises(ValueError, match=r"weight must be \[N, 16\]"):
        low_rank_gate(a, w[:, :8], b, 16.0)
    with pytest.raises(ValueError, match=r"bias must have shape \(32,\)"):
        low_rank_gate(a, w, b[:4], 16.0)
    with pytest.raises(ValueError, match="share dtype and device"):
        low_rank_gate(a, w.double(), b, 16.0)


@pytest.mark.parametrize("config", [(64, 32, 4, 64), (32, 64, 4, 0), (128, 64, 8, 128), (64, 32, 4, 64, True),
                                    (128, 64, 8, 0, True), (128, 64, 8, 0, False, 128)],
                         ids=["column-groups", "one-group", "wide-groups", "column-groups-fma", "fma", "maxnreg"])
def test_backward_launch_configurations_give_the_same_gradients(config):
    """bench/gla_check.py --sweep times other launches: each gives the default's gradients (within fp32 summation
    order: the column groups' partial da sums add in another order)."""
    a, w, b, dy = operands(300, 16, 96, torch.float32)
    a2 = a.detach()
    want = gate.low_rank_gate_backward(a2, w.detach(), b.detach(), dy, 1 / 16)
    got = gate.low_rank_gate_backward(a2, w.detach(), b.detach(), dy, 1 / 16, config=config)
    for name, x, y in zip(["da", "dW", "db"], got, want):
        assert x.dtype == y.dtype, name
        close(x, y.double(), 1e-6, name)


@pytest.mark.parametrize("config", [(64, 32, 4), (32, 64, 4, True), (128, 64, 8, True)], ids=["dot", "fma", "fma-wide"])
@pytest.mark.parametrize("R", [16, 8])
def test_forward_launch_configurations_give_the_same_gate(config, R):
    """The forward at other launches, with the pre-activation as rank-one fp32 updates (fma) or tl.dot: the same
    values within fp32 summation order."""
    a, w, b, _ = operands(300, R, 96, torch.float32)
    want = gate.low_rank_gate_forward(a.detach(), w.detach(), b.detach(), 1 / 16)
    got = gate.low_rank_gate_forward(a.detach(), w.detach(), b.detach(), 1 / 16, config=config)
    close(got, want.double(), 1e-6, "gk")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_approximate_log_gives_logsigmoid_to_the_outputs_precision(dtype, monkeypatch):
    """gate.LOG = "approx": log1p by a series below 2^-6 and log2(1 + t) above it (on a GPU lg2.approx.f32, here
    tl.log2). Against float64 at pre-activations over the whole range (|x| to 60: t from 1 down to 1e-26, both sides
    of the series' threshold at |x| = 4.159), elementwise: within 2^-15 of each value in fp32, one bf16 ulp in bf16.
    The pre-activation is the bias (a zero product), one gate column per value."""
    monkeypatch.setattr(gate, "LOG", "approx")
    x = torch.cat([torch.linspace(-60, 60, 4000, dtype=torch.float64),
                   torch.tensor([0.0, 1e-8, -1e-8, 4.158, 4.159, 4.16, -4.158, -4.159, -4.16], dtype=torch.float64)])
    bias = x.to(dtype)
    a, w = torch.zeros(3, 16, dtype=dtype), torch.zeros(len(x), 16, dtype=dtype)
    y = gate.low_rank_gate_forward(a, w, bias, 1 / 16)
    want = (F.logsigmoid(bias.double()) / 16).expand(3, -1)
    err = (y.double() - want).abs()
    bound = (2 ** -15 if dtype == torch.float32 else BF16_ULP) * want.abs() + 1e-30
    assert (err <= bound).all(), f"worst {(err / want.abs()).max().item():.3g} relative"
    exact = gate.low_rank_gate_forward(a, w, bias, 1 / 16, log="exact")
    assert not torch.equal(exact, y) or dtype == torch.bfloat16  # fp32 shows the approximation is the one that ran
    with pytest.raises(ValueError, match="log='fast': use one of"):
        gate.low_rank_gate_forward(a, w, bias, 1 / 16, log="fast")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_approximate_log_model_gradients_match_exact_math(dtype, monkeypatch):
    """The forward-and-gradients check above with gate.LOG = "approx" (GLA 340M's gate width)."""
    monkeypatch.setattr(gate, "LOG", "approx")
    test_forward_and_gradients_match_exact_math(128, 16, 512, True, 0, dtype)
