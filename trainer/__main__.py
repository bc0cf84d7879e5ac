"""`python -m trainer CONFIG [section.key=value ...]` (or under torchrun for several processes)."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from shards.errors import UserError
from trainer.config import ConfigError, load


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m trainer", usage="%(prog)s [-h] CONFIG.toml [section.key=value ...]",
        description="Train an FLA language model from shardgen shards. Resumes from the latest checkpoint "
                    "in run.out_dir automatically. Several processes: torchrun --nproc-per-node N -m trainer ...",
        epilog="examples:\n  python -m trainer configs/demo.toml\n"
               "  python -m trainer configs/gla_340M.toml train.max_steps=1000 optim.lr=1e-3 run.out_dir=runs/x\n"
               "  torchrun --standalone --nproc-per-node 2 -m trainer configs/demo.toml parallel.mode=fsdp",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    # config is optional to argparse only so that its absence is explained here: a required positional followed by
    # nargs="*" made argparse call both required ("the following arguments are required: config, overrides")
    p.add_argument("config", nargs="?", metavar="CONFIG.toml", help="the run config TOML (configs/*.toml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="optional overrides of the config's settings, e.g. data.global_batch=16")
    args = p.parse_args(argv)
    if args.config is None:
        p.error("give the run config TOML (e.g. configs/demo.toml), optionally followed by section.key=value "
                "overrides")
    if "=" in args.config and not args.config.endswith(".toml") and not os.path.exists(args.config):
        p.error(f"{args.config!r} is an override: give the run config TOML first, then the overrides "
                f"(e.g. configs/demo.toml {args.config})")
    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    # Heavy imports only after the config is known to be good.
    from trainer.loop import train
    # The errors a user can cause and fix, as one line; anything else (a bug) keeps its traceback.
    try:
        summary = train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the first step (setup) or a second one: no checkpoint written now
        print("interrupted; the last complete checkpoint in run.out_dir, if any, is where the same command resumes",
              file=sys.stderr)
        return 130
    if summary.get("stopped_by"):  # SIGTERM / SIGINT: checkpointed, not finished (`make train && make export` stops)
        return 128 + signal.Signals[summary["stopped_by"]].value
    return 0


if __name__ == "__main__":
    sys.exit(main())
