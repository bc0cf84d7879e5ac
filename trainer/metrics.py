"""Per-step metrics: one JSON object a line in OUT/metrics.jsonl, the same scalars in TensorBoard (OUT/tb).

Only rank 0 writes. On resume at step k, lines for steps >= k (written by the killed run after its
last checkpoint) are dropped first, so the file always tells one consistent history.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys

import torch
from torch.utils.tensorboard import SummaryWriter


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan"/"inf": JSON has no such numbers
    return v


class MetricsLog:
    def __init__(self, out_dir: str, enabled: bool, start_step: int, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        if os.path.exists(self.path):
            self._drop_from(start_step)
        self.file = open(self.path, "a")
        if tensorboard:
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=start_step)

    def _drop_from(self, start_step: int) -> None:
        """Drop the lines of steps >= start_step. Written beside and renamed: a kill mid-way keeps the history."""
        with open(self.path) as f:
            lines = f.readlines()
        kept = [line for line in lines if line.strip() and _step_of(line) < start_step]
        if kept == lines:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line from a killed run: drop it


def read_metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
