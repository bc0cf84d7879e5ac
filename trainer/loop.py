"""The training loop: read it top to bottom.

train -> setup (processes, run dir, data, model, optimizer, checkpoint, resume: returns the Run's parts)
-> run_steps: for each step, launch_step (micro-batches: forward, backward, gradients synced on the last
one -> clip -> skip if NaN/inf else optimizer step), then the previous step's numbers read back (one step
behind, so the GPU is never idle waiting for Python) -> metrics -> validation -> checkpoint.
"""
from __future__ import annotations

import copy
import functools
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

import torch

from models import build, cpu_torch, cpu_triton, fused
from models.flops import flops_per_token, peak_flops, six_n
from shards.errors import UserError
from shards.progress import Progress, plural
from trainer import parallel, precision, run_dir, schedule
from trainer.checkpoint import Checkpointer
from trainer.config import Config, ConfigError
from trainer.data import DataStateError, TokenLoader
from trainer.data.loader import cu_seqlens as document_bounds
from trainer.data.sources import check_val_set, mixture_table, open_loader, shards_tokenizer, val_sets
from trainer.data.validation import load_val_rows
from trainer.evaluate import validation_loss
from trainer.graphs import GraphedSteps, unsupported_reason as graphs_unsupported
from trainer.metrics import MetricsLog, memory_gib, read_metrics
from trainer.optim import build_optimizer
from trainer.stop import StopRequest

log = logging.getLogger("trainer")


class TrainingDiverged(UserError, RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient norm."""


def divergence_causes(seq_len: int, lr: float, clip: float) -> str:
    """The likelier causes of NaN/inf steps that the run's own settings show, else the usual advice."""
    causes = []
    if seq_len < 2:
        causes.append(f"the shards' seq_len {seq_len} leaves no next token to predict (rebuild them with "
                      f"shardgen --seq-len 2 or more)")
    elif seq_len < 64:
        causes.append(f"the shards' seq_len {seq_len} is very short")
    if lr > 1e-2:
        causes.append(f"optim.lr={lr:g} is high for AdamW (1e-4 to 3e-3 is usual)")
    if clip <= 0:
        causes.append("gradient clipping is off (optim.clip=0)")
    if not causes:
        return "resume from it with a lower optim.lr or a tighter optim.clip"
    return "likely causes: " + "; ".join(causes) + ". Resume from it once fixed"


IGNORE_INDEX = -100  # the label HF/FLA losses skip


def micro_batches(input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None, size: int):
    """Split the rank's batch into micro-batches of `size` rows: (input_ids, labels, cu_seqlens).

    Varlen micro-batches become one [1, rows*L] sequence with their cu_seqlens. The rows of a batch
    come from unrelated places in the corpus, so the last token of a row must not be trained to
    predict the first token of the next: each row's first label is IGNORE_INDEX (the model shifts
    labels left by one), which keeps L-1 targets per row, as in the non-varlen batch."""
    rows, seq_len = input_ids.shape
    for a in range(0, rows, size):
        b = min(rows, a + size)
        x = input_ids[a:b]
        if cu_seqlens is None:
            yield x, x, None
        else:
            lo, hi = a * seq_len, b * seq_len
            cu = cu_seqlens[(cu_seqlens >= lo) & (cu_seqlens <= hi)] - lo  # row starts are boundaries
            labels = x.clone()
            labels[:, 0] = IGNORE_INDEX
            yield x.reshape(1, -1), labels.reshape(1, -1), cu.to(torch.int32)


class PendingStep:
    """A launched optimizer step's loss and gradient norm, read on the host later (`result`).

    On a GPU the two numbers are copied into pinned host memory behind a CUDA event, so that reading them waits for
    this step's kernels only, not for the next step's, which the loop queues first: the host launches step N+1
    while the GPU still runs step N, and the GPU never idles while Python launches a forward pass."""

    def __init__(self, loss_sum: torch.Tensor | None, grad_norm: torch.Tensor | None, world_size: int,
                 done: tuple[float, float, bool] | None = None):
        self._world_size, self._done, self._event = world_size, done, None
        # ready: the numbers are there without waiting for a device (read on the host already, or a CPU run's), so
        # the loop reads them at once: queueing the next step first would only shift the step times by one step
        self.ready = done is not None
        if done is not None:
            return
        values = torch.stack([loss_sum.detach().double(), grad_norm.detach().double()])
        if values.is_cuda:
            self._host = torch.empty(2, dtype=torch.float64, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values
            self.ready = True

    def result(self) -> tuple[float, float, bool]:
        """(loss: mean over ranks, grad norm, applied); applied is False where either is NaN/inf."""
        if self._done is None:
            if self._event is not None:
                self._event.synchronize()
            loss_sum, norm = self._host.tolist()
            loss = loss_sum / self._world_size
            self._done = (loss, norm, math.isfinite(loss) and math.isfinite(norm))
        return self._done


def train_step(model, optimizer, batch_ids, cu_seqlens, micro_batch: int, clip: float, lr: float,
               d: parallel.Dist, prec: precision.Precision,
               graphs: GraphedSteps | None = None) -> tuple[float, float, bool]:
    """One optimizer step over the rank's batch. Returns (loss, grad_norm, applied). Not applied if NaN/inf.
    `graphs` (train.cuda_graphs): each micro-batch's forward and backward replayed as a CUDA graph."""
    return launch_step(model, optimizer, batch_ids, cu_seqlens, micro_batch, clip, lr, d, prec, graphs).result()


def launch_step(model, optimizer, batch_ids, cu_seqlens, micro_batch: int, clip: float, lr: float,
                d: parallel.Dist, prec: precision.Precision, graphs: GraphedSteps | None = None) -> PendingStep:
    """train_step without waiting for the GPU where the optimizer skips a non-finite step on the device: the
    step's work is queued and its numbers come from the PendingStep's `result()` (fused AdamW, FSDP2's DTensor
    parameters too). Otherwise (a non-fused optimizer) the host reads the loss before the optimizer step, as it must."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    parts = list(micro_batches(batch_ids, cu_seqlens, micro_batch))
    loss_sum = torch.zeros((), dtype=torch.float32, device=d.device)
    with prec.compute():
        for i, (x, labels, cu) in enumerate(parts):
            # trainer/graphs.py: no gradient_sync or autocast to enter (bf16, not DDP); None: run this one eagerly
            graphed = graphs.forward_backward(x, labels, len(parts)) if graphs is not None else None
            if graphed is not None:
                loss, grads = graphed
                prec.accumulate(grads)
                loss_sum += loss.float()
                continue
            x, labels = x.to(d.device, non_blocking=True), labels.to(d.device, non_blocking=True)
            kwargs = {} if cu is None else {"cu_seqlens": cu.to(d.device)}
            # the backward inside the sync context (parallel.fsdp_defer_reduce: FSDP2 reads it in its backward hooks);
            # prec.reducing: bf16 over several processes all-reduces gradient buckets during the last backward
            last = i == len(parts) - 1
            with parallel.gradient_sync(model, enabled=last):
                with prec.autocast():
                    loss = model(input_ids=x, labels=labels, **kwargs).loss / len(parts)
                with prec.reducing(last):
                    loss.backward()
            prec.accumulate()
            loss_sum += loss.detach().float()
    prec.reduce()
    if skips_on_device(optimizer):
        # No host sync before the step: the fused kernel reads the flag on the device and, where it is 1, leaves
        # weights, moments and step counts as they were. The GPU works through the step while the host goes on
        # to launch the next one; the loss is read from the PendingStep afterwards.
        if CLIP_IN_STEP:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            grad_norm = full_norm(grad_norm)
            optimizer.grad_scale = clip_divisor(grad_norm, clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
            grad_norm = full_norm(grad_norm)
        optimizer.found_inf = (~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))).float()
        try:
            optimizer.step()
        finally:
            optimizer.found_inf = optimizer.grad_scale = None
        optimizer.zero_grad(set_to_none=True)
        total = loss_sum.double()
        if d.distributed and d.world_size > 1:
            torch.distributed.all_reduce(total)  # a sum, divided by the ranks in result(), as all_reduce_mean does
        return PendingStep(total, grad_norm, d.world_size)
    grad_norm = full_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf")))
    loss_value, = parallel.all_reduce_mean([loss_sum.item()], d)
    norm_value = float(grad_norm.item())
    applied = math.isfinite(loss_value) and math.isfinite(norm_value)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return PendingStep(None, None, d.world_size, done=(loss_value, norm_value, applied))


def full_norm(grad_norm: torch.Tensor) -> torch.Tensor:
    """FSDP2's gradient norm is a DTensor of each rank's partial norm: the global one, all-reduced on the device."""
    return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm


# The on-device path clips inside the fused AdamW step (clip_divisor). False: clip_grad_norm_ before the step, as until
# 2026-12-06 (bench/train_bench.py's -mulclip cases set it, to measure the difference).
CLIP_IN_STEP = True


def clip_divisor(grad_norm: torch.Tensor, clip: float) -> torch.Tensor | None:
    """Gradient clipping folded into the fused AdamW step: the kernel divides each gradient by this tensor as it reads
    it (the `grad_scale` PyTorch's GradScaler hands it), so no pass of its own over the gradients: clip_grad_norm_'s
    multiply was ~0.75 ms of a GLA 340M step on an H200 (BENCHMARKS.md). max((norm + 1e-6) / clip, 1) divides as
    clip_grad_norm_'s min(clip / (norm + 1e-6), 1) multiplies; None (no clipping) for clip <= 0."""
    if clip <= 0:
        return None
    return torch.clamp((grad_norm + 1e-6) / clip, min=1.0)


def skips_on_device(optimizer) -> bool:
    """Whether the optimizer can skip a non-finite step by itself, on the device (fused AdamW's found_inf), so that
    train_step need not read the loss first. FSDP2's DTensor parameters too: the kernel runs on each rank's shards
    and the gradient norm is all-reduced on the device (full_norm). Every rank reaches the same decision: a
    non-finite loss anywhere gives non-finite gradients, so a non-finite global gradient norm, everywhere."""
    cached = getattr(optimizer, "_skips_on_device", None)
    if cached is None:
        cached = bool(optimizer.defaults.get("fused"))
        optimizer._skips_on_device = cached
    return cached


def setup_logging(d: parallel.Dist) -> None:
    logging.basicConfig(level=logging.INFO if d.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {d.rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")


def train(cfg: Config) -> dict:
    # FLA's kernels on CPU need the Triton interpreter, set before triton is first imported.
    if not torch.cuda.is_available():
        cpu_triton.enable()
    d = parallel.init()
    setup_logging(d)
    with run_dir.lock(cfg.run.out_dir, d):
        summary = run_steps(cfg, setup(cfg, d))
    # Leave together, then tear down: a rank destroying its process group while another still talks to it
    # can abort. After an error we skip both (a collective with a failed rank would hang) and just exit.
    parallel.barrier(d)
    parallel.shutdown()
    return summary


@dataclass
class Run:
    """What setup builds and the step loop uses."""
    d: parallel.Dist
    loader: TokenLoader
    ckpt: Checkpointer
    model: torch.nn.Module  # wrapped for the parallel mode
    raw: torch.nn.Module  # unwrapped: for parameter and FLOP counts
    optimizer: torch.optim.Optimizer
    lr_at: Callable[[int], float]
    prec: precision.Precision  # compute dtype: autocast, or bf16 over fp32 master weights
    graphs: GraphedSteps | None  # train.cuda_graphs
    micro: int  # sequences per forward/backward
    # resumed state (zeros and None on a fresh run)
    start_step: int
    skipped: int
    best_val: float | None
    last_ckpt: str | None  # the newest good checkpoint: a newer directory may be damaged
    # validation: (name, this rank's rows) of one set, or of each source of a mixture that has val_shards
    val_rows: list[tuple[str, torch.Tensor]]
    val_boundaries: Callable | None
    # throughput accounting
    tokens_per_step: int
    train_flops: float  # per token
    peak: float | None  # FLOP/s of one device
    n_params: int


def setup(cfg: Config, d: parallel.Dist) -> Run:
    torch.manual_seed(cfg.model.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    out = cfg.run.out_dir
    run_dir.check_out_dir(out)
    if d.is_main:
        os.makedirs(out, exist_ok=True)
    parallel.barrier(d)

    ckpt = Checkpointer(run_dir.checkpoint_dir(cfg), cfg.checkpoint.keep, d)
    if cfg.checkpoint.dir:
        log.info("checkpoints in %s", ckpt.root)
    loader = _make_loader(cfg, d, ckpt)
    manifest = loader.manifest
    micro = micro_batch_size(cfg.train.micro_batch, loader.local_batch, cfg.data.global_batch, d.world_size)

    # what this launch changes against the last one's config.toml, read before it is written anew (below)
    changes = run_dir.config_changes(out, cfg) if d.is_main else []
    prec_name = precision.resolve(cfg.train.precision, d.device)
    model, model_config = _make_model(cfg, d, loader, prec_name)
    raw = parallel.unwrap(model)
    prec = (precision.MasterWeights(raw, d.device, d.world_size) if prec_name == "bf16" and cfg.parallel.mode != "fsdp"
            else precision.Precision(prec_name, d.device))
    optimizer = build_optimizer(model, cfg.optim, d.device)
    graphs = _make_graphs(cfg, d, model, prec, prec_name)

    t_load = time.perf_counter()
    state = ckpt.load_latest(model, optimizer)
    start_step, skipped, best_val = 0, 0, None
    if state is not None:
        try:
            start_step = loader.check_state(state["loader"])
        except DataStateError as e:  # the loader names what changed; the run level says how to start afresh
            raise DataStateError(f"{e} (resuming {state['path']} of run.out_dir={cfg.run.out_dir}; for a new run "
                                 f"give run.out_dir another directory)") from None
        skipped = int(state.get("skipped_steps", 0))
        best_val = state.get("best_val_loss")
        log.info("resumed from %s at step %d (saved by %s, now %d), loaded in %.1fs", state["path"],
                 start_step, plural(state.get("world_size", -1), "rank"), d.world_size, time.perf_counter() - t_load)
        if changes:  # accepted (what a resume may not change was refused above), but not silently
            log.info("resume: settings changed since the last launch: %s", "; ".join(changes))
    if d.is_main:  # the run files once the launch is accepted: a refused resume leaves the last launch's config.toml
        run_dir.write_run_files(cfg, model_config, loader)
        if cfg.checkpoint.dir:  # a copy beside the checkpoints, so that one exports without the run dir
            run_dir.copy_run_files(cfg.run.out_dir, cfg.checkpoint.dir)

    val_rows = []
    if cfg.train.eval_every > 0:
        for name, _, url in val_sets(cfg.data):
            val_rows.append((name, load_val_rows(url, cfg.data.val_sequences, d)))
    # varlen: validation masks documents as training does (the same tokenizer, so the same EOS/BOS ids)
    val_boundaries = (functools.partial(document_bounds, eos_id=manifest.eos_id, bos_id=manifest.bos_id)
                      if cfg.data.varlen else None)

    seq_len = manifest.seq_len
    run = Run(d=d, loader=loader, ckpt=ckpt, model=model, raw=raw, optimizer=optimizer,
              lr_at=schedule.from_config(cfg.optim, cfg.train.max_steps), prec=prec, graphs=graphs, micro=micro,
              start_step=start_step, skipped=skipped, best_val=best_val,
              last_ckpt=state["path"] if state else None, val_rows=val_rows, val_boundaries=val_boundaries,
              tokens_per_step=cfg.data.global_batch * seq_len, train_flops=flops_per_token(raw, seq_len)["train"],
              peak=cfg.run.peak_tflops * 1e12 if cfg.run.peak_tflops else peak_flops(d.device),
              n_params=build.count_parameters(raw))
    log.info("model %s: %.2fM parameters; %.3g FLOPs/token trained (6N = %.3g); %s on %d x %s, precision %s; "
             "global batch %d x %d tokens, micro-batch %d, %s", raw.config.model_type,
             run.n_params / 1e6, run.train_flops, six_n(raw), parallel.effective_mode(cfg.parallel.mode, d.world_size),
             d.world_size, d.device.type, prec_name, cfg.data.global_batch, seq_len, micro, plural(loader.local_batch // micro, "accumulation step"))
    return run


def _make_graphs(cfg: Config, d: parallel.Dist, model, prec, prec_name: str) -> GraphedSteps | None:
    """train.cuda_graphs: the step's graphs (captured at the first step), None where off; a config error where
    the settings are not covered, naming the fix. On a CPU the option is switched off, as train.compile is."""
    if not cfg.train.cuda_graphs:
        return None
    gpu = d.device.type == "cuda"
    # a CPU dry run of a GPU config still stops at what no device covers (fsdp, varlen, compile); its precision
    # resolves to fp32 on a CPU, so that is checked on the GPU only
    reason = graphs_unsupported(prec_name if gpu else "bf16", cfg.parallel.mode, cfg.data.varlen, cfg.train.compile)
    if reason:
        raise ConfigError(reason)
    if not gpu:
        log.info("train.cuda_graphs switched off on %s: it is a GPU option", d.device.type)
        return None
    return GraphedSteps(model, prec, d.device)


def micro_batch_size(micro: int | None, local_batch: int, global_batch: int, world_size: int) -> int:
    """Sequences per forward pass on each rank: train.micro_batch, or the rank's whole share of the batch where it is
    None or larger (more ranks than the config was written for: `make train NPROC=2` on the demo, whose micro-batch is
    its whole global batch of 4, gives each rank 2, with a log line); it must divide that share."""
    if micro is None:
        return local_batch
    if micro > local_batch:
        log.info("train.micro_batch=%d is more than this rank's %s a step (data.global_batch=%d / %s): "
                 "micro-batches of %d", micro, plural(local_batch, "sequence"), global_batch,
                 plural(world_size, "rank"), local_batch)
        return local_batch
    if local_batch % micro:
        raise ConfigError(f"train.micro_batch={micro} must divide the local batch {local_batch} "
                          f"(data.global_batch={global_batch} / {plural(world_size, 'rank')})")
    return micro


def _make_loader(cfg: Config, d: parallel.Dist, ckpt: Checkpointer) -> TokenLoader:
    # The streams are fixed at the first launch: a resumed run without data.streams takes the checkpoint's.
    layout = cfg.data.streams
    if layout is None:
        layout = (ckpt.latest_loader_state() or {}).get("layout")
    loader = open_loader(cfg.data, layout=layout, world_size=d.world_size, rank=d.rank)
    if cfg.train.eval_every > 0:  # every data path is checked before the model is built
        for _, source, url in val_sets(cfg.data):
            check_val_set(loader, source, url)
    if loader.num_sources > 1 and d.is_main:
        lines, warnings = mixture_table(loader, cfg.train.max_steps, cfg.data.max_repeats)
        log.info("\n".join(lines))
        for w in warnings:
            log.warning(w)
    return loader


def _make_model(cfg: Config, d: parallel.Dist, loader: TokenLoader,
                prec_name: str) -> tuple[torch.nn.Module, object]:
    """(the model on its device, wrapped for the parallel mode, in train mode; its config as the run files keep it:
    the user's, with the data's special tokens, before it is adapted to the device)."""
    if cfg.model.init_from:
        build.check_pretrained_fits(cfg.model.init_from, loader.manifest.tokenizer.get("vocab_size"),
                                    shards_tokenizer(loader), str(loader.storage))
        model = build.load_pretrained(cfg.model.init_from, "cpu")
        model_config = model.config
    else:
        model_config = build.load_config(cfg.model.config, vocab_size=loader.manifest.tokenizer.get("vocab_size"))
    build.use_data_special_tokens(model_config, loader.manifest.eos_id, loader.manifest.bos_id)
    given = copy.deepcopy(model_config)  # before adapt_to_device: the run dir keeps the user's model config, unedited
    build.adapt_to_device(model_config, d.device)
    if d.device.type == "cpu":  # model.cpu_kernels: FLA's GLA ops as plain PyTorch, or the Triton interpreter
        cpu_torch.select(model_config, cfg.model.cpu_kernels)
    if not cfg.model.init_from:
        init_device = cfg.model.init_device
        if init_device == "auto":
            init_device = "meta" if cfg.parallel.mode == "fsdp" else d.device.type
        model = build.build_model(model_config, d.device if init_device == "cuda" else init_device,
                                  seed=cfg.model.seed)
    build.use_fp32_loss(model)  # an unfused loss over bf16 logits (train.precision=bf16) in fp32
    if d.device.type == "cuda":
        if cfg.train.compile and cfg.model.gpu_kernels == "fused":
            log.info("GPU kernels: FLA's modules (train.compile compiles those; the fused blocks are the "
                     "alternative to it, model.gpu_kernels=fused without train.compile)")
        else:
            fused.select(model, cfg.model.gpu_kernels, d.device)
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.train.compile and d.device.type != "cuda":
        log.info("train.compile switched off on %s: it is a GPU option (torch.compile cannot trace FLA's "
                 "kernels under the Triton interpreter; with the PyTorch CPU ops it is untested)", d.device.type)
    elif cfg.train.compile:
        # FLA layers read their integer `layer_idx` in forward, and dynamo takes integer module attributes
        # as constants: each block would be compiled anew, and past 8 blocks (its recompile limit) the rest
        # would silently run uncompiled. As dynamic ints, one compiled block serves every layer.
        import torch._dynamo as dynamo  # here, not at the top: it imports triton (see train)
        dynamo.config.allow_unspec_int_on_nn_module = True
        for block in parallel.blocks(model):
            block.compile()
    meta = any(p.is_meta for p in model.parameters())
    if not meta:
        model.to(d.device)
    model = parallel.wrap(model, cfg.parallel.mode, d, cfg.parallel.fsdp_reshard_after_forward, prec_name,
                          cfg.parallel.fsdp_defer_reduce)
    if meta:
        build.materialize(model, d.device, seed=cfg.model.seed)
    model.train()
    return model, given


def _already_trained(cfg: Config, r: Run) -> dict:
    """A launch whose checkpoint is at or past train.max_steps: nothing to train. The finished run's summary.json
    stays as it was (written anew, from its metrics, only where it is missing)."""
    r.loader.close()
    out = cfg.run.out_dir
    summary = run_dir.read_summary(out)
    if r.d.is_main:
        log.warning("nothing to train: %s is at step %d, train.max_steps=%d; its summary.json is kept. Raise "
                    "train.max_steps to train on, or give run.out_dir another directory for a new run",
                    out, r.start_step, cfg.train.max_steps)
        if summary is None:
            try:
                records = [x for x in read_metrics(out) if x["step"] < r.start_step]
            except OSError:
                records = []
            vals = [x["val_loss"] for x in records if "val_loss" in x]
            summary = _summary(r, r.start_step, None, None, records[-1]["loss"] if records else None,
                               vals[-1] if vals else None, r.best_val, r.skipped, r.last_ckpt)
            run_dir.write_summary(out, summary)
    return summary or {"steps": r.start_step, "steps_this_run": 0}


def _summary(r: Run, step: int, time_s: float | None, mean_tps: float | None, final_loss: float | None,
             final_val_loss: float | None, best_val: float | None, skipped: int, checkpoint: str | None) -> dict:
    """summary.json: the run's totals at `step`."""
    summary = {"steps": step, "steps_this_run": step - r.start_step, "tokens": step * r.tokens_per_step,
               "time_s": time_s, "mean_tokens_per_s": mean_tps, "mfu": _mfu(r, mean_tps) if mean_tps else None,
               "final_loss": final_loss, "final_val_loss": final_val_loss, "best_val_loss": best_val,
               "skipped_steps": skipped, "checkpoint": checkpoint, "parameters": r.n_params,
               "flops_per_token": r.train_flops, "six_n": six_n(r.raw)}
    if r.loader.num_sources > 1:  # the realised mix: each source's share of the sequences trained on
        used = r.loader.sequences_before(step)
        summary["mix"] = {n: u / max(1, sum(used)) for n, u in zip(r.loader.names, used)}
    return summary


def run_steps(cfg: Config, r: Run) -> dict:
    d, max_steps = r.d, cfg.train.max_steps
    if r.start_step >= max_steps:
        return _already_trained(cfg, r)
    metrics = MetricsLog(cfg.run.out_dir, d.is_main, r.start_step, tensorboard=cfg.run.tensorboard)
    bar = Progress(max_steps, "train", unit="step", enabled=d.is_main and cfg.run.progress,
                   log_every=cfg.run.progress_every, initial=r.start_step)
    step, skipped, best_val, last_ckpt = r.start_step, r.skipped, r.best_val, r.last_ckpt
    bad_in_a_row, loss, val_loss, val_at, tps_list = 0, None, None, None, []
    t_run = time.perf_counter()
    t_read = None  # when the host last read a step's numbers back: the next step's time runs from there
    fetched = 0.0  # seconds spent waiting for batches since then
    batches = r.loader.iter_batches(start_step=step)
    stop = StopRequest(d.distributed and d.world_size > 1)
    stopped = 0  # the signal the run stopped for

    def finish(pending: PendingStep, at: int, lr: float, t0: float, epoch: int) -> None:
        """Read step `at`'s numbers back, count a skip, validate where due, log its metrics. Its time is the wall
        time since the previous step was read (or since its launch, where that came later: after validation or a
        checkpoint), its data wait the time spent waiting for batches in that interval."""
        nonlocal t_read, fetched, bad_in_a_row, skipped, loss, val_loss, val_at, best_val
        loss, grad_norm, applied = pending.result()
        t_done = time.perf_counter()
        dt = t_done - (t0 if t_read is None else max(t0, t_read))
        data_share = fetched / dt
        t_read, fetched = t_done, 0.0
        bad_in_a_row = 0 if applied else bad_in_a_row + 1
        if not applied:
            skipped += 1
            log.warning("step %d: loss %s, grad norm %s: step skipped (no update), %d in a row",
                        at, loss, grad_norm, bad_in_a_row)
        tps = r.tokens_per_step / dt
        tps_list.append(tps)
        record = {"step": at, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens": (at + 1) * r.tokens_per_step, **_source_tokens(r.loader, at + 1),
                  "tokens_per_s": tps, "mfu": _mfu(r, tps),
                  "data_wait_share": data_share, "memory_gib": memory_gib(d.device),
                  "skipped_steps": skipped, "epoch": epoch}
        if r.val_rows and ((at + 1) % cfg.train.eval_every == 0 or at + 1 == max_steps):
            losses = _validation_losses(r)
            val_loss, val_at = losses.pop(""), at + 1
            best_val = val_loss if best_val is None else min(best_val, val_loss)
            record.update({f"val/{n}": v for n, v in losses.items()}, val_loss=val_loss)
        metrics.log(record)
        if bad_in_a_row >= cfg.train.max_bad_steps:
            raise TrainingDiverged(
                f"{plural(bad_in_a_row, 'step')} in a row with a NaN/inf loss or gradient norm (last: step {at}); "
                f"stopping. The last checkpoint ({last_ckpt}) is intact; "
                f"{divergence_causes(r.loader.manifest.seq_len, cfg.optim.lr, cfg.optim.clip)} "
                f"(train.max_bad_steps={cfg.train.max_bad_steps})")
        bar.update(1, extra=progress_extra(loss, lr, tps, val_loss, val_at))

    try:
        stop.install()
        # Step N is launched before step N-1's numbers are read (PendingStep): the GPU runs N-1 to its end while
        # the host queues N. Where validation, a checkpoint or the end comes after a step, its numbers are read
        # before anything else touches the weights; where they are ready at launch (a CPU run, a path that read
        # the loss before its optimizer step), at once.
        waiting = None  # (PendingStep, step, lr, t0, epoch) of the launched step not read yet
        while step < max_steps:
            t0 = time.perf_counter()
            batch = next(batches)
            fetched += time.perf_counter() - t0
            assert batch.step == step, (batch.step, step)
            lr = r.lr_at(step)
            pending = launch_step(r.model, r.optimizer, batch.input_ids, batch.cu_seqlens, r.micro,
                                  cfg.optim.clip, lr, d, r.prec, r.graphs)
            if waiting is not None:
                finish(*waiting)
            waiting = (pending, step, lr, t0, batch.epoch)
            step += 1
            stopped = stop.agreed() if step < max_steps else 0  # SIGTERM / SIGINT: a checkpoint, then out
            save = bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or bool(stopped)
            if pending.ready or save or step == max_steps or (r.val_rows and step % cfg.train.eval_every == 0):
                finish(*waiting)
                waiting = None
            if save:
                last_ckpt = _save(r, step, skipped, best_val)
            if stopped:
                break
        if cfg.checkpoint.at_end and step > r.start_step and (last_ckpt is None or not last_ckpt.endswith(f"{step:06d}")):
            last_ckpt = _save(r, step, skipped, best_val)
    finally:
        stop.close()
        batches.close()
        r.loader.close()
        bar.close()
        metrics.close()

    steady = tps_list[1:] or tps_list  # the first step pays for kernel compilation
    summary = _summary(r, step, time.perf_counter() - t_run, sum(steady) / len(steady) if steady else None,
                       loss if step > r.start_step else None, val_loss, best_val, skipped, last_ckpt)
    if stopped:
        summary["stopped_by"] = signal.Signals(stopped).name
    if d.is_main:
        _report(cfg.run.out_dir, summary, max_steps)
    return summary


def progress_extra(loss: float, lr: float, tokens_per_s: float, val_loss: float | None, val_at: int | None) -> str:
    """The progress line's numbers. The validation loss is the last one computed, which most steps did not compute:
    it carries the step it is from (`val 7.1888@200`: after 200 steps, as the bar counts them)."""
    val = f" val {val_loss:.4f}@{val_at}" if val_loss is not None else ""
    return f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s{val}"


def _report(out: str, summary: dict, max_steps: int) -> None:
    """Rank 0 at the end of run_steps: summary.json, the summary line ("done:" for a finished run, "stopped:" for one
    a signal stopped), and how to resume a stopped run."""
    run_dir.write_summary(out, summary)
    log.info("%s: %s", "stopped" if summary.get("stopped_by") else "done",
             ", ".join(f"{k}={_fmt(v)}" for k, v in summary.items() if v is not None))
    if summary.get("stopped_by"):
        log.warning("stopped by %s after step %d of %d: checkpoint %s; run the same command again to resume from it",
                    summary["stopped_by"], summary["steps"], max_steps, summary["checkpoint"])


def _validation_losses(r: Run) -> dict[str, float]:
    """{"": the validation loss} for one set; for a mixture also {name: its loss} per source, "" being their
    mean weighted by validation tokens."""
    losses = {name: validation_loss(r.model, rows, r.micro, r.d, r.prec.eval_autocast, r.val_boundaries)
              for name, rows in r.val_rows}
    sizes = {name: rows.numel() for name, rows in r.val_rows}
    mean = sum(losses[n] * sizes[n] for n in losses) / sum(sizes.values())
    return {**{n: v for n, v in losses.items() if n}, "": mean}


def _source_tokens(loader: TokenLoader, step: int) -> dict:
    """Tokens trained on per source after `step` steps (a mixture; exact, from the order itself)."""
    if loader.num_sources == 1:
        return {}
    seq_len = loader.manifest.seq_len
    return {f"tokens/{n}": u * seq_len for n, u in zip(loader.names, loader.sequences_before(step))}


def _mfu(r: Run, tokens_per_s: float) -> float | None:
    return r.train_flops * tokens_per_s / (r.peak * r.d.world_size) if r.peak else None


def _fmt(v):
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _save(r: Run, step: int, skipped: int, best_val: float | None) -> str:
    t = time.perf_counter()
    path = r.ckpt.save(step, r.model, r.optimizer, {"loader": r.loader.state_dict(step), "skipped_steps": skipped,
                                                    "best_val_loss": best_val})
    log.info("checkpoint %s (%.1fs)", path, time.perf_counter() - t)
    return path
