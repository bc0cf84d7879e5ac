"""A run config's data section -> the loader (one dataset or a mixture), its validation sets and the
mixture table printed at start. The trainer and `python -m trainer.data plan/peek --config` share it."""
from __future__ import annotations

import os

from shards.backends import open_storage
from shards.errors import NotFoundError
from shards.format import MANIFEST_NAME, read_manifest
from shards.progress import human, plural
from trainer.data.loader import Source, TokenLoader, check_sources_agree


def check_path(key: str, url: str) -> None:
    """A data path that is not there is named as such ("does not exist"), not as a dataset without a manifest
    (which read_manifest explains as an interrupted shardgen)."""
    make = f"make the shards with `python -m shardgen INPUT --output {url} --tokenizer ...`, or fix the path"
    if "://" not in url:
        if not os.path.exists(url):
            raise NotFoundError(f"{key}={url} does not exist: {make}")
        if not os.path.isdir(url):
            raise NotFoundError(f"{key}={url} is a file, not a shards directory: {make}")
        return
    storage = open_storage(url)
    try:
        if not storage.exists(MANIFEST_NAME) and not storage.list():
            raise NotFoundError(f"{key}={url} does not exist (no objects under that prefix): {make}")
    finally:
        storage.close()


def open_loader(data, *, layout: int | None, world_size: int = 1, rank: int = 0) -> TokenLoader:
    """The loader that `data` (a DataConfig) describes: [[data.sources]] with [[data.stages]], or data.shards."""
    if data.sources:
        for n, s in enumerate(data.sources):
            check_path(f"data.sources[{n}].shards ({s.name})", s.shards)
        shards = [Source(s.name, s.shards, s.weight) for s in data.sources]
        stages = [(st.start_step, [st.weights[s.name] for s in data.sources]) for st in data.stages]
    else:
        check_path("data.shards", data.shards)
        shards, stages = data.shards, []
    return TokenLoader(shards, seed=data.seed, global_batch=data.global_batch, layout=layout,
                       world_size=world_size, rank=rank, prefetch_steps=data.prefetch_steps, varlen=data.varlen,
                       stages=stages)


def shards_tokenizer(loader: TokenLoader) -> bytes | None:
    """The tokenizer.json beside the shards (every source has the same one), or None."""
    storage = loader.storage
    return storage.read("tokenizer.json") if storage.exists("tokenizer.json") else None


def val_sets(data) -> list[tuple[str, int, str]]:
    """(name, source index, URL) of each validation set: per source in a mixture, else data.val_shards."""
    if data.sources:
        return [(s.name, i, s.val_shards) for i, s in enumerate(data.sources) if s.val_shards]
    return [("", 0, data.val_shards)] if data.val_shards else []


def check_val_set(loader: TokenLoader, source: int, url: str) -> None:
    """Validation shards must exist and fit their source as mixed sources fit each other (seq_len, tokenizer)."""
    name = loader.names[source]
    check_path(f"data.sources[{source}].val_shards ({name})" if loader.mixed else "data.val_shards", url)
    storage = open_storage(url)
    try:
        manifest = read_manifest(storage)
    finally:
        storage.close()
    label = f"source {name!r}" if loader.mixed else f"data.shards {loader.storage}"
    check_sources_agree([label, f"its val_shards {url}"], [loader.manifests[source], manifest],
                        why="validation shards need the seq_len and tokenizer of the data they validate")


def mixture_table(loader: TokenLoader, max_steps: int, max_repeats: float) -> tuple[list[str], list[str]]:
    """Per source and stage: sequences, tokens, weight, sequences per step and the epochs of it that the
    run consumes by `max_steps`; plus a warning per source read more than `max_repeats` times."""
    mix, seq_len = loader.mixture, loader.manifest.seq_len
    k = mix.items_per_slot
    ends = mix.stage_starts[1:] + [max_steps]
    head = (f"{'source':<12} {'sequences':>11} {'tokens':>8} {'steps':>17} {'weight':>7} {'seq/step':>9} "
            f"{'epochs':>7}")
    lines, warnings = [f"mixture of {mix.num_sources} sources, global batch {mix.global_batch} in "
                       f"{plural(mix.layout, 'stream')}, {plural(max_steps, 'step')}:", head], []
    for i, (name, plan) in enumerate(zip(loader.names, mix.plans)):
        per_epoch = plan.steps_per_epoch * plan.global_batch
        total = 0.0
        for j, (start, end) in enumerate(zip(mix.stage_starts, ends)):
            if start >= max_steps:
                break
            end = min(end, max_steps)
            used = (mix.slots_before(end)[i] - mix.slots_before(start)[i]) * k
            total += used / per_epoch
            stage = mix.stages[j]
            weight = float(stage.q[i] / stage.slots)
            lines.append(f"{name if j == 0 else '':<12} {plan.num_sequences if j == 0 else '':>11} "
                         f"{human(plan.num_sequences * seq_len) if j == 0 else '':>8} {f'{start}..{end - 1}':>17} "
                         f"{weight:>7.3f} {float(stage.q[i]) * k:>9.2f} {_epochs(used / per_epoch):>7}")
        if total > max_repeats:
            warnings.append(f"source {name!r} will be read {total:.3g} times (epochs) by train.max_steps="
                            f"{max_steps}, more than data.max_repeats={max_repeats:g}: give it less weight or "
                            f"more data (or raise data.max_repeats)")
    return lines, warnings


def _epochs(x: float) -> str:
    """The epochs column: three decimals, so that the points line up as in the weight column; a share too small
    to show is "<0.001", not a zero that reads as unused."""
    return "<0.001" if 0 < x < 0.0005 else f"{x:.3f}"
