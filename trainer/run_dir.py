"""The run directory (run.out_dir): who may write it, what a run leaves in it, where its checkpoints are,
and how `trainer.export` finds a run's files from a checkpoint.

    OUT/.lock              rank 0's flock while a run writes here (pid and host inside)
    OUT/config.toml        the resolved run config
    OUT/model.json         the model config as given (before it is adapted to the device)
    OUT/data.json          the shards' URL, seq_len, special token ids and tokenizer identity
    OUT/tokenizer.json     the shards' tokenizer, when they have one
    OUT/metrics.jsonl, OUT/tb/   per-step metrics (trainer/metrics.py)
    OUT/summary.json       the finished run's totals
    OUT/ckpt/step-NNNNNN/  checkpoints, or in checkpoint.dir (local or s3://) with a copy of the run files
                           in CHECKPOINT_DIR/run/, so that one exports without the run directory
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import tomllib

from shards.backends import open_storage
from shards.errors import NotFoundError
from shards.storage import is_s3
from trainer.checkpoint import NAME_RE, STATE_NAME, list_checkpoints
from trainer.config import Config, ConfigError, to_toml
from trainer.data import TokenLoader
from trainer.parallel import Dist

log = logging.getLogger("trainer")

RUN_FILES = ("config.toml", "model.json", "data.json", "tokenizer.json")


def check_out_dir(out: str) -> None:
    if "://" in out:
        raise ConfigError(f"run.out_dir={out}: checkpoints to object storage are not supported through "
                          f"run.out_dir, which must be a local directory (rank 0 writes metrics, TensorBoard logs "
                          f"and the config there); keep it local and set checkpoint.dir=s3://bucket/prefix to put "
                          f"the checkpoints in object storage (data.shards and data.val_shards may be s3:// too)")


@contextlib.contextmanager
def lock(out: str, d: Dist):
    """One run at a time per run.out_dir. Two runs in one directory (a second launch while the first still
    runs, or workers left behind by a killed torchrun) would interleave metrics and overwrite each other's
    checkpoints. Rank 0 holds an flock on OUT/.lock for the run; the kernel drops it when the process dies,
    so a killed run never leaves a stale lock behind."""
    if not d.is_main or "://" in out:  # an s3:// out_dir is refused by check_out_dir
        yield
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"run.out_dir={out} is a file, not a directory: give a new directory (or a run's, to "
                          f"resume it)")
    created = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run.out_dir={out}: cannot create it ({e.strerror}): give a directory you can write") from None
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"run.out_dir={out}: another run is writing to it ({holder}); wait for it to end or "
                          f"stop it, or give this run another run.out_dir") from None
    done = False
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
        done = True
    finally:
        f.close()
        if not done and created and os.listdir(out) == [".lock"]:  # a launch that failed before writing anything
            shutil.rmtree(out, ignore_errors=True)


def checkpoint_dir(cfg: Config) -> str:
    return cfg.checkpoint.dir or os.path.join(cfg.run.out_dir, "ckpt")


def config_changes(out: str, cfg: Config) -> list[str]:
    """The settings of `cfg` that differ from OUT/config.toml (the config of the run's last launch) as
    "key old -> new", in the config's order; [] where there is no config.toml (a new run) or it cannot be read."""
    try:
        with open(os.path.join(out, "config.toml"), "rb") as f:
            before = _flat(tomllib.load(f))
    except (OSError, tomllib.TOMLDecodeError):
        return []
    after = _flat(tomllib.loads(to_toml(cfg)))
    keys = list(after) + [k for k in before if k not in after]
    unset = object()
    return [f"{k} {_toml_value(before.get(k, unset), unset)} -> {_toml_value(after.get(k, unset), unset)}"
            for k in keys if before.get(k, unset) != after.get(k, unset)]


def _flat(table: dict, prefix: str = "") -> dict:
    """{"optim.lr": 0.0003, "data.sources[1].weight": 1.0, ...}: a parsed TOML's values by their full key."""
    flat = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flat(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):  # [[data.sources]], [[data.stages]]
            for i, item in enumerate(v):
                flat.update(_flat(item, f"{key}[{i}]."))
        else:
            flat[key] = v
    return flat


def _toml_value(v, unset) -> str:
    return "(none)" if v is unset else json.dumps(v)


def write_run_files(cfg: Config, model_config, loader: TokenLoader) -> None:
    """The resolved config, the model config, the tokenizer and its special ids: enough to export from out_dir."""
    out = cfg.run.out_dir
    manifest, storage = loader.manifest, loader.storage  # the loader's open storage: no second connection
    with open(os.path.join(out, "config.toml"), "w") as f:
        f.write(to_toml(cfg))
    model_config.to_json_file(os.path.join(out, "model.json"))
    with open(os.path.join(out, "data.json"), "w") as f:
        json.dump({"shards": cfg.data.shards if loader.num_sources == 1 else
                   {n: s.shards for n, s in zip(loader.names, cfg.data.sources)}, "seq_len": manifest.seq_len, "eos_id": manifest.eos_id,
                   "bos_id": manifest.bos_id, "tokenizer": manifest.tokenizer}, f, indent=1)
    if storage.exists("tokenizer.json"):
        with open(os.path.join(out, "tokenizer.json"), "wb") as f:
            f.write(storage.read("tokenizer.json"))
    else:  # training needs none; an export ships the model without one, and generate cannot read prompts
        log.warning("%s does not exist (`python -m shardgen verify` fails on it): training goes on, but an export "
                    "of this run will hold the model only; copy the tokenizer.json the shards were made with into "
                    "%s before exporting", storage.where("tokenizer.json"), out)


def copy_run_files(out: str, ckpt_dir: str) -> None:
    """The run files into CHECKPOINT_DIR/run/, so that `python -m trainer.export CHECKPOINT_DIR/step-N` works
    without the run dir (which lives on rank 0's machine)."""
    storage = open_storage(ckpt_dir)
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                storage.put_bytes(f"run/{name}", f.read())


def read_summary(out: str) -> dict | None:
    """OUT/summary.json, or None where there is none (or it cannot be read)."""
    try:
        with open(os.path.join(out, "summary.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_summary(out: str, summary: dict) -> None:
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


def resolve(ckpt: str) -> tuple[str, str]:
    """(run out_dir, checkpoint dir) for a run dir or a checkpoint dir. For a checkpoint in object storage the
    "run dir" is a local temporary copy of CHECKPOINT_DIR/run/."""
    if is_s3(ckpt):
        ckpt = ckpt.rstrip("/")
        parent, _, base = ckpt.rpartition("/")
        if NAME_RE.match(base):
            return fetch_run_files(parent, ckpt), ckpt
        found = list_checkpoints(ckpt)
        if not found:
            raise NotFoundError(f"{ckpt}: no complete checkpoint (step-NNNNNN/ with {STATE_NAME}) there")
        return fetch_run_files(ckpt, found[-1]), found[-1]
    ckpt = os.path.abspath(ckpt)
    if not os.path.exists(ckpt):
        raise NotFoundError(f"{ckpt} does not exist: give a run's out_dir (runs/NAME), one of its checkpoints "
                            f"(runs/NAME/ckpt/step-N) or an s3:// checkpoint.dir")
    if os.path.isfile(os.path.join(ckpt, STATE_NAME)):
        run_dir = os.path.dirname(os.path.dirname(ckpt))
        beside = os.path.join(os.path.dirname(ckpt), "run")  # a checkpoint.dir of its own: the copy there
        if not os.path.isfile(os.path.join(run_dir, "model.json")) and os.path.isfile(os.path.join(beside, "model.json")):
            run_dir = beside
        return run_dir, ckpt
    if os.path.isfile(os.path.join(ckpt, "model.json")):
        root = configured_checkpoint_dir(ckpt)
        found = list_checkpoints(root)
        if not found:
            raise NotFoundError(f"{ckpt}: a run directory without any complete checkpoint in {root}")
        return ckpt, found[-1]
    raise NotFoundError(f"{ckpt}: neither a run directory (with model.json) nor a checkpoint directory "
                        f"(with {STATE_NAME})")


def configured_checkpoint_dir(run_dir: str) -> str:
    """The run's checkpoint.dir from its config.toml (written by the trainer), else RUN_DIR/ckpt."""
    try:
        with open(os.path.join(run_dir, "config.toml"), "rb") as f:
            configured = tomllib.load(f).get("checkpoint", {}).get("dir")
    except (OSError, tomllib.TOMLDecodeError):
        configured = None
    return configured or os.path.join(run_dir, "ckpt")


def fetch_run_files(root: str, path: str) -> str:
    """ROOT/run/* (model.json, data.json, tokenizer.json, config.toml) into a local temporary directory."""
    storage = open_storage(root)
    if not storage.exists("run/model.json"):
        raise NotFoundError(f"{path}: no {root}/run/model.json beside it (the trainer writes the run files "
                            f"there at launch): export from the run directory instead")
    local = tempfile.mkdtemp(prefix="export-run-")
    atexit.register(shutil.rmtree, local, True)
    for name in RUN_FILES:
        if storage.exists(f"run/{name}"):
            with open(os.path.join(local, name), "wb") as f:
                f.write(storage.read(f"run/{name}"))
    return local
