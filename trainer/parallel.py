"""Processes, devices and model wrapping: single process, DDP, or FSDP2 (one unit per block + the root).

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them we run as one process and never create a
process group. NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.config import ConfigError
from trainer.precision import fsdp_policy


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> Dist:
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 1:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return Dist(device=device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                                device_id=device if cuda else None)
    return Dist(rank=rank, world_size=world, local_rank=local, device=device, distributed=True)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.distributed:
        dist.barrier()


def blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks of an FLA/HF causal LM (model.model.layers, model.backbone.layers, ...)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and len(module) > 0:
            return module
    raise ConfigError(f"{type(model).__name__}: no `layers` ModuleList found to shard/compile per block "
                      f"(parallel.mode=fsdp and train.compile need one)")


def effective_mode(mode: str, world_size: int) -> str:
    """parallel.mode as it runs: "none" under several processes is ddp."""
    return "ddp" if mode == "none" and world_size > 1 else mode


def wrap(model: nn.Module, mode: str, d: Dist, reshard_after_forward: bool = True,
         precision: str = "fp32", defer_reduce: bool = False) -> nn.Module:
    """Shard or replicate `model` (already on d.device, or on meta for fsdp). `precision` is the resolved
    train.precision: under ddp, bf16 replicates without DDP (trainer.precision.MasterWeights all-reduces the
    fp32 gradients itself); under fsdp it picks FSDP2's MixedPrecisionPolicy. `defer_reduce`
    (parallel.fsdp_defer_reduce): under fsdp, gradient_sync() keeps the gradients of all but the last micro-batch
    unsharded instead of reduce-scattering each."""
    if effective_mode(mode, d.world_size) != mode:
        logging.getLogger("trainer").info("parallel.mode=none under %d processes: using ddp", d.world_size)
        mode = "ddp"
    if mode == "none":
        return model
    if mode == "ddp":
        if not d.distributed or precision == "bf16":
            return model  # one process: DDP would only add overhead; bf16: see above
        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if mode == "fsdp":
        if not d.distributed:  # FSDP2 needs a process group; a one-process group keeps the same code path
            _single_process_group(d)
        mesh = init_device_mesh(d.device.type, (d.world_size,))
        mp = fsdp_policy(precision)
        # fully_shard replaces each parameter by a new DTensor one, dropping attributes such as FLA's
        # _no_weight_decay (read by trainer.optim): carry that mark over by name.
        no_decay = {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
        # The last block and the root (embeddings, final norm, LM head) keep their parameters unsharded from the
        # forward to the backward: the backward starts with them, so resharding would only all-gather them again at
        # once, with nothing to overlap (FSDP2's default for a root, torchtitan's for the last block)
        layers = blocks(model)
        for i, block in enumerate(layers):
            reshard = reshard_after_forward and i < len(layers) - 1
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
        for n, p in model.named_parameters():
            if n in no_decay:
                p._no_weight_decay = True
        model.defer_reduce = defer_reduce
        return model
    raise ValueError(f"parallel.mode={mode!r}: use none, ddp or fsdp")


def _single_process_group(d: Dist) -> None:
    if dist.is_initialized():
        return
    with socket.socket() as s:  # a free local port for the one-member group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if d.device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    d.distributed = True


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Around a micro-batch's forward and backward: DDP skips the gradient all-reduce on all but the last
    micro-batch of a step (its gradients are whole on every rank anyway); FSDP2 skips the reduce-scatter only where
    wrap()'s defer_reduce asks for it, since the gradients then stay unsharded (FSDP2 reads the switch in its backward
    hooks: the backward must run inside)."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif getattr(model, "defer_reduce", False):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_mean(values: list[float], d: Dist) -> list[float]:
    return [v / d.world_size for v in all_reduce_sum(values, d)]


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    if not d.distributed or d.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()
