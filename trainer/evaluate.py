"""Validation loss on a fixed set of rows (trainer/data/validation.py reads them): token losses and counts
summed over ranks. The training loop calls `validation_loss`; the command line scores any trained model on any
shards, with the same rows and the same arithmetic as a run's `val_loss`:

    python -m trainer.evaluate PATH --shards URL [--sequences 256] [--micro-batch 8] [--varlen] [--json]

PATH is what `trainer.generate` takes: an export (or any FLA model directory with a tokenizer.json), a run's
out_dir (its latest checkpoint) or one checkpoint directory (local or s3://). The shards must have been made with
the model's tokenizer (the same token for every id; checked) and hold ids its embedding table holds. The first
--sequences sequences of the dataset, in manifest order, are scored: a run's `val_loss` with data.val_sequences=N
on those shards is this number for N (to float rounding; on a GPU the model runs in bf16).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import sys

import torch

from shards.errors import UserError
from trainer.parallel import Dist, all_reduce_sum

log = logging.getLogger("trainer.evaluate")


class EvaluateError(UserError):
    pass


@torch.no_grad()
def validation_loss(model, rows: torch.Tensor, micro_batch: int, d: Dist, autocast, boundaries=None) -> float:
    """Mean next-token loss over all ranks' rows (each row predicts its own tokens 1..L-1).

    boundaries: for varlen runs, a function from a [rows, L] int array to the cu_seqlens of its
    documents (trainer.data.loader.cu_seqlens); the model then sees each document on its own, as in
    training. None: each row is one sequence."""
    was_training = model.training
    model.eval()
    loss_sum = tokens = 0.0
    for i in range(0, rows.shape[0], micro_batch):
        x = rows[i:i + micro_batch].to(d.device)
        with autocast():
            if boundaries is None:
                logits = model(input_ids=x).logits
            else:
                cu = torch.from_numpy(boundaries(rows[i:i + micro_batch].numpy())).to(d.device)
                logits = model(input_ids=x.reshape(1, -1), cu_seqlens=cu).logits.view(*x.shape, -1)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(),
                                                 reduction="sum")
        loss_sum += loss.item()
        tokens += x[:, 1:].numel()
    model.train(was_training)
    loss_sum, tokens = all_reduce_sum([loss_sum, tokens], d)
    return loss_sum / tokens


def evaluate(path: str, shards: str, sequences: int = 256, micro_batch: int = 8, varlen: bool = False,
             device: torch.device | None = None) -> dict:
    """Score the model at `path` on the first `sequences` sequences of `shards` (module doc): a dict with the mean
    next-token loss in nats, its perplexity, and what was scored."""
    from tokenizers import Tokenizer

    from models.build import vocab_difference
    from shards.backends import open_storage
    from shards.format import TOKENIZER_NAME, read_manifest
    from trainer import generate
    from trainer.data.loader import cu_seqlens
    from trainer.data.validation import load_val_rows

    device = device or generate.pick_device(None)
    storage = open_storage(shards)
    try:
        manifest = read_manifest(storage)
        data_tokenizer = storage.read(TOKENIZER_NAME) if storage.exists(TOKENIZER_NAME) else None
    finally:
        storage.close()
    total = manifest.totals()["sequences"]
    if total == 0:
        raise EvaluateError(f"{shards} holds no sequence")
    if sequences > total:
        log.warning("--sequences %d: %s holds %d, scoring them all", sequences, shards, total)
        sequences = total
    model, tok, _, _ = generate.load(path, device)
    if data_tokenizer is not None:
        differ = vocab_difference(Tokenizer.from_str(data_tokenizer.decode()).get_vocab(), tok.get_vocab())
        if differ:
            raise EvaluateError(f"{path} was trained with another tokenizer than {shards} was made with: {differ}; "
                                f"score it on shards made with its own tokenizer (python -m shardgen ... --tokenizer "
                                f"the model's tokenizer.json)")
    vocab = manifest.tokenizer.get("vocab_size")
    if isinstance(vocab, int) and vocab > model.config.vocab_size:
        raise EvaluateError(f"{shards} holds ids up to {vocab - 1}, {path}'s embedding table only "
                            f"{model.config.vocab_size}: score it on shards made with its own tokenizer")
    one = Dist(device=device)  # one process: this rank's rows are all of them
    rows = load_val_rows(shards, sequences, one)
    boundaries = (functools.partial(cu_seqlens, eos_id=manifest.eos_id, bos_id=manifest.bos_id) if varlen else None)
    loss = validation_loss(model, rows, micro_batch, one, contextlib.nullcontext, boundaries)
    return {"path": path, "shards": shards, "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "sequences": int(rows.shape[0]), "tokens": int(rows.shape[0] * (rows.shape[1] - 1)),
            "seq_len": int(rows.shape[1]), "varlen": varlen, "device": str(device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate",
                                description="The mean next-token loss of a trained model on held-out shards.")
    p.add_argument("path", help="an export dir, a run's out_dir (its latest checkpoint) or a checkpoint dir")
    p.add_argument("--shards", required=True, help="a shard directory or s3://bucket/prefix, made with the model's "
                                                   "tokenizer")
    p.add_argument("--sequences", type=int, default=256, help="score the first N sequences (default 256)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--varlen", action="store_true", help="each document on its own (for models trained with "
                                                        "data.varlen)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda where there is one)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.sequences < 1 or args.micro_batch < 1:
        p.error("--sequences and --micro-batch must be >= 1")
    from trainer.generate import prepare
    try:
        r = evaluate(args.path, args.shards, args.sequences, args.micro_batch, args.varlen,
                     prepare(args.path, args.device))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['path']} on {r['shards']}: loss {r['loss']:.4f} nats/token (perplexity {r['perplexity']:.2f}), "
              f"{r['sequences']} sequences x {r['seq_len'] - 1} predicted tokens ({r['tokens']:,}), "
              f"{'documents apart, ' if r['varlen'] else ''}{r['dtype']} on {r['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
