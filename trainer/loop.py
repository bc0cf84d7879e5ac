"""The training loop: read it top to bottom.

setup (processes, data, model, optimizer, checkpoint) -> resume -> for each step: micro-batches
(forward, backward, gradients synced on the last one) -> clip -> skip if NaN/inf else optimizer step
-> metrics -> validation -> checkpoint.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import math
import os
import socket
import time

import torch

from shards.errors import NotFoundError, UserError
from trainer import parallel, precision, schedule
from trainer.checkpoint import Checkpointer
from trainer.config import Config, ConfigError, to_toml
from trainer.metrics import MetricsLog, memory_gib

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


def train_step(model, optimizer, batch_ids, cu_seqlens, micro_batch: int, clip: float, lr: float,
               d: parallel.Dist, prec: precision.Precision) -> tuple[float, float, bool]:
    """One optimizer step over the rank's batch. Returns (loss, grad_norm, applied). Not applied if NaN/inf."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    parts = list(micro_batches(batch_ids, cu_seqlens, micro_batch))
    loss_sum = torch.zeros((), dtype=torch.float32, device=d.device)
    with prec.compute():
        for i, (x, labels, cu) in enumerate(parts):
            x, labels = x.to(d.device, non_blocking=True), labels.to(d.device, non_blocking=True)
            kwargs = {} if cu is None else {"cu_seqlens": cu.to(d.device)}
            with parallel.gradient_sync(model, enabled=i == len(parts) - 1), prec.autocast():
                loss = model(input_ids=x, labels=labels, **kwargs).loss / len(parts)
            loss.backward()
            prec.accumulate()
            loss_sum += loss.detach().float()
    prec.reduce()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    loss_value, = parallel.all_reduce_mean([loss_sum.item()], d)
    norm_value = float(grad_norm.item())
    applied = math.isfinite(loss_value) and math.isfinite(norm_value)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value, applied


def setup_logging(d: parallel.Dist) -> None:
    logging.basicConfig(level=logging.INFO if d.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {d.rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")


def train(cfg: Config) -> dict:
    # ---- processes and device. FLA's kernels on CPU need the Triton interpreter, set before fla is imported.
    if not torch.cuda.is_available():
        from models import cpu_triton
        cpu_triton.enable()
    d = parallel.init()
    setup_logging(d)
    with run_dir_lock(cfg.run.out_dir, d):
        summary = _train(cfg, d)
    # Leave together, then tear down: a rank destroying its process group while another still talks to it
    # can abort. After an error we skip both (a collective with a failed rank would hang) and just exit.
    parallel.barrier(d)
    parallel.shutdown()
    return summary


@contextlib.contextmanager
def run_dir_lock(out: str, d: parallel.Dist):
    """One run at a time per run.out_dir. Two runs in one directory (a second launch while the first still
    runs, or workers left behind by a killed torchrun) would interleave metrics and overwrite each other's
    checkpoints. Rank 0 holds an flock on OUT/.lock for the run; the kernel drops it when the process dies,
    so a killed run never leaves a stale lock behind."""
    if not d.is_main or "://" in out:  # s3:// out_dir is refused in _train
        yield
        return
    os.makedirs(out, exist_ok=True)
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"run.out_dir={out}: another run is writing to it ({holder}); wait for it to end or "
                          f"stop it, or give this run another run.out_dir") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        f.close()


def _train(cfg: Config, d: parallel.Dist) -> dict:
    from models import build
    from models.flops import flops_per_token, peak_flops, six_n
    from trainer.data.loader import cu_seqlens as document_bounds

    torch.manual_seed(cfg.model.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    out = cfg.run.out_dir
    if "://" in out:
        raise ConfigError(f"run.out_dir={out}: checkpoints to object storage are not supported through "
                         f"run.out_dir, which must be a local directory (rank 0 writes metrics, TensorBoard logs and "
                         f"the config there); keep it local and set checkpoint.dir=s3://bucket/prefix to put the "
                         f"checkpoints in object storage (data.shards and data.val_shards may be s3:// too)")
    if d.is_main:
        os.makedirs(out, exist_ok=True)
    parallel.barrier(d)

    # ---- data
    from trainer.data.sources import mixture_table, open_loader

    # The layout is fixed at the first launch: a resumed run without data.layout takes the checkpoint's.
    ckpt = Checkpointer(cfg.checkpoint.dir or os.path.join(out, "ckpt"), cfg.checkpoint.keep, d)
    if cfg.checkpoint.dir:
        log.info("checkpoints in %s", ckpt.root)
    layout = cfg.data.layout
    if layout is None:
        layout = (ckpt.latest_loader_state() or {}).get("layout")
    loader = open_loader(cfg.data, layout=layout, world_size=d.world_size, rank=d.rank)
    if loader.num_sources > 1 and d.is_main:
        lines, warnings = mixture_table(loader, cfg.train.max_steps, cfg.data.max_repeats)
        log.info("\n".join(lines))
        for w in warnings:
            log.warning(w)
    manifest = loader.manifest
    seq_len = manifest.seq_len
    micro = cfg.train.micro_batch or loader.local_batch
    if loader.local_batch % micro:
        raise ConfigError(f"train.micro_batch={micro} must divide the local batch {loader.local_batch} "
                         f"(data.global_batch={cfg.data.global_batch} / {d.world_size} ranks)")

    # ---- model
    if cfg.model.init_from:
        model = build.load_pretrained(cfg.model.init_from, "cpu")
        model_config = model.config
    else:
        model_config = build.load_config(cfg.model.config, vocab_size=manifest.tokenizer.get("vocab_size"))
    if d.is_main:  # before adapt_to_device: the run dir keeps the user's model config, unedited
        _write_run_files(cfg, out, model_config, loader)
        if cfg.checkpoint.dir:  # a copy beside the checkpoints, so that one exports without the run dir
            _copy_run_files(out, cfg.checkpoint.dir)
    build.adapt_to_device(model_config, d.device)
    if d.device.type == "cpu":  # model.cpu_kernels: FLA's GLA ops as plain PyTorch, or the Triton interpreter
        from models import cpu_torch
        cpu_torch.select(model_config, cfg.model.cpu_kernels)
    if not cfg.model.init_from:
        init_device = cfg.model.init_device
        if init_device == "auto":
            init_device = "meta" if cfg.parallel.mode == "fsdp" else d.device.type
        model = build.build_model(model_config, d.device if init_device == "cuda" else init_device,
                                  seed=cfg.model.seed)
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.train.compile and d.device.type != "cuda":
        log.info("train.compile switched off on %s: it is a GPU option (torch.compile cannot trace FLA's "
                 "kernels under the Triton interpreter; with the PyTorch CPU ops it is untested)", d.device.type)
    elif cfg.train.compile:
        # FLA layers read their integer `layer_idx` in forward, and dynamo takes integer module attributes
        # as constants: each block would be compiled anew, and past 8 blocks (its recompile limit) the rest
        # would silently run uncompiled. As dynamic ints, one compiled block serves every layer.
        import torch._dynamo as dynamo
        dynamo.config.allow_unspec_int_on_nn_module = True
        for block in parallel.blocks(model):
            block.compile()
    meta = any(p.is_meta for p in model.parameters())
    if not meta:
        model.to(d.device)
    prec_name = precision.resolve(cfg.train.precision, d.device)
    model = parallel.wrap(model, cfg.parallel.mode, d, cfg.parallel.fsdp_reshard_after_forward, prec_name)
    if meta:
        build.materialize(model, d.device, seed=cfg.model.seed)
    model.train()
    raw = parallel.unwrap(model)
    prec = (precision.MasterWeights(raw, d.device, d.world_size) if prec_name == "bf16" and cfg.parallel.mode != "fsdp"
            else precision.Precision(prec_name, d.device))

    from trainer.optim import build_optimizer
    optimizer = build_optimizer(model, cfg.optim, d.device)
    lr_at = schedule.from_config(cfg.optim, cfg.train.max_steps)

    # ---- resume
    t_load = time.perf_counter()
    state = ckpt.load_latest(model, optimizer)
    start_step, skipped, best_val = 0, 0, None
    if state is not None:
        start_step = loader.check_state(state["loader"])
        skipped = int(state.get("skipped_steps", 0))
        best_val = state.get("best_val_loss")
        log.info("resumed from %s at step %d (saved by %d ranks, now %d), loaded in %.1fs", state["path"], start_step,
                 state.get("world_size", -1), d.world_size, time.perf_counter() - t_load)

    val_rows = []  # (name, this rank's rows): one set, or one per source of a mixture that has val_shards
    if cfg.train.eval_every > 0:
        from trainer.data.sources import check_val_set, val_sets
        from trainer.evaluate import load_val_rows
        for name, source, url in val_sets(cfg.data):
            check_val_set(loader, source, url)
            val_rows.append((name, load_val_rows(url, cfg.data.val_sequences, d)))
    # varlen: validation masks documents as training does (the same tokenizer, so the same EOS/BOS ids)
    val_boundaries = (functools.partial(document_bounds, eos_id=manifest.eos_id, bos_id=manifest.bos_id)
                      if cfg.data.varlen else None)

    n_params = build.count_parameters(raw)
    flops = flops_per_token(raw, seq_len)
    peak = cfg.run.peak_tflops * 1e12 if cfg.run.peak_tflops else peak_flops(d.device)
    tokens_per_step = cfg.data.global_batch * seq_len
    log.info("model %s: %.2fM parameters; %.3g FLOPs/token trained (6N = %.3g); %s on %d x %s, precision %s; "
             "global batch %d x %d tokens, micro-batch %d, %d accumulation step(s)", model_config.model_type,
             n_params / 1e6, flops["train"], six_n(raw), cfg.parallel.mode, d.world_size, d.device.type, prec_name,
             cfg.data.global_batch,
             seq_len, micro, loader.local_batch // micro)

    # ---- the loop
    metrics = MetricsLog(out, d.is_main, start_step, tensorboard=cfg.run.tensorboard)
    from shards.progress import Progress
    bar = Progress(cfg.train.max_steps - start_step, "train", unit="step", enabled=d.is_main and cfg.run.progress,
                   log_every=cfg.run.progress_every)
    step, bad_in_a_row = start_step, 0
    last_ckpt = state["path"] if state else None  # the newest good one: a newer directory may be damaged
    val_loss = None
    tps_list = []
    t_run = time.perf_counter()
    batches = loader.iter_batches(start_step=start_step)
    try:
        while step < cfg.train.max_steps:
            t0 = time.perf_counter()
            batch = next(batches)
            t_data = time.perf_counter() - t0
            assert batch.step == step, (batch.step, step)
            lr = lr_at(step)
            loss, grad_norm, applied = train_step(model, optimizer, batch.input_ids, batch.cu_seqlens, micro,
                                                  cfg.optim.clip, lr, d, prec)
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)
            dt = time.perf_counter() - t0
            if applied:
                bad_in_a_row = 0
            else:
                skipped += 1
                bad_in_a_row += 1
                log.warning("step %d: loss %s, grad norm %s: step skipped (no update), %d in a row",
                            step, loss, grad_norm, bad_in_a_row)
            step += 1
            tps = tokens_per_step / dt
            tps_list.append(tps)
            record = {"step": step - 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens": step * tokens_per_step, **_source_tokens(loader, step), "tokens_per_s": tps,
                      "mfu": flops["train"] * tps / (peak * d.world_size) if peak else None,
                      "data_wait_share": t_data / dt, "memory_gib": memory_gib(d.device),
                      "skipped_steps": skipped, "epoch": batch.epoch}
            if val_rows and (step % cfg.train.eval_every == 0 or step == cfg.train.max_steps):
                from trainer.evaluate import validation_loss
                losses = {name: validation_loss(model, rows, micro, d, prec.eval_autocast, val_boundaries)
                          for name, rows in val_rows}
                # a mixture: val/<name> per source, and their mean weighted by validation tokens
                sizes = {name: rows.numel() for name, rows in val_rows}
                val_loss = sum(losses[n] * sizes[n] for n in losses) / sum(sizes.values())
                best_val = val_loss if best_val is None else min(best_val, val_loss)
                record.update({f"val/{n}": v for n, v in losses.items() if n})
                record["val_loss"] = val_loss
            metrics.log(record)
            if bad_in_a_row >= cfg.train.max_bad_steps:
                raise TrainingDiverged(
                    f"{bad_in_a_row} steps in a row with a NaN/inf loss or gradient norm (last: step {step - 1}); "
                    f"stopping. The last checkpoint ({last_ckpt}) is intact; "
                    f"{divergence_causes(seq_len, cfg.optim.lr, cfg.optim.clip)} "
                    f"(train.max_bad_steps={cfg.train.max_bad_steps})")
            bar.update(1, extra=f"loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s" +
                       (f" val {val_loss:.4f}" if val_loss is not None else ""))
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                last_ckpt = _save(ckpt, step, model, optimizer, loader, skipped, best_val)
        if cfg.checkpoint.at_end and step > start_step and (last_ckpt is None or not last_ckpt.endswith(f"{step:06d}")):
            last_ckpt = _save(ckpt, step, model, optimizer, loader, skipped, best_val)
    finally:
        batches.close()
        loader.close()
        bar.close()
        metrics.close()

    elapsed = time.perf_counter() - t_run
    steady = tps_list[1:] or tps_list  # the first step pays for kernel compilation
    summary = {"steps": step, "steps_this_run": step - start_step, "tokens": step * tokens_per_step,
               "time_s": elapsed, "mean_tokens_per_s": sum(steady) / len(steady) if steady else None,
               "mfu": (flops["train"] * sum(steady) / len(steady) / (peak * d.world_size)) if peak and steady else None,
               "final_loss": loss if step > start_step else None, "final_val_loss": val_loss,
               "best_val_loss": best_val, "skipped_steps": skipped,
               "checkpoint": last_ckpt, "parameters": n_params,
               "flops_per_token": flops["train"], "six_n": six_n(raw)}
    if loader.num_sources > 1:  # the realised mix: each source's share of the sequences trained on
        used = loader.sequences_before(step)
        summary["mix"] = {n: u / max(1, sum(used)) for n, u in zip(loader.names, used)}
    if d.is_main:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        log.info("done: %s", ", ".join(f"{k}={_fmt(v)}" for k, v in summary.items()))
    return summary


def _source_tokens(loader, step: int) -> dict:
    """Tokens trained on per source after `step` steps (a mixture; exact, from the order itself)."""
    if loader.num_sources == 1:
        return {}
    seq_len = loader.manifest.seq_len
    return {f"tokens/{n}": u * seq_len for n, u in zip(loader.names, loader.sequences_before(step))}


def _fmt(v):
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _save(ckpt, step, model, optimizer, loader, skipped, best_val) -> str:
    t = time.perf_counter()
    path = ckpt.save(step, model, optimizer, {"loader": loader.state_dict(step), "skipped_steps": skipped,
                                              "best_val_loss": best_val})
    log.info("checkpoint %s (%.1fs)", path, time.perf_counter() - t)
    return path


def _write_run_files(cfg: Config, out: str, model_config, loader) -> None:
    """The resolved config, the model config, the tokenizer and its special ids: enough to export from out_dir."""
    with open(os.path.join(out, "config.toml"), "w") as f:
        f.write(to_toml(cfg))
    model_config.to_json_file(os.path.join(out, "model.json"))
    manifest, storage = loader.manifest, loader.storage  # the loader's open storage: no second connection
    with open(os.path.join(out, "data.json"), "w") as f:
        json.dump({"shards": cfg.data.shards if loader.num_sources == 1 else
                   {n: s.shards for n, s in zip(loader.names, cfg.data.sources)}, "seq_len": manifest.seq_len, "eos_id": manifest.eos_id,
                   "bos_id": manifest.bos_id, "tokenizer": manifest.tokenizer}, f, indent=1)
    if storage.exists("tokenizer.json"):
        with open(os.path.join(out, "tokenizer.json"), "wb") as f:
            f.write(storage.read("tokenizer.json"))


RUN_FILES = ("config.toml", "model.json", "data.json", "tokenizer.json")


def _copy_run_files(out: str, ckpt_dir: str) -> None:
    """The run files into CHECKPOINT_DIR/run/, so that `python -m trainer.export CHECKPOINT_DIR/step-N` works
    without the run dir (which lives on rank 0's machine)."""
    from shards.backends import open_storage
    storage = open_storage(ckpt_dir)
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                storage.put_bytes(f"run/{name}", f.read())
