"""CUDA graphs of the training step's forward and backward (train.cuda_graphs).

GLA 340M's bf16 step on an H200 leaves the GPU idle ~9 ms per step in the forward pass: FLA's and our Python
launch kernels more slowly than the GPU runs them (BENCHMARKS.md, issue 10). A CUDA graph records one micro-
batch's forward and backward once and replays them with one launch, so the host no longer paces the GPU.

What is recorded: loss = model(x, labels).loss / micro-batches and its backward, reading x and labels from static
device buffers and the weights from train.precision=bf16's bf16 copies (MasterWeights.half_flat: fixed
addresses, refreshed from the fp32 masters before every step). The gradients land in tensors of the graph's
own memory; after each replay MasterWeights.accumulate() takes them into its fp32 buffers as it takes eager
gradients, and everything after (reduction over processes, clipping, the optimizer, checkpoints, validation)
runs eagerly as without graphs. So the numbers are the eager step's numbers: tests compare both paths.

Covered: train.precision=bf16 with parallel.mode none or ddp (MasterWeights' own all-reduce), fixed-shape
batches, activation checkpointing, gradient accumulation. Not covered (config errors naming the fix): FSDP2 (its
hooks gather and free parameters), autocast/fp32 precision, data.varlen (cu_seqlens vary per batch, and FLA
reads them on the host), train.compile. On a CPU the option is switched off with a log line, as train.compile
is (no CUDA graphs there).

One graph per micro-batch shape and count (a run has one); the first step of each runs `warmup` eager
passes on a side stream (kernel autotuning and allocator warm-up happen outside the capture), captures, and
replays. The captured pass holds its activations' memory for the rest of the run, as the eager step's peak does.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("trainer")

MAX_GRAPHS = 4  # shapes captured before further shapes run eagerly (a run has one shape)


def unsupported_reason(precision: str, parallel_mode: str, varlen: bool, compile: bool) -> str | None:
    """Why train.cuda_graphs cannot run with these settings (None: it can): the resolved train.precision,
    parallel.mode, data.varlen, train.compile. A CPU is not a reason: there the option is switched off with a
    log line, as train.compile is, so that one config serves both."""
    if precision != "bf16":
        return (f"train.cuda_graphs needs train.precision=bf16 (here {precision}): the graph replays the step over "
                f"MasterWeights' bf16 copies; set train.precision=bf16 (the GPU default) or train.cuda_graphs=false")
    if parallel_mode == "fsdp":
        return ("train.cuda_graphs does not cover parallel.mode=fsdp (FSDP2 gathers and frees parameters in hooks "
                "around every block); use parallel.mode=ddp or none, or train.cuda_graphs=false")
    if varlen:
        return ("train.cuda_graphs does not cover data.varlen=true (document boundaries change every batch and "
                "FLA reads them on the host); set data.varlen=false or train.cuda_graphs=false")
    if compile:
        return "train.cuda_graphs and train.compile are exclusive: set one of them to false"
    return None


class GraphedSteps:
    """The step's forward + backward as CUDA graphs over `prec` (a trainer.precision.MasterWeights).

    Use inside prec.compute() (the weights are the bf16 copies there), once per micro-batch of `parts`:
        loss, grads = graphs.forward_backward(x, labels, parts)  # loss / parts, a detached device scalar
        prec.accumulate(grads)  # the graph's gradients into the fp32 buffers
    forward_backward returns None for a shape past MAX_GRAPHS: the caller runs that micro-batch eagerly.
    """

    def __init__(self, model: torch.nn.Module, prec, device: torch.device, warmup: int = 2):
        self.model = model
        self.prec = prec
        self.device = device
        self.warmup = warmup
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = None  # one memory pool for all graphs (they never run at the same time)
        self.eager_shapes: set[tuple] = set()

    def forward_backward(self, x: torch.Tensor, labels: torch.Tensor, parts: int) -> tuple | None:
        key = (tuple(x.shape), tuple(labels.shape), x.dtype, labels.dtype, parts)
        g = self.graphs.get(key)
        if g is None:
            if len(self.graphs) >= MAX_GRAPHS:
                if key not in self.eager_shapes:
                    self.eager_shapes.add(key)
                    log.warning("train.cuda_graphs: %d shapes captured already; micro-batches of shape %s run "
                                "eagerly", MAX_GRAPHS, tuple(x.shape))
                return None
            g = self._capture(key, x, labels, parts)
        g.replay(x, labels)
        return g.loss, g.grads

    def _capture(self, key, x, labels, parts) -> "_Graph":
        params = self.prec.params
        static_x = torch.empty(x.shape, dtype=x.dtype, device=self.device)
        static_labels = torch.empty(labels.shape, dtype=labels.dtype, device=self.device)
        static_x.copy_(x, non_blocking=True)
        static_labels.copy_(labels, non_blocking=True)

        def body():
            loss = self.model(input_ids=static_x, labels=static_labels).loss / parts
            loss.backward()
            return loss.detach()

        # Eager passes first, on a side stream as PyTorch's capture rules ask: FLA's autotuners, cuBLAS handles
        # and the allocator settle outside the capture. Their gradients are dropped (the replay recomputes them).
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                body()
                for p in params:
                    p.grad = None
        torch.cuda.current_stream(self.device).wait_stream(side)

        for p in params:
            p.grad = None  # backward allocates the gradients inside the graph's pool: fixed addresses
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's threads may touch CUDA (pinned memory) while this thread captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            loss = body()
        if self.pool is None:
            self.pool = graph.pool()
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        g = _Graph(graph, static_x, static_labels, loss, grads)
        self.graphs[key] = g
        log.info("train.cuda_graphs: captured the forward + backward of a %s micro-batch (%d gradients)",
                 "x".join(map(str, x.shape)), sum(gr is not None for gr in grads))
        return g


class _Graph:
    def __init__(self, graph, static_x, static_labels, loss, grads):
        self.graph, self.static_x, self.static_labels = graph, static_x, static_labels
        self.loss, self.grads = loss, grads

    def replay(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        self.static_x.copy_(x, non_blocking=True)
        self.static_labels.copy_(labels, non_blocking=True)
        self.graph.replay()
