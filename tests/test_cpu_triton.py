"""models/cpu_triton.py's bfloat16 under the Triton interpreter: what a kernel computes on bf16 values is what a GPU
computes (and torch on a CPU): products of bf16 values in fp32, arithmetic in fp32 rounded back to bf16, casts to bf16
rounded to nearest even. Unpatched, triton 3.9's interpreter computes on the values' uint16 bits (every test here
fails there: a bf16 tl.dot is ~1e13 off, a cast truncates)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see models/cpu_triton.py)

import torch  # noqa: E402

from models import cpu_triton  # noqa: E402

cpu_triton.enable()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _dot_kernel(A, B, C, N: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(A + i[:, None] * N + i[None, :])
    b = tl.load(B + i[:, None] * N + i[None, :])
    tl.store(C + i[:, None] * N + i[None, :], tl.dot(a, b))


@triton.jit
def _cast_kernel(X, Y, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(Y + i, tl.load(X + i).to(tl.bfloat16))


@triton.jit
def _arith_kernel(A, B, OUT, N: tl.constexpr):
    """bf16 (op) bf16 stays bf16 in Triton's typing: OUT rows are a * b + a, a - b, a / b (fp32, as Triton types
    it), exp(a), -a, max(a, b) elementwise."""
    i = tl.arange(0, N)
    a = tl.load(A + i)
    b = tl.load(B + i)
    tl.store(OUT + i, a * b + a)
    tl.store(OUT + N + i, a - b)
    tl.store(OUT + 2 * N + i, (a / b).to(tl.bfloat16))
    tl.store(OUT + 3 * N + i, tl.exp(a.to(tl.float32)).to(tl.bfloat16))
    tl.store(OUT + 4 * N + i, -a)
    tl.store(OUT + 5 * N + i, tl.maximum(a, b))


@triton.jit
def _sum_kernel(A, OUT, N: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(A + i[:, None] * N + i[None, :])  # [N, N]
    tl.store(OUT + i, tl.sum(a, axis=1))  # bf16 in, bf16 out: Triton keeps the dtype
    tl.store(OUT + N + i, tl.sum(a * a, axis=0))


def bf16(n, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_bf16_dot_multiplies_the_values_in_fp32():
    a, b = bf16(256, 1).view(16, 16), bf16(256, 2).view(16, 16)
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, N=16)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-6, atol=1e-6)


def test_cast_to_bf16_rounds_to_nearest_even():
    # ties (1 + 2^-8 lies halfway between two bf16 values), values just above a tie, negatives, and NaN
    x = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -(1 + 2 ** -8 + 2 ** -20), 3.14159,
                      -2.71828, 1e-30, 65504.0, float("inf"), float("nan"), 0.0, -0.0, 1.0, 2.0, 1e30, -1e-3])
    y = torch.empty(16, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, N=16)
    want = x.to(torch.bfloat16)
    assert torch.equal(y[~x.isnan()].view(torch.int16), want[~x.isnan()].view(torch.int16))
    assert y[x.isnan()].isnan().all()


def test_bf16_arithmetic_is_computed_on_the_values():
    a, b = bf16(64, 3), bf16(64, 4)
    b = torch.where(b.abs() < 0.1, torch.ones_like(b), b)
    out = torch.empty(6 * 64, dtype=torch.bfloat16)
    _arith_kernel[(1,)](a, b, out, N=64)
    out = out.view(6, 64)
    assert torch.equal(out[0], a * b + a)  # torch's CPU bf16 ops: fp32 math, rounded to bf16 after each op
    assert torch.equal(out[1], a - b)
    torch.testing.assert_close(out[2], (a.float() / b.float()).bfloat16(), rtol=2 ** -7, atol=0)
    torch.testing.assert_close(out[3], a.float().exp().bfloat16(), rtol=2 ** -7, atol=0)
    assert torch.equal(out[4], -a)
    assert torch.equal(out[5], torch.maximum(a, b))


def test_bf16_sum_adds_pairs_rounding_each_to_bf16():
    """Row 0: 256 and seven ones. Pairs rounded to bf16 (spacing 2 at 256): 257 -> 256 (a tie, to even), then 258 and
    4, then 262; one rounding of the exact 263 would give 264. Row 1: values whose every partial sum is exact."""
    a = torch.zeros(8, 8, dtype=torch.bfloat16)
    a[0] = torch.tensor([256.0, 1, 1, 1, 1, 1, 1, 1])
    a[1] = torch.tensor([-3.5, -0.25, 2.0, -7.0, 1.5, 0.0, -0.5, 4.25])
    out = torch.empty(16, dtype=torch.bfloat16)
    _sum_kernel[(1,)](a, out, N=8)
    assert out[0].item() == 262.0 and out[1].item() == -3.5
    assert out[2:8].tolist() == [0.0] * 6
    torch.testing.assert_close(out[8:], (a.float() ** 2).sum(0).bfloat16(), rtol=2 ** -6, atol=0)
