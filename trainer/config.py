"""The run configuration: typed dataclasses loaded from TOML, with `section.key=value` overrides.

An unknown key or a value of the wrong type is a ConfigError naming the key and where it came from
(the TOML file or the command line). A TOML value must have the key's type (`global_batch = "4"` is refused);
command-line values are strings, parsed to the key's type. Every key has a default, so a TOML file lists only
what it changes.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from shards.errors import UserError
from shards.storage import S3ConfigError, parse_s3_url


class ConfigError(UserError, ValueError):
    """A bad run configuration. The message names the key and the file (or the command line)."""


@dataclass
class ModelConfig:
    config: str = "configs/demo_gla.json"  # model JSON (FLA config fields + model_type)
    init_from: str | None = None  # HF model dir to start from (weights only; optimizer and data start fresh)
    init_device: Literal["auto", "cpu", "meta", "cuda"] = "auto"  # auto: meta for fsdp (init after sharding), else the device
    seed: int = 0  # random init seed (same on every rank)
    # CPU only: "torch" runs GLA's FLA ops as plain PyTorch (models/cpu_torch.py; other models fall back to the
    # interpreter with a log line), "triton" runs FLA's Triton kernels under the Triton interpreter (slow)
    cpu_kernels: Literal["torch", "triton"] = "torch"
    # GPU only: "fused" runs GLA blocks through models/fused.py (shared-input projections whose gradients are one
    # tensor, the residual add fused into both pre-norms, our norm kernels; same parameters); models it does not
    # cover, and train.compile,
    # keep FLA's modules with a log line. "fla": FLA's modules unchanged.
    gpu_kernels: Literal["fused", "fla"] = "fused"


@dataclass
class SourceConfig:
    """One [[data.sources]] table: a dataset of a mixture."""
    name: str = ""  # [A-Za-z0-9_-]+, unique
    shards: str = ""  # local dir or s3://bucket/prefix
    weight: float = 1.0  # weights need not sum to 1 (they are normalised)
    val_shards: str | None = None


@dataclass
class StageConfig:
    """One [[data.stages]] table: from start_step on, these weights (every source named)."""
    start_step: int = 0
    weights: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    shards: str = "data/shards/shakespeare"  # local dir or s3://bucket/prefix (one dataset; or [[data.sources]])
    val_shards: str | None = None
    seed: int = 0
    global_batch: int = 8  # sequences per optimizer step, over all ranks
    streams: int | None = None  # loader streams C (C | global_batch); fixed at the first launch (None: the
    # checkpoint's, else global_batch). Formerly data.layout, still accepted
    varlen: bool = False  # document boundaries -> cu_seqlens for FLA kernels
    prefetch_steps: int = 4
    val_sequences: int = 64  # the first M sequences of the validation set, in manifest order
    sources: list[SourceConfig] = field(default_factory=list)  # [[data.sources]]: a mixture (instead of shards)
    stages: list[StageConfig] = field(default_factory=list)  # [[data.stages]]: weights from a step on
    max_repeats: float = 4.0  # warn at start when a source will be read more than this many epochs


@dataclass
class TrainConfig:
    max_steps: int = 100
    micro_batch: int | None = None  # sequences per forward/backward per rank (None: the whole local batch)
    eval_every: int = 0  # 0: no validation during the run
    max_bad_steps: int = 5  # NaN/inf steps in a row before the run stops
    activation_checkpointing: bool = False
    compile: bool = False
    # GPU, train.precision=bf16, parallel.mode none/ddp, fixed-shape batches: each micro-batch's forward and
    # backward replayed as one CUDA graph (trainer/graphs.py), so Python's kernel launches no longer pace the GPU
    cuda_graphs: bool = False
    # bf16: bf16 weights/activations for forward+backward over fp32 master weights and optimizer states;
    # autocast: fp32 weights under bf16 autocast (the GPU default before); fp32. auto: bf16 on GPU, fp32 on CPU.
    precision: Literal["auto", "bf16", "autocast", "fp32"] = "auto"
    deterministic: bool = False  # torch.use_deterministic_algorithms (CPU tests are deterministic anyway)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 10
    schedule: Literal["cosine", "wsd", "linear"] = "cosine"
    decay_steps: int | None = None  # wsd: length of the final decay (None: 10% of max_steps)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0: only at the end
    keep: int = 3  # keep the last k complete checkpoints
    at_end: bool = True
    # where checkpoints go: None = <run.out_dir>/ckpt; a directory, or s3://bucket/prefix (object storage:
    # no shared filesystem needed on several nodes)
    dir: str | None = None


@dataclass
class ParallelConfig:
    mode: Literal["none", "ddp", "fsdp"] = "none"
    fsdp_reshard_after_forward: bool = True
    # fsdp with gradient accumulation (train.micro_batch below the rank's batch): false reduce-scatters each
    # micro-batch's gradients (they stay sharded: FSDP2's and torchtitan's default); true keeps them unsharded, in
    # fp32, until the step's last micro-batch (one reduce-scatter a step, but the whole model's gradient on every rank)
    fsdp_defer_reduce: bool = False


@dataclass
class RunConfig:
    out_dir: str = "runs/demo"
    tensorboard: bool = True
    progress: bool = True
    progress_every: float = 10.0  # seconds between progress lines when stderr is not a terminal
    peak_tflops: float | None = None  # accelerator peak for MFU; None: looked up from the device name


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


ALIASES = {"data.layout": "data.streams"}  # old names that existing configs and scripts still use


def _coerce(value, tp, key: str, where: str, text: bool = False):
    """Check/convert one value to the annotated type `tp`. Command-line values are strings (`text`) and are
    parsed; a TOML value must already have the key's type (a float key takes an integer too)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{where}: {key} = {value!r} is not a valid {_type_name(tp)}"
                      + ("" if text or not isinstance(value, str) or tp is str else
                         " (a TOML string: write the value without quotes)"))
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {key} = {value!r} must be one of {list(args)}")
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is not type(None):
                return _coerce(value, a, key, where, text)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if text and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if text:
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if text:
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is tuple:
        if text:
            spelled = value.strip()
            try:
                value = json.loads(spelled if spelled.startswith("[") else f"[{spelled}]")
            except json.JSONDecodeError:
                raise bad from None
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, key, where) for v, a in zip(value, args))
    raise bad


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _tables(value, tp, key: str, where: str) -> list:
    """An array of TOML tables ([[data.sources]]) as a list of `tp` dataclasses."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{where}: {key} must be written as [[{key}]] tables in the TOML file "
                          f"(it cannot be set from the command line)")
    hints = typing.get_type_hints(tp)
    out = []
    for n, table in enumerate(value):
        obj = tp()
        for k, v in table.items():
            if k not in hints:
                raise ConfigError(f"{where}: unknown key {k!r}{_did_you_mean(k, hints)} in [[{key}]] number {n + 1}; "
                                  f"it has {sorted(hints)}")
            if hints[k] is dict:
                if not isinstance(v, dict) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                      for x in v.values()):
                    raise ConfigError(f"{where}: {key}[{n}].{k} must be an inline table of numbers, "
                                      f"e.g. {{ web = 0.5, code = 0.5 }}")
                setattr(obj, k, {str(a): float(b) for a, b in v.items()})
            else:
                setattr(obj, k, _coerce(v, hints[k], f"{key}[{n}].{k}", where))
        out.append(obj)
    return out


# other trainers' names for our keys: suggested, never accepted
SYNONYMS = {"learning_rate": "lr", "warmup_steps": "warmup", "lr_warmup_steps": "warmup", "batch_size": "global_batch",
            "train_batch_size": "global_batch", "micro_batch_size": "micro_batch", "steps": "max_steps",
            "max_iters": "max_steps", "total_steps": "max_steps", "grad_clip": "clip", "max_grad_norm": "clip",
            "output_dir": "out_dir", "save_steps": "every", "eval_steps": "eval_every", "dtype": "precision"}


def _did_you_mean(word: str, options) -> str:
    """' (did you mean X?)' for the option closest to a mistyped key (or named as another trainer names it), or ''."""
    options = list(options)
    head, _, name = word.rpartition(".")
    names = {o.rpartition(".")[2] for o in options}
    close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.7)
    want = SYNONYMS.get(name) if SYNONYMS.get(name) in names else close[0] if close else None
    if want is None:
        return ""
    same = [o for o in options if o.rpartition(".")[2] == want]  # the key of that name, in the section given first
    return f" (did you mean {min(same, key=lambda o: o.rpartition('.')[0] != head)!r}?)"


def _all_keys() -> list[str]:
    return [f"{section}.{n}" for section, tp in typing.get_type_hints(Config).items()
            for n in typing.get_type_hints(tp)]


def _set(cfg: Config, key: str, value, where: str, text: bool = False) -> None:
    key = ALIASES.get(key, key)
    section, _, name = key.partition(".")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections or not name:
        raise ConfigError(f"{where}: unknown key {key!r}{_did_you_mean(key, _all_keys())}; keys are section.name "
                          f"with section one of {sorted(sections)}")
    if key == "train.autocast":
        raise ConfigError(f"{where}: train.autocast was replaced by train.precision (bf16: bf16 compute over fp32 "
                          f"master weights, the GPU default; autocast: the former train.autocast=bf16; fp32: the "
                          f"former train.autocast=off)")
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    if name not in hints:
        raise ConfigError(f"{where}: unknown key {key!r}{_did_you_mean(key, _all_keys())}; [{section}] has "
                          f"{sorted(hints)}")
    if typing.get_origin(hints[name]) is list:
        v = _tables(value, typing.get_args(hints[name])[0], key, where)
    else:
        v = _coerce(value, hints[name], key, where, text)
    setattr(obj, name, v)


def load(path: str | None, overrides: list[str] = ()) -> Config:
    """Config from a TOML file (may be None: defaults) plus `section.key=value` overrides."""
    cfg = Config()
    if path is not None:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: unknown top-level key {section!r}; put keys in a [section]")
            for name, value in table.items():
                _set(cfg, f"{section}.{name}", value, path)
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"command line: {item!r} is not key=value (e.g. train.max_steps=100)")
        _set(cfg, key.strip(), value.strip(), "command line", text=True)
    validate(cfg, (path or "defaults") + (" with the command-line overrides" if overrides else ""))
    return cfg


def validate(cfg: Config, where: str) -> None:
    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ConfigError(f"{where}: {key} {msg}")
    need(cfg.data.global_batch > 0, "data.global_batch", "must be > 0")
    need(cfg.train.max_steps > 0, "train.max_steps", "must be > 0")
    need(cfg.train.micro_batch is None or cfg.train.micro_batch > 0, "train.micro_batch", "must be > 0")
    need(cfg.train.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1 (0 would stop after the first step)")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(0 <= cfg.optim.min_lr <= cfg.optim.lr, "optim.min_lr", "must be between 0 and optim.lr")
    need(cfg.optim.warmup >= 0, "optim.warmup", "must be >= 0")
    need(cfg.optim.decay_steps is None or cfg.optim.decay_steps >= 0, "optim.decay_steps", "must be >= 0")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    need(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
    ckpt_dir = cfg.checkpoint.dir
    if ckpt_dir and "://" in ckpt_dir:
        need(ckpt_dir.startswith("s3://"), "checkpoint.dir", f"= {ckpt_dir!r}: use a directory or s3://bucket/prefix")
        try:
            parse_s3_url(ckpt_dir)
        except S3ConfigError as e:
            raise ConfigError(f"{where}: checkpoint.dir {e}") from None
    need(all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas", "must be two numbers in [0, 1)")
    _validate_sources(cfg.data, need)


SOURCE_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _validate_sources(data: DataConfig, need) -> None:
    need(data.max_repeats > 0, "data.max_repeats", "must be > 0")
    need(not data.stages or data.sources, "data.stages", "need [[data.sources]] (a mixture) to have weights to change")
    if not data.sources:
        return
    need(data.shards == DataConfig.shards and data.val_shards is None, "data.shards",
         "and [[data.sources]] are both set: a mixture lists every dataset as a source (val_shards per source)")
    names = [s.name for s in data.sources]
    for n, s in enumerate(data.sources):
        need(bool(SOURCE_NAME.fullmatch(s.name)), f"data.sources[{n}].name",
             f"= {s.name!r} must be letters, digits, _ or - (it names metrics: val/<name>)")
        need(bool(s.shards), f"data.sources[{n}].shards", f"is missing for source {s.name!r}")
        need(s.weight >= 0, f"data.sources[{n}].weight", f"= {s.weight} must be >= 0")
    dup = sorted({x for x in names if names.count(x) > 1})
    need(not dup, "data.sources", f"name {', '.join(dup)} more than once: names must be unique")
    need(sum(s.weight for s in data.sources) > 0, "data.sources", "weights are all 0: give one a weight > 0")
    last = 0
    for n, st in enumerate(data.stages):
        key = f"data.stages[{n}]"
        need(st.start_step > last, f"{key}.start_step", f"= {st.start_step} must be > {last} (stages in order, "
             f"the base weights start at step 0)")
        last = st.start_step
        unknown, missing = sorted(set(st.weights) - set(names)), [x for x in names if x not in st.weights]
        need(not unknown, f"{key}.weights", f"names unknown {'source' if len(unknown) == 1 else 'sources'} "
             f"{', '.join(unknown)}; sources are {', '.join(names)}")
        need(not missing, f"{key}.weights", f"lacks {', '.join(missing)}: name every source (0 pauses one)")
        need(all(w >= 0 for w in st.weights.values()) and sum(st.weights.values()) > 0, f"{key}.weights",
             "must be >= 0 with at least one > 0")


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (written to out_dir/config.toml)."""
    lines = []
    for section, table in cfg.to_dict().items():
        lines.append(f"[{section}]")
        arrays = {k: v for k, v in table.items() if isinstance(v, list)}
        for k, v in table.items():
            if k in arrays:
                continue
            if v is None:
                lines.append(f"# {k} = (none)")
            else:
                lines.append(f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}")
        for k, items in arrays.items():
            for item in items:
                lines.append(f"[[{section}.{k}]]")
                for a, b in item.items():
                    if isinstance(b, dict):
                        inner = ", ".join(f"{json.dumps(x)} = {json.dumps(y)}" for x, y in b.items())
                        lines.append(f"{a} = {{ {inner} }}")
                    elif b is not None:
                        lines.append(f"{a} = {json.dumps(b)}")
        lines.append("")
    return "\n".join(lines)
