"""`python -m trainer.data plan --config RUN.toml` and `peek`: the order of the run a config describes,
and the text of one batch, from the loader the trainer builds (trainer/data/sources.py)."""
from __future__ import annotations

import json
import sys

import numpy as np

from trainer.data.loader import TokenLoader
from shards.progress import plural
from trainer.data.sources import open_loader

BOUNDARY = " ¦ "  # marks a document boundary (an EOS or BOS token) in peek's text


def config_loader(args, world_size: int, rank: int) -> TokenLoader:
    from trainer.config import load
    cfg = load(args.config, args.overrides)
    return open_loader(cfg.data, layout=cfg.data.streams, world_size=world_size, rank=rank)


def cmd_plan(args) -> None:
    """One JSON line per step: the rank's rows as (shard, sequence) of their own source, and the source."""
    with config_loader(args, args.world_size, args.rank) as ld:
        mix, out = ld.mixture, sys.stdout
        for step in range(args.start_step, args.start_step + args.steps):
            rows = mix.step_rows(step, args.world_size, args.rank)
            shard, seq = mix.sequences(rows.sources, rows.blocks, rows.rows)
            line = {"step": step, "rank": args.rank}
            if ld.num_sources == 1:
                line["epoch"] = int(rows.epochs[0])
            line["sequences"] = [[a, b] for a, b in zip(shard.tolist(), seq.tolist())]
            line["sources"] = [ld.names[i] for i in rows.sources.tolist()]
            out.write(json.dumps(line, separators=(",", ":")) + "\n")


def _tokenizer(ld: TokenLoader):
    from tokenizers import Tokenizer
    if not ld.storage.exists("tokenizer.json"):
        return None
    return Tokenizer.from_str(ld.storage.read("tokenizer.json").decode())


def row_text(tokens: np.ndarray, tok, eos_id: int, bos_id: int | None) -> str:
    """A row decoded document by document, boundaries marked (token ids if there is no tokenizer)."""
    cuts = np.flatnonzero((tokens == eos_id) | ((tokens == bos_id) if bos_id is not None else False))
    parts, lo = [], 0
    for c in cuts.tolist() + [len(tokens)]:
        piece = tokens[lo:c].tolist()
        parts.append(tok.decode(piece) if tok is not None else " ".join(map(str, piece)))
        lo = c + 1
    return BOUNDARY.join(parts)


def cmd_peek(args) -> None:
    """The rows of step S for one rank: source, shard, sequence, and the start and end of the text."""
    with config_loader(args, args.world_size, args.rank) as ld:
        tok = _tokenizer(ld)
        batches = ld.iter_batches(args.step)
        try:
            batch = next(batches)
        finally:
            batches.close()
        m = ld.manifest
        print(f"step {batch.step}, rank {args.rank} of {args.world_size}: {plural(len(batch.sequences), 'row')} of "
              f"{plural(m.seq_len, 'token')}{'' if tok else ' (no tokenizer.json beside the shards: token ids)'}; "
              f"'{BOUNDARY.strip()}' marks a document boundary")
        n = len(batch.sequences) if args.rows is None else min(args.rows, len(batch.sequences))
        for j in range(n):
            text = row_text(batch.input_ids[j].numpy(), tok, m.eos_id, m.bos_id).replace("\n", "⏎")
            head, tail = text[:args.chars], text[-args.chars:] if len(text) > args.chars else ""
            shard, seq = batch.sequences[j]
            print(f"[{j}] {ld.names[batch.sources[j]]} shard {shard} seq {seq}: {head!r}"
                  + (f" ... {tail!r}" if tail else ""))
