"""How a run holds and computes its numbers (train.precision).

  bf16      fp32 master weights and fp32 optimizer states (what the optimizer steps, checkpoints hold and
            the export writes), but forward and backward run on bf16 copies of the weights: bf16 activations
            and residual stream, half the bytes of every elementwise op, norm and cast of the autocast path.
            Each micro-batch's bf16 gradients are added into fp32 buffers; several processes all-reduce those
            fp32 buffers; the optimizer steps the fp32 weights. Megatron's mixed precision does the same; under
            FSDP2 it is MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32). The GPU default.
  autocast  fp32 weights under bf16 autocast: the weights are cast at every use, the residual stream is fp32.
  fp32      no reduced precision (the CPU default).

For parallel.mode none/ddp, bf16 swaps each parameter's storage (`p.data`) to its bf16 copy for the step's
forward and backward passes and back to the fp32 weight afterwards, so everything outside the step (optimizer,
clipping, checkpoints, validation, export) sees the same fp32 parameters as the other paths. DDP is not used
there: its buckets would take the bf16 gradients. MasterWeights reduces the fp32 buffer in buckets of its own
instead, as DDP does, while the last micro-batch's backward still runs: each parameter's gradient goes into the
buffer as soon as autograd has it (its bf16 gradient is freed then), and a bucket (a contiguous slice of the flat
buffer, about BUCKET_BYTES, parameters in reverse order, as backward produces them) is all-reduced asynchronously once
all its gradients are in; reduce() only waits for the last ones.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy

from trainer.config import ConfigError

CHOICES = ("auto", "bf16", "autocast", "fp32")
BUCKET_BYTES = 25 * 2**20  # MasterWeights' all-reduce buckets over several processes (DDP's default size)


def resolve(name: str, device: torch.device) -> str:
    """auto -> bf16 on GPUs, fp32 on CPUs."""
    if name not in CHOICES:
        raise ConfigError(f"train.precision={name!r}: use one of {list(CHOICES)}")
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def fsdp_policy(name: str):
    """FSDP2's mixed precision for a resolved precision name: bf16 compute with fp32 gradient reduction,
    or plain fp32 (autocast then runs over the fp32 weights)."""
    if name == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


class Precision:
    """fp32 weights, with or without bf16 autocast; also bf16 under FSDP2 (its policy does the casting).
    The hooks of a step: compute() around all micro-batches, autocast() around each forward, accumulate()
    after each backward, reduce() before clipping."""

    def __init__(self, name: str, device: torch.device):
        self.name = name
        self.device = device

    def autocast(self):
        if self.name == "autocast":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def eval_autocast(self):
        """Around validation's forward passes (FSDP2's bf16 policy casts by itself)."""
        return self.autocast()

    def compute(self):
        return contextlib.nullcontext()

    def reducing(self, last: bool):
        """Around each micro-batch's backward; `last`: the step's last micro-batch, whose backward may start the
        gradient reduction (MasterWeights over several processes)."""
        return contextlib.nullcontext()

    def accumulate(self, grads: list | None = None) -> None:
        pass

    def reduce(self) -> None:
        pass


class MasterWeights(Precision):
    """bf16 compute over fp32 master weights for one process or several (without DDP). See the module doc."""

    def __init__(self, model: torch.nn.Module, device: torch.device, group_size: int = 1,
                 bucket_bytes: int = BUCKET_BYTES):
        super().__init__("bf16", device)
        seen, self.params = set(), []
        for p in model.parameters():  # tied weights once
            if p.requires_grad and p.is_floating_point() and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        n = sum(p.numel() for p in self.params)
        self.grad_flat = torch.zeros(n, dtype=torch.float32, device=device)
        self.half_flat = torch.empty(n, dtype=torch.bfloat16, device=device)
        self.grads, self.halves, offsets = [], [], [0]
        for p in self.params:
            offset = offsets[-1]
            self.grads.append(self.grad_flat[offset:offset + p.numel()].view_as(p))
            self.halves.append(self.half_flat[offset:offset + p.numel()].view_as(p))
            offsets.append(offset + p.numel())
        self.group_size = group_size
        self._has_grad = [False] * len(self.params)
        self._overlap = False  # inside reducing(last=True) over several processes: the hooks below take gradients
        self._works = None  # that step's bucket all-reduces, until reduce() has waited for them
        if group_size > 1:  # every rank starts from rank 0's weights, as DDP does at construction
            for p in self.params:
                dist.broadcast(p.data, 0)
            self._make_buckets(bucket_bytes, offsets)

    def eval_autocast(self):
        """Validation runs outside the step, on the fp32 weights: under bf16 autocast."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @contextlib.contextmanager
    def compute(self):
        """The step's forward and backward passes run on bf16 copies of the current fp32 weights."""
        masters = [p.data for p in self.params]
        if any(m.dtype != torch.float32 for m in masters):
            raise RuntimeError("train.precision=bf16: the master weights must be fp32 outside the step")
        torch._foreach_copy_(self.halves, masters)
        self._has_grad = [False] * len(self.params)  # the buffers are written by accumulate() (copy, then add)
        for p, h in zip(self.params, self.halves):
            p.data = h
        try:
            yield
        finally:
            for p, m in zip(self.params, masters):
                p.grad = None
                p.data = m

    def _make_buckets(self, bucket_bytes: int, offsets: list[int]) -> None:
        """Buckets of parameters, last parameter first: bucket k holds parameters [lo, hi) and is the slice
        [offsets[lo], offsets[hi]) of the flat buffer. A hook on each parameter takes its gradient (the hook lives on
        the parameter object, so it survives compute()'s swaps of p.data)."""
        self._buckets, self._bucket_of, hi, size = [], [0] * len(self.params), len(self.params), 0
        for i in reversed(range(len(self.params))):
            size += self.params[i].numel() * self.grad_flat.element_size()
            if size >= bucket_bytes or i == 0:
                for j in range(i, hi):
                    self._bucket_of[j] = len(self._buckets)
                self._buckets.append((i, hi, self.grad_flat[offsets[i]:offsets[hi]]))
                hi, size = i, 0
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(lambda p, i=i: self._take(i, p))

    @contextlib.contextmanager
    def reducing(self, last: bool):
        if not (last and self.group_size > 1):
            yield
            return
        self._waiting = [hi - lo for lo, hi, _ in self._buckets]  # gradients each bucket still waits for
        self._taken = [[] for _ in self._buckets]
        self._took = [False] * len(self.params)
        self._next, self._works, self._overlap = 0, [], True
        try:
            yield
        finally:
            self._overlap = False

    def _take(self, i: int, p: torch.Tensor) -> None:
        """Parameter i's gradient is complete (last micro-batch, several processes): hold it for its bucket, then
        all-reduce every bucket that is complete, in bucket order (the same order on every rank)."""
        if not self._overlap or p.grad is None:
            return
        b = self._bucket_of[i]
        if self._took[i]:  # autograd runs a leaf's AccumulateGrad once a backward (reentrant checkpointing would not)
            raise RuntimeError(f"train.precision=bf16 over {self.group_size} processes: parameter {i} received a "
                               "second gradient in one backward pass; its bucket's reduction would miss it")
        self._took[i] = True
        self._taken[b].append((i, p.grad))
        p.grad = None
        self._waiting[b] -= 1
        while self._next < len(self._buckets) and self._waiting[self._next] == 0:
            self._launch(self._next)

    def _launch(self, b: int) -> None:
        """Bucket b's gradients into the fp32 buffer (a parameter without one this step: zeros), then its
        asynchronous all-reduce: the backward goes on meanwhile."""
        self._store([g for _, g in self._taken[b]], [i for i, _ in self._taken[b]])
        self._taken[b] = []
        lo, hi, flat = self._buckets[b]
        untouched = [self.grads[i] for i in range(lo, hi) if not self._has_grad[i]]
        if untouched:
            torch._foreach_zero_(untouched)
        self._works.append(dist.all_reduce(flat, async_op=True))
        self._next = b + 1

    def _store(self, grads: list, indices: list[int]) -> None:
        """Gradients into the fp32 buffers: a buffer's first of the step copied, later ones added."""
        first, first_src, more, more_src = [], [], [], []
        for i, g in zip(indices, grads):
            (more if self._has_grad[i] else first).append(self.grads[i])
            (more_src if self._has_grad[i] else first_src).append(g)
            self._has_grad[i] = True
        if first:
            torch._foreach_copy_(first, first_src)
        if more:
            torch._foreach_add_(more, more_src)

    def accumulate(self, grads: list | None = None) -> None:
        """After one micro-batch's backward: its bf16 gradients into the fp32 buffers. A buffer's first gradient
        of the step is copied in (one conversion kernel per group of tensors), later ones are added: no zeroing
        pass over the buffers, and with one micro-batch (the common case) no read of them either.
        `grads`: the gradients, in self.params' order, where they are not the parameters' .grad (a CUDA graph's
        static outputs, trainer.graphs); None entries are parameters without a gradient. After an overlapped
        backward (reducing(last=True)) the hooks have taken every gradient already."""
        taken, indices = [], []
        for i, p in enumerate(self.params):
            g = p.grad if grads is None else grads[i]
            if g is not None:
                taken.append(g)
                indices.append(i)
                p.grad = None
        self._store(taken, indices)

    def reduce(self) -> None:
        """After the last micro-batch (outside compute()): the fp32 gradients, averaged over the processes,
        become the fp32 weights' .grad."""
        if self._works is not None:  # reducing(last=True) ran (several processes)
            while self._next < len(self._buckets):  # buckets with a parameter that had no gradient this step
                self._launch(self._next)
            for work in self._works:
                work.wait()
            self._works = None
            self.grad_flat.div_(self.group_size)  # SUM then divide: gloo (CPU) has no AVG
            self._has_grad = [True] * len(self.params)  # summed over ranks: defined everywhere, as under DDP
        else:
            untouched = [g for g, has in zip(self.grads, self._has_grad) if not has]
            if untouched:  # no gradient this step: zeros in the buffer (they are summed over the processes)
                torch._foreach_zero_(untouched)
            if self.group_size > 1:  # the last micro-batch ran outside reducing() (a CUDA graph's replay)
                dist.all_reduce(self.grad_flat)
                self.grad_flat.div_(self.group_size)
                self._has_grad = [True] * len(self.params)
        for p, g, has in zip(self.params, self.grads, self._has_grad):
            p.grad = g if has else None
