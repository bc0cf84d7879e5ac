"""Timing of one GPU kernel call, shared by bench/norm_bench.py and bench/elementwise_bench.py.

median_ms(fn, ...) queues `batch` calls of fn between two CUDA events, `iters` times, and returns the median
milliseconds per call. Before each timed batch the GPU sleeps ~25 ms (torch.cuda._sleep) so that the host has
queued the whole batch before the first call starts: the time is the kernels', not Python's launch rate
(sleep=False measures the launch-bound rate instead)."""
from __future__ import annotations

import statistics

import torch


def median_ms(fn, warmup: int, iters: int, batch: int, sleep: bool = True) -> float:
    for _ in range(warmup):
        for _ in range(batch):
            fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if sleep:
            torch.cuda._sleep(50_000_000)  # ~25 ms at ~2 GHz: longer than queueing the batch takes
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / batch)
    return statistics.median(times)
