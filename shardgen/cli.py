"""Command line: `python -m shardgen INPUT... --output OUT --tokenizer TOK` builds (the default command);
`verify`, `inspect`, `merge` and `train-tokenizer` are subcommands."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

import zstandard

from shards.backends import open_storage
from shards.errors import UserError
from shards.format import DEFAULT_BLOCK_BYTES
from shardgen.tokenizer import ENGINES

ZSTD_MIN_LEVEL = -(1 << 17)  # ZSTD_minCLevel()
UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def size(text: str) -> int:
    """'256k', '64M', '1G', '1048576' -> bytes (binary units)."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in UNITS and t[-1:] else ""
    try:
        value = float(t[:-1] if unit else t) * UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 262144, 256k, 64M, 1G)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be at least 1 byte")
    return int(value)


def positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return v


def seq_len(text: str) -> int:
    v = int(text)
    if v < 2:
        raise argparse.ArgumentTypeError(f"{text}: a sequence needs at least 2 tokens (a token and the next one "
                                         f"to predict); 512 to 8192 is usual")
    return v


def zstd_level(text: str) -> int:
    v = int(text)
    if not ZSTD_MIN_LEVEL <= v <= zstandard.MAX_COMPRESSION_LEVEL:
        raise argparse.ArgumentTypeError(f"{text}: zstd levels go from {ZSTD_MIN_LEVEL} (fastest) to "
                                         f"{zstandard.MAX_COMPRESSION_LEVEL} (smallest); 3 is zstd's default")
    return v


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show: not None, not a flag's False, not twice."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m shardgen [build]",
        description="Tokenize text, pack it into fixed-length sequences and write zstd-compressed tar shards "
                    "plus manifest.json. Inputs: .txt (one document per file), .jsonl, .jsonl.gz, .jsonl.zst, "
                    ".parquet; files, directories or globs; local or s3://.",
        epilog="other commands: `verify OUT` (checksums and structure), `inspect OUT` (summary), "
               "`merge OUT` (manifest after a multi-node build), `upgrade DIR` (a format-1 dataset to format 2), "
               "`train-tokenizer INPUT... --output DIR "
               "--vocab-size N`; each has --help. Rerunning the same command resumes an interrupted build.",
        formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="input files, directories or globs")
    p.add_argument("-o", "--output", required=True, help="output directory or s3://bucket/prefix")
    p.add_argument("-t", "--tokenizer", required=True,
                   help="tokenizer.json, a directory holding one, or a hub name (needs the hub to be reachable)")
    p.add_argument("--seq-len", type=seq_len, default=2048, help="tokens per packed sequence")
    p.add_argument("--workers", type=positive, default=default_workers(), help="worker processes (one core each)")
    p.add_argument("--text-key", default="text", help="JSON field / parquet column holding the text")
    p.add_argument("--add-bos", action="store_true", help="put the BOS token before every document")
    p.add_argument("--eos-token", help="separator after every document (default: the tokenizer's EOS, "
                                       "<|endoftext|> or </s>)")
    p.add_argument("--bos-token", help="BOS token for --add-bos (default: the tokenizer's BOS or <s>)")
    p.add_argument("--block-bytes", type=size, default=DEFAULT_BLOCK_BYTES,
                   help="raw bytes per block (the loader's read unit); rounded down to whole sequences")
    p.add_argument("--shard-bytes", type=size, default=1 << 30, help="start a new shard after this many bytes")
    p.add_argument("--task-bytes", type=size, default=8 << 20,
                   help="input bytes per task (the unit of parallelism and of resume; each task drops its own "
                        "tail of < seq-len tokens)")
    p.add_argument("--zstd-level", type=zstd_level, default=3, help="zstd compression level")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip and count bad records and damaged files instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="delete an output built with other settings")
    p.add_argument("--break-lock", action="store_true",
                   help="s3:// output: take over the lease of another run that you know is dead (a lease not "
                        "renewed for 5 minutes expires by itself)")
    p.add_argument("--tokenizer-engine", choices=ENGINES, default="auto",
                   help="auto: tokenize with tiktoken where it gives exactly the tokens of HF tokenizers (byte-level "
                        "BPE, checked at start), else with tokenizers; hf: always tokenizers. The shards are the "
                        "same either way")
    p.add_argument("--node-rank", type=int, help="this node's rank (default: SLURM_PROCID, NODE_RANK or GROUP_RANK)")
    p.add_argument("--num-nodes", type=positive, help="node count (default: SLURM_NTASKS, NNODES/NUM_NODES or "
                                                      "GROUP_WORLD_SIZE; 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def cmd_build(argv: list[str]) -> int:
    from shardgen.build import BuildOptions, node_from_env, run_build
    a = build_parser().parse_args(argv)
    rank, nodes = node_from_env(os.environ, a.node_rank, a.num_nodes)
    run_build(BuildOptions(inputs=a.inputs, output=a.output, tokenizer=a.tokenizer, seq_len=a.seq_len,
                           workers=a.workers, text_key=a.text_key, block_bytes=a.block_bytes,
                           shard_bytes=a.shard_bytes, task_bytes=a.task_bytes, zstd_level=a.zstd_level,
                           add_bos=a.add_bos, eos_token=a.eos_token, bos_token=a.bos_token, skip_bad=a.skip_bad,
                           overwrite=a.overwrite, break_lock=a.break_lock, tokenizer_engine=a.tokenizer_engine,
                           node_rank=rank, num_nodes=nodes, progress=not a.quiet))
    return 0


def cmd_verify(argv: list[str]) -> int:
    from shardgen.verify import verify
    p = argparse.ArgumentParser(prog="python -m shardgen verify",
                                description="Check every block checksum, shard sha256 and the tar structure "
                                            "against the manifest; exit 1 naming the first bad shard/block.")
    p.add_argument("output", metavar="OUT")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    m = verify(open_storage(a.output), progress=not a.quiet)
    t = m.totals()
    print(f"OK: {a.output}: {t['shards']} shards, {t['blocks']} blocks, {t['sequences']} sequences verified")
    return 0


def cmd_inspect(argv: list[str]) -> int:
    from shardgen.verify import format_summary, summary
    p = argparse.ArgumentParser(prog="python -m shardgen inspect", description="Summarize a dataset.")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    a = p.parse_args(argv)
    s = summary(open_storage(a.output))
    print(json.dumps(s, sort_keys=True) if a.json else format_summary(s))
    return 0


def cmd_merge(argv: list[str]) -> int:
    from shardgen.merge import merge
    p = argparse.ArgumentParser(prog="python -m shardgen merge",
                                description="Write OUT/manifest.json from the task records of a multi-node "
                                            "build (fails naming any missing tasks).")
    p.add_argument("output", metavar="OUT")
    a = p.parse_args(argv)
    m = merge(open_storage(a.output))
    t = m.totals()
    print(f"wrote {a.output}/manifest.json: {t['shards']} shards, {t['sequences']} sequences, {t['tokens']} tokens")
    return 0


def cmd_upgrade(argv: list[str]) -> int:
    from shardgen.upgrade import upgrade
    p = argparse.ArgumentParser(prog="python -m shardgen upgrade",
                                description="Convert a format-1 dataset (every block listed in manifest.json) to "
                                            "format 2 (per-shard summaries, a .blocks index beside each shard), in "
                                            "place; the shards and the data order do not change, and checkpoints "
                                            "taken on the old manifest still resume. Local or s3://.")
    p.add_argument("output", metavar="DATASET")
    p.add_argument("--reindex", action="store_true",
                   help="format 2: rebuild every .blocks file from its shard (checked against the manifest)")
    a = p.parse_args(argv)
    storage = open_storage(a.output)
    try:
        _, done = upgrade(storage, reindex=a.reindex)
    finally:
        storage.close()
    print(done)
    return 0


def cmd_train_tokenizer(argv: list[str]) -> int:
    from shardgen.tokenizer import train_tokenizer
    p = argparse.ArgumentParser(prog="python -m shardgen train-tokenizer",
                                description="Train a byte-level BPE tokenizer (<|endoftext|> = id 0) and write "
                                            "DIR/tokenizer.json and DIR/tokenizer_config.json.",
                                formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--vocab-size", type=positive, default=32000, help="tokens in the vocabulary (at least 257)")
    p.add_argument("--min-frequency", type=positive, default=2, help="pairs seen fewer times are not merged")
    p.add_argument("--text-key", default="text", help="JSON field / parquet column holding the text")
    p.add_argument("--max-bytes", type=size, help="train on at most this much text (the first documents)")
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in DIR")
    a = p.parse_args(argv)
    path = train_tokenizer(a.inputs, a.output, a.vocab_size, a.min_frequency, a.text_key, a.max_bytes, a.skip_bad,
                           a.overwrite)
    from tokenizers import Tokenizer
    n = Tokenizer.from_file(path).get_vocab_size()
    print(f"wrote {path} ({n} tokens)")
    if n < a.vocab_size:  # the trainer stops merging when no pair is seen --min-frequency times
        print(f"note: {n} tokens, fewer than --vocab-size {a.vocab_size}: the text has no more pairs seen "
              f"--min-frequency ({a.min_frequency}) times. A model with vocab_size {a.vocab_size} still works (its "
              f"rows past {n} stay unused); for the full vocabulary, train on more text", file=sys.stderr)
    return 0


COMMANDS = {"build": cmd_build, "verify": cmd_verify, "inspect": cmd_inspect, "merge": cmd_merge,
            "upgrade": cmd_upgrade, "train-tokenizer": cmd_train_tokenizer}


class Terminated(KeyboardInterrupt):
    """SIGTERM: stops the run as Ctrl-C does (workers stopped, finished tasks kept)."""


def _on_sigterm(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "build"
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers go
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return COMMANDS[command](argv)
    except UserError as e:
        print(f"shardgen {command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `| head` closed the pipe: not an error, and nothing more to print there
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 0
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"shardgen {command}: {how}; rerun the same command to resume", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
