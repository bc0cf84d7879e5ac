"""`python -m trainer.data plan|stats|peek`: the data order, its cost and the text of a batch, from the same
code the trainer runs. `plan` and `peek` take a run's config (--config RUN.toml [section.key=value ...]),
mixtures included; `plan` and `stats` also take one dataset (--shards PATH --global-batch G ...)."""
from __future__ import annotations

import argparse
import json
import sys

from shards.errors import UserError
from shards.format import read_manifest
from shards.progress import human, plural
from shards.backends import open_storage
from trainer.data.fetch import BlockCache, BlockIndex
from trainer.data.loader import plan_for
from trainer.data.plan import Plan


def _nonneg(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{s} is negative")
    return v


def _pos(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s} is not a positive integer")
    return v


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m trainer.data", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    for name, help_ in (("plan", "print each step's sequences for one rank, one JSON line per step"),
                        ("stats", "steps per epoch, dropped tail, bytes fetched and loader memory")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--shards", required=(name == "stats"), help="dataset directory or s3://bucket/prefix")
        p.add_argument("--global-batch", type=_pos, required=(name == "stats"),
                       help="sequences per optimizer step (G)")
        p.add_argument("--streams", "--layout", dest="layout", type=_pos, default=None,
                       help="number of streams C (C | G; default G); --layout is its old name")
        p.add_argument("--world-size", type=_pos, default=1)
        p.add_argument("--rank", type=_nonneg, default=0)
        p.add_argument("--seed", type=_nonneg, default=None if name == "plan" else 0)
    p = sub.choices["plan"]
    p.add_argument("--start-step", type=_nonneg, default=0)
    p.add_argument("--steps", type=_nonneg, default=1)
    p.add_argument("--config", help="a run's TOML (instead of --shards ...): its data section, mixtures included")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of --config")
    p = sub.add_parser("peek", help="the rows of one step decoded to text: source, shard, sequence, start and end")
    p.add_argument("--config", required=True, help="a run's TOML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--step", type=_nonneg, required=True)
    p.add_argument("--world-size", type=_pos, default=1)
    p.add_argument("--rank", type=_nonneg, default=0)
    p.add_argument("--rows", type=_pos, default=None, help="show only the first N rows")
    p.add_argument("--chars", type=_pos, default=60, help="characters shown from each end of a row")
    p = sub.choices["stats"]
    p.add_argument("--prefetch-steps", type=_nonneg, default=4)
    p.add_argument("--sample-steps", type=_pos, default=256,
                   help="steps whose block fetches are simulated (from step 0)")
    args = ap.parse_args(argv)
    if args.command == "plan":
        if args.config and args.shards or not (args.config or args.shards and args.global_batch):
            ap.error("plan takes --config RUN.toml, or --shards PATH --global-batch G (not both)")
        if args.shards and args.seed is None:
            ap.error("plan --shards needs --seed (the run's data.seed)")
        if args.overrides and not args.config:
            ap.error(f"overrides {args.overrides} need --config")
    return args


def cmd_plan(args, plan: Plan) -> None:
    plan.rank_streams(args.world_size, args.rank)
    out = sys.stdout
    for step in range(args.start_step, args.start_step + args.steps):
        rows = plan.step_rows(step, args.world_size, args.rank)
        shard, seq = plan.sequences(rows.blocks, rows.rows)
        out.write(json.dumps({"step": step, "rank": args.rank, "epoch": rows.epoch,
                              "sequences": [[a, b] for a, b in zip(shard.tolist(), seq.tolist())]},
                             separators=(",", ":")) + "\n")


def simulate_fetches(plan: Plan, index: BlockIndex, *, world_size: int, rank: int, prefetch_steps: int,
                     steps: int) -> dict:
    """Run the loader's block bookkeeping over `steps` steps without reading: what would be fetched
    and how many blocks would be alive at once."""
    fetched = []
    cache = BlockCache(index, lambda b, out: fetched.append(b), threads=1)
    try:
        submitted = 0
        for step in range(steps):
            while submitted <= step + prefetch_steps:
                rows = plan.step_rows(submitted, world_size, rank)
                keep = plan.block_last_use(rows.epoch, rows.blocks, world_size, rank)
                _, fills = cache.acquire(rows.blocks, submitted, keep)
                for f in fills:
                    f.result()
                submitted += 1
            cache.release_through(step)
    finally:
        cache.close()
    compressed = sum(index.block(b)[3].length for b in fetched)
    return {"steps": submitted, "blocks": len(fetched), "compressed_bytes": compressed,
            "peak_live_blocks": cache.slab.peak, "slot_bytes": cache.slab.slot_bytes}


def cmd_stats(args, plan: Plan, manifest, index: BlockIndex) -> None:
    streams = plan.rank_streams(args.world_size, args.rank)
    steps = min(args.sample_steps, plan.steps_per_epoch)
    sim = simulate_fetches(plan, index, world_size=args.world_size, rank=args.rank,
                           prefetch_steps=args.prefetch_steps, steps=steps)
    local = plan.global_batch // args.world_size
    slot_bytes = sim["slot_bytes"]
    batch_bytes = local * manifest.seq_len * (8 + manifest.np_dtype.itemsize)  # int64 tensor + gather buffer
    # the window's blocks, plus one kept per stream boundary of this rank until its last use
    bound_blocks = min(plan.num_blocks, local * (args.prefetch_steps + 1) + len(streams))
    shard_bytes_total = sum(s.bytes for s in manifest.shards)  # tar bytes: block data plus 512-byte headers
    st = {
        "sequences": plan.num_sequences, "blocks": plan.num_blocks, "global_batch": plan.global_batch,
        "layout": plan.layout, "world_size": args.world_size, "steps_per_epoch": plan.steps_per_epoch,
        "dropped_per_epoch": plan.dropped_per_epoch,
        "tokens_per_step_per_rank": local * manifest.seq_len,
        "sampled_steps": sim["steps"],
        "compressed_bytes_per_step_per_rank": sim["compressed_bytes"] / sim["steps"],
        "dataset_compressed_bytes_per_step_per_rank": shard_bytes_total / (plan.steps_per_epoch * args.world_size),
        "prefetch_steps": args.prefetch_steps,
        "peak_live_blocks": sim["peak_live_blocks"],
        "block_bytes": slot_bytes,
        "memory_bytes": sim["peak_live_blocks"] * slot_bytes + (args.prefetch_steps + 1) * batch_bytes,
        "memory_bound_bytes": bound_blocks * slot_bytes + (args.prefetch_steps + 1) * batch_bytes,
    }
    print(f"{args.shards}: {plural(st['sequences'], 'sequence')} of {plural(manifest.seq_len, 'token')} in "
          f"{plural(st['blocks'], 'block')}")
    print(f"global batch {plan.global_batch}, layout {plan.layout}, world size {args.world_size}: "
          f"{plural(plan.steps_per_epoch, 'step')} per epoch, {plural(plan.dropped_per_epoch, 'sequence')} dropped "
          f"per epoch "
          f"({100 * plan.dropped_per_epoch / plan.num_sequences:.3g}%)")
    print(f"fetched per step per rank: {human(st['compressed_bytes_per_step_per_rank'])}B compressed "
          f"(simulated over the first {plural(sim['steps'], 'step')}; whole-dataset average "
          f"{human(st['dataset_compressed_bytes_per_step_per_rank'])}B)")
    print(f"loader memory with prefetch {args.prefetch_steps}: {human(st['memory_bytes'])}B "
          f"({plural(st['peak_live_blocks'], 'live block')} of {human(slot_bytes)}B + "
          f"{plural(args.prefetch_steps + 1, 'batch', 'batches')} of {human(batch_bytes)}B); "
          f"bound {human(st['memory_bound_bytes'])}B")
    print(json.dumps(st))


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "peek" or getattr(args, "config", None):
            from trainer.data import inspect
            (inspect.cmd_peek if args.command == "peek" else inspect.cmd_plan)(args)
            return 0
        storage = open_storage(args.shards)
        try:
            manifest = read_manifest(storage)
            plan = plan_for(manifest, seed=args.seed, global_batch=args.global_batch, layout=args.layout,
                            name=str(storage))
            if args.command == "plan":
                cmd_plan(args, plan)
            else:
                cmd_stats(args, plan, manifest, BlockIndex(manifest, storage))
        finally:
            storage.close()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `| head` closed the pipe: not an error
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
