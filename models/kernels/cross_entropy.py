"""The LM head and its cross-entropy loss as one autograd function, the logits' gradient written in the forward
(issue 10).

Why: FLA's fused cross entropy reads the [tokens, vocab] logits once in its forward (the loss) and again in its
backward, where it writes their gradient: three passes over a tensor of 2.1 GB at GLA 340M's batch 16 (32k tokens x
32000 entries, bf16); 2.06 ms of an H200 step in the profile. Here one kernel reads each row, computes its
log-sum-exp and loss, and writes the row's gradient over the logits in place, reading the row a second time while it
should still be in L2.

Measured (H100, BENCHMARKS.md, 2026-12-07): the kernel alone 1.70-1.96 ms by launch against FLA's loss alone 4.13 ms
(up to 2.4x), but the whole head (GEMM, loss, backward GEMMs) at best 1.040x FLA's (0.43 ms a step at batch 16) and
the training step unchanged within its noise (0.997x median, 1.004x mean with the first launch). So `models/fused.py`
keeps FLA's loss by default (`install(loss="ours")` selects this one).

The gradient the kernel writes is d(loss)/d(logits) for the loss as returned (mean over the labelled tokens, or their
sum). The gradient flowing into the loss (1 for a plain `loss.backward()`, 1/k for a loss divided over k
micro-batches) is not known in the forward; it multiplies the two small products of the backward instead
(d hidden = dlogits @ W and dW = dlogits^T @ hidden, [tokens, hidden] and [vocab, hidden]), so no pass over the
logits is added for it. This is why the LM head's matrix product is inside the function: the logits never leave it.
Nothing of the logits stays alive but their gradient (the same bytes FLA's loss keeps for its backward).

What it computes per row i with label y_i (fp32 math, the logits' dtype in storage):
    lse_i = log(sum_j exp(z_ij)),  loss_i = lse_i - z_iy   (0 where y_i is ignore_index)
    dz_ij = (softmax(z_i)_j - [j == y_i]) * scale          (0 where y_i is ignore_index)
with scale = 1 / (number of labelled rows) for reduction "mean", 1 for "sum". A label outside [0, vocab) that is not
ignore_index raises before the kernel runs, on a CPU and, at the cost of a host sync, on a GPU with
CE_CHECK_LABELS=1 (`_check_labels`).

Runs under the Triton interpreter on CPU (tests, `models/cpu_triton.py`); a CPU tensor without the interpreter takes
`linear_cross_entropy_reference`, plain PyTorch.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from models import kernels
from models.kernels.rmsnorm import backward_programs

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum")


class Launch(NamedTuple):
    """BLOCK vocabulary entries per loop step, num_warps per program, programs per SM (each program walks rows
    pid, pid + programs, ...: few rows in flight keeps a row in L2 between its two reads), and whether each loop step
    loads the next block before its reductions (prefetch: two blocks in flight per program)."""
    block: int
    num_warps: int
    per_sm: int
    prefetch: bool = False


def launch_from_text(text: str) -> Launch:
    """"4096,8,2" or "4096,8,2,1" -> Launch(4096, 8, 2[, True]): CE_LAUNCH in the environment picks another launch
    without editing this file (bench sweeps, `python -m models.kernels.cross_entropy`)."""
    try:
        values = [int(v) for v in text.split(",")]
        if len(values) not in (3, 4):
            raise ValueError
    except ValueError:
        raise ValueError(f"CE_LAUNCH={text!r}: give BLOCK,num_warps,programs_per_SM[,prefetch 0|1], e.g. "
                         "4096,8,4") from None
    block, warps, per_sm, *prefetch = values
    if (block & (block - 1) or block < 16 or warps not in (1, 2, 4, 8, 16, 32) or per_sm < 1
            or prefetch not in ([], [0], [1])):
        raise ValueError(f"CE_LAUNCH={text!r}: BLOCK a power of 2 >= 16, num_warps a power of 2 <= 32, "
                         "programs per SM >= 1, prefetch 0 or 1")
    return Launch(block, warps, per_sm, bool(prefetch and prefetch[0]))


# the fastest of _gpu_check's sweeps on an H100 (2026-12-07: 1.70-1.72 ms for [32768, 32000] bf16, 2.4x FLA's loss
# alone; the whole head 1.040x FLA's)
LAUNCH = launch_from_text(os.environ.get("CE_LAUNCH") or "16384,16,2")


@triton.jit
def _cross_entropy_kernel(Z, LABELS, LOSS, NVALID, V, stride, n_rows, rows_per_program, ignore_index,
                          BLOCK: tl.constexpr, MEAN: tl.constexpr, PREFETCH: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    if MEAN:  # 1 / labelled rows, counted on the device (no host sync)
        scale = 1.0 / tl.load(NVALID).to(tl.float32)
    else:
        scale = 1.0
    offs = tl.arange(0, BLOCK)
    for r in range(0, rows_per_program):
        row = pid + r * programs
        if row < n_rows:
            z_row = Z + row.to(tl.int64) * stride
            label = tl.load(LABELS + row).to(tl.int32)
            # pass 1: running max and sum of exp over the row, one block-wide max per step
            m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
            total = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
            if PREFETCH:
                z_next = tl.load(z_row + offs, mask=offs < V, other=float("-inf"))
            for start in range(0, V, BLOCK):
                cols = start + offs
                if PREFETCH:  # this block was loaded a step ago; the next one is on its way during the math
                    z = z_next.to(tl.float32)
                    z_next = tl.load(z_row + cols + BLOCK, mask=cols + BLOCK < V, other=float("-inf"))
                else:
                    z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(z, axis=0))
                total = total * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
                m = m_new
            lse = m + tl.log(total)
            labelled = label != ignore_index
            z_label = tl.load(z_row + label, mask=labelled, other=0.0).to(tl.float32)
            tl.store(LOSS + row, tl.where(labelled, lse - z_label, 0.0))
            g_scale = tl.where(labelled, scale, 0.0)
            # pass 2: the row again (from L2 where it stayed), its gradient written over it
            if PREFETCH:
                z_next = tl.load(z_row + offs, mask=offs < V, other=0.0)
            for start in range(0, V, BLOCK):
                cols = start + offs
                if PREFETCH:
                    z = z_next.to(tl.float32)
                    z_next = tl.load(z_row + cols + BLOCK, mask=cols + BLOCK < V, other=0.0)
                else:
                    z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
                p = tl.exp(z - lse)
                g = tl.where(cols == label, p - 1.0, p) * g_scale
                tl.store(z_row + cols, g.to(Z.dtype.element_ty), mask=cols < V)


def _use_kernel(x: torch.Tensor) -> bool:
    return kernels.runs_triton(x)


def loss_and_grad_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   reduction: str = "mean", launch: Launch | None = None) -> torch.Tensor:
    """The loss (fp32 scalar) of contiguous [N, V] logits against [N] labels; the logits are overwritten with the
    loss's gradient. See the module doc."""
    n, v = logits.shape
    block, num_warps, per_sm, prefetch = launch or LAUNCH
    block = min(block, triton.next_power_of_2(v))
    labelled = labels != ignore_index
    nvalid = labelled.sum()
    row_loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        programs = backward_programs(n, logits.device, num_warps, per_sm)  # per_sm per SM, at most one a row
        _cross_entropy_kernel[(programs,)](logits, labels, row_loss, nvalid, v, logits.stride(0), n,
                                           triton.cdiv(n, programs), ignore_index, BLOCK=block,
                                           MEAN=reduction == "mean", PREFETCH=bool(prefetch), num_warps=num_warps)
    total = row_loss.sum()
    return total / nvalid if reduction == "mean" else total


def _check(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r}: use one of {REDUCTIONS}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not "
                         "match: weight must be [vocab, hidden] with hidden's last dimension")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} must have hidden's shape without its "
                         f"last dimension, {tuple(hidden.shape[:-1])}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"linear_cross_entropy: labels must be int32 or int64, got {labels.dtype}")


def _check_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """An out-of-range label would read outside its row: refuse it, as torch's cross entropy does (one host sync, so
    on a GPU only under CE_CHECK_LABELS=1: the trainer's labels are token ids of the shards' tokenizer, whose vocabulary
    the run checked to fit the model's when it started, and the embedding lookup has read each of them before)."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"linear_cross_entropy: label {int(labels[i])} at position {i} is outside the vocabulary "
                         f"[0, {vocab}) and is not ignore_index ({ignore_index})")


class _LinearCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction):
        h2 = hidden.reshape(-1, hidden.shape[-1])
        labels1 = labels.reshape(-1)
        if labels1.device.type == "cpu" or os.environ.get("CE_CHECK_LABELS") == "1":
            _check_labels(labels1, weight.shape[0], ignore_index)
        dlogits = torch.mm(h2, weight.t())  # the logits, then their gradient in the same storage
        loss = loss_and_grad_(dlogits, labels1, ignore_index, reduction)
        ctx.save_for_backward(h2, weight, dlogits)
        ctx.hidden_shape = hidden.shape
        return loss

    @staticmethod
    def backward(ctx, dloss):
        h2, weight, dlogits = ctx.saved_tensors
        dhidden = dweight = None
        if ctx.needs_input_grad[0]:
            dhidden = torch.mm(dlogits, weight).mul_(dloss.to(h2.dtype)).view(ctx.hidden_shape)
        if ctx.needs_input_grad[1]:
            dweight = torch.mm(dlogits.t(), h2).mul_(dloss.to(weight.dtype))
        return dhidden, dweight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
    """cross_entropy(hidden @ weight^T, labels) over all positions, ignoring `ignore_index` labels: the LM head and
    its loss (no bias). hidden [..., D], weight [V, D], labels [...]. Returns an fp32 scalar. See the module doc."""
    _check(hidden, weight, labels, reduction)
    if not _use_kernel(hidden):
        return linear_cross_entropy_reference(hidden, weight, labels, ignore_index, reduction)
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, reduction)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
    """Plain PyTorch (logits in hidden's dtype, the loss in fp32): the tests' reference and the CPU path."""
    _check(hidden, weight, labels, reduction)
    logits = F.linear(hidden, weight).reshape(-1, weight.shape[0])
    return F.cross_entropy(logits.float(), labels.reshape(-1).long(), ignore_index=ignore_index, reduction=reduction)


def _gpu_check(n: int = 32768, d: int = 1024, v: int = 32000, iters: int = 20, sweep: bool = True) -> None:
    """On a GPU, GLA 340M's head at batch 16 (n tokens, hidden d, vocabulary v, bf16): the loss kernel against FLA's
    fused cross entropy on the same logits (its forward + backward, which writes the gradient over them too), per
    launch, values compared; then the whole head (GEMM, loss, backward GEMMs) both ways. CUDA events, median of
    `iters`. Prints one line per case and one JSON line per launch (`CE {...}`)."""
    import json

    from fla.modules import FusedCrossEntropyLoss

    from models.kernels.gla_intra import _median_ms
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run under the interpreter, small sizes
    dt = torch.bfloat16
    torch.manual_seed(0)
    hidden = torch.randn(n, d, device=dev, dtype=dt)
    weight = torch.randn(v, d, device=dev, dtype=dt) * d ** -0.5
    labels = torch.randint(0, v, (n,), device=dev)
    labels[::97] = IGNORE_INDEX
    logits = hidden @ weight.t()
    fla_loss = FusedCrossEntropyLoss(inplace_backward=True) if dev == "cuda" else torch.nn.CrossEntropyLoss()
    z = logits.clone().requires_grad_()
    ref_loss = fla_loss(z, labels)
    ref_loss.backward()
    ref_grad = z.grad.clone()
    gigabytes = n * v * logits.element_size() / 1e9

    def fla_loss_step():  # the gradient lands over z's values: later calls read gradients as logits (same time)
        z.grad = None
        fla_loss(z, labels).backward()

    t_fla = _median_ms(fla_loss_step, iters, dev)
    print(f"FLA fused cross entropy, forward + backward: {t_fla:.3f} ms ({3 * gigabytes / t_fla:.2f} TB/s for "
          f"its read, read and write of {gigabytes:.2f} GB)", flush=True)

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

    launches = [LAUNCH]
    if sweep:
        # 2026-12-07 (H100): 16384,16,2 1.70 ms, 8192,16,2 + prefetch 1.80 ms, 8192,16,2 1.95 ms, 32768,16,2 1.88 ms,
        # 16384,16,2 + prefetch 2.57 ms, 4096,16,1 3.34 ms (BENCHMARKS.md)
        launches += [Launch(*c) for c in [(8192, 16, 2), (8192, 16, 2, True), (8192, 16, 4, True), (16384, 32, 2),
                                          (16384, 16, 4), (32768, 16, 2), (4096, 8, 8, True), (8192, 8, 2)]
                     if Launch(*c) != LAUNCH]
    work = logits.clone()
    for launch in launches:
        row = {"launch": ",".join(str(int(v)) for v in launch)}
        try:
            buf = logits.clone()
            loss = loss_and_grad_(buf, labels, launch=launch)
            t = _median_ms(lambda: loss_and_grad_(work, labels, launch=launch), iters, dev)
            row.update(ms=round(t, 4), tbps=round(2 * gigabytes / t, 2), vs_fla=round(t_fla / t, 3),
                       loss_diff=abs(loss.item() - ref_loss.item()), grad_diff=rel(buf, ref_grad))
        except Exception as e:  # a launch that does not compile is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        print("CE " + json.dumps(row), flush=True)

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()

    def fla_head():
        h.grad = w.grad = None
        fla_loss(h @ w.t(), labels).backward()

    def our_head():
        h.grad = w.grad = None
        linear_cross_entropy(h, w, labels).backward()

    fla_head()
    dh, dw = h.grad.clone(), w.grad.clone()
    our_head()
    t_fla_head, t_our_head = _median_ms(fla_head, iters, dev), _median_ms(our_head, iters, dev)
    print(f"the head (GEMM, loss, backward GEMMs): FLA's {t_fla_head:.3f} ms, ours {t_our_head:.3f} ms "
          f"({t_fla_head / t_our_head:.3f}x); d hidden differs by {rel(h.grad, dh):.2e}, d weight by "
          f"{rel(w.grad, dw):.2e} of their largest values", flush=True)


if __name__ == "__main__":
    _gpu_check()
