"""models/kernels/cross_entropy.py: the LM head + cross entropy with the logits' gradient written in the forward, under
the Triton interpreter, against torch's cross entropy (loss, d hidden, d weight), with several vocabulary blocks per
row, ignored labels, both reductions and a gradient flowing into the loss other than 1.

bf16: the logits are bf16 on both sides and rounded from sums taken in other orders, so bf16 is compared with a
tolerance of a few bf16 ulps of the largest gradient."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see models/cpu_triton.py)

import pytest  # noqa: E402
import torch  # noqa: E402

from models import cpu_triton  # noqa: E402

cpu_triton.enable()

from models.kernels import cross_entropy as ce  # noqa: E402

VOCAB = 300  # not a power of 2: the last block of each row is masked


def make(dtype, rows=(3, 29), dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*rows, dim, generator=g).to(dtype).requires_grad_()
    weight = (0.7 * torch.randn(VOCAB, dim, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, rows, generator=g)
    labels[0, :4] = ce.IGNORE_INDEX
    labels[2, 7] = ce.IGNORE_INDEX
    return hidden, weight, labels


def loss_and_grads(fn, hidden, weight, labels, upstream=1.0, **kw):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, labels, **kw)
    (loss * upstream).backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("block, prefetch", [(64, False), (512, False), (64, True), (512, True)])
def test_matches_torch_in_fp32(reduction, block, prefetch, monkeypatch):
    """64: 5 blocks a row, the last one masked; 512: one masked block; prefetch: each block loaded a step ahead."""
    monkeypatch.setattr(ce, "LAUNCH", ce.Launch(block, 4, 1, prefetch))
    hidden, weight, labels = make(torch.float32)
    ours = loss_and_grads(ce.linear_cross_entropy, hidden, weight, labels, upstream=0.25, reduction=reduction)
    ref = loss_and_grads(ce.linear_cross_entropy_reference, hidden, weight, labels, upstream=0.25,
                         reduction=reduction)
    assert ours[0].dtype == torch.float32
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(ours[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_within_a_few_ulps():
    hidden, weight, labels = make(torch.bfloat16)
    loss, dh, dw = loss_and_grads(ce.linear_cross_entropy, hidden, weight, labels)
    ref_loss, ref_dh, ref_dw = loss_and_grads(ce.linear_cross_entropy_reference, hidden, weight, labels)
    assert dh.dtype == dw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    for a, b in ((dh, ref_dh), (dw, ref_dw)):
        assert (a.float() - b.float()).abs().max() <= 2 ** -6 * b.float().abs().max()


def test_the_logits_are_overwritten_by_their_gradient_and_ignored_rows_are_zero():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, VOCAB, generator=g)
    labels = torch.tensor([5, ce.IGNORE_INDEX, 0, VOCAB - 1, ce.IGNORE_INDEX, 17])
    z = logits.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(z, labels, ignore_index=ce.IGNORE_INDEX)
    ref.backward()
    loss = ce.loss_and_grad_(logits, labels, launch=ce.Launch(128, 4, 1))
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, z.grad, rtol=1e-5, atol=1e-8)
    assert logits[1].abs().max() == 0 and logits[4].abs().max() == 0
    everything_ignored = torch.full((2,), ce.IGNORE_INDEX)
    sums = ce.loss_and_grad_(torch.randn(2, VOCAB), everything_ignored, reduction="sum")
    assert sums.item() == 0


def test_bad_inputs_are_named():
    hidden, weight, labels = make(torch.float32)
    bad = labels.clone()
    bad[1, 2] = VOCAB
    with pytest.raises(IndexError, match=f"label {VOCAB} at position {29 + 2} is outside the vocabulary"):
        ce.linear_cross_entropy(hidden, weight, bad)
    with pytest.raises(ValueError, match="reduction='none': use one of"):
        ce.linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="labels .* must have hidden's shape"):
        ce.linear_cross_entropy(hidden, weight, labels[:, :5])
    with pytest.raises(ValueError, match="do not match"):
        ce.linear_cross_entropy(hidden, weight[:, :8], labels)
    for text in ("4096,8", "4096,8,4,1,1", "4096,8,x"):
        with pytest.raises(ValueError, match=f"CE_LAUNCH='{text}': give BLOCK,num_warps,programs_per_SM"):
            ce.launch_from_text(text)
    for text in ("3000,8,4", "4096,8,4,2"):
        with pytest.raises(ValueError, match="BLOCK a power of 2"):
            ce.launch_from_text(text)
    assert ce.launch_from_text("2048,4,8") == ce.Launch(2048, 4, 8, False)
    assert ce.launch_from_text("2048,4,8,1") == ce.Launch(2048, 4, 8, True)
