"""The build: plan fixed tasks, skip the finished ones, run the rest on N worker processes, merge.

Determinism: the plan depends only on the inputs and --task-bytes; each task's bytes only on the task
and the settings; the manifest lists shards in task order. So the worker count, the node count and
interruptions change nothing in the output.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field, replace

import tokenizers
import zstandard

from shards.format import DEFAULT_BLOCK_BYTES, FORMAT_VERSION, MANIFEST_NAME, rows_per_block
from shardgen.inputs import list_inputs, plan_hash, plan_tasks
from shardgen.lock import lock_name, output_lock
from shardgen.merge import merge
from shardgen.output import BuildError, Output, canonical_json
from shards.progress import Progress, human
from shards.backends import open_storage
from shards.storage import is_s3
from shardgen.readers import DocumentReader
from shardgen.tasks import TaskSettings
from shardgen.tokenizer import choose_engine, load_tokenizer
from shardgen.workers import run_tasks

SHORT_SEQ_LEN = 64  # below this, warn: fine for tests, not for a model


@dataclass
class BuildOptions:
    inputs: list[str]
    output: str
    tokenizer: str
    seq_len: int = 2048
    workers: int = 1
    text_key: str = "text"
    block_bytes: int = DEFAULT_BLOCK_BYTES
    shard_bytes: int = 1 << 30
    task_bytes: int = 8 << 20
    zstd_level: int = 3
    add_bos: bool = False
    eos_token: str | None = None
    bos_token: str | None = None
    skip_bad: bool = False
    overwrite: bool = False
    break_lock: bool = False  # S3: take over the lease of a run that is not running any more
    tokenizer_engine: str = "auto"  # "auto" (tiktoken where it is exact) or "hf"
    node_rank: int = 0
    num_nodes: int = 1
    progress: bool = True
    log: object = field(default=None, repr=False)  # where notes and the summary go (stderr)


@dataclass
class BuildResult:
    tasks: int
    skipped: int  # finished in an earlier run
    ran: list[int]  # task indices run now
    records: list[dict]
    manifest: object  # Manifest, or None on a node of a multi-node build


def _settings(opts: BuildOptions, tok, tasks, files) -> dict:
    settings = {
        "format_version": FORMAT_VERSION, "seq_len": opts.seq_len, "dtype": tok.dtype, "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "block_bytes": opts.block_bytes, "block_rows": rows_per_block(opts.seq_len, tok.dtype, opts.block_bytes),
        "shard_bytes": opts.shard_bytes, "task_bytes": opts.task_bytes, "zstd_level": opts.zstd_level,
        "text_key": opts.text_key, "inputs": list(opts.inputs), "num_tasks": len(tasks),
        "plan_sha256": plan_hash(tasks), "tokenizers_version": tokenizers.__version__,
        "zstd_version": ".".join(map(str, zstandard.ZSTD_VERSION)),
    }
    core = {"settings": settings, "tokenizer": tok.manifest_entry()}
    fp = hashlib.sha256(canonical_json(core)).hexdigest()
    # The inputs as absolute paths: outside the fingerprint (and the manifest), so that a rerun naming the
    # same files another way (relative or absolute) is recognized as the same build (Output.prepare).
    resolved = {"inputs": [_resolved(i) for i in opts.inputs], "plan_sha256": plan_hash(
        [replace(t, pieces=tuple(replace(p, url=_resolved(p.url)) for p in t.pieces)) for t in tasks])}
    return {"fingerprint": fp, **core, "input_files": len(files), "resolved": resolved}


def _resolved(url: str) -> str:
    return url if is_s3(url) else os.path.realpath(url)


def run_build(opts: BuildOptions) -> BuildResult:
    log = opts.log or sys.stderr
    if not 0 <= opts.node_rank < opts.num_nodes:
        raise BuildError(f"--node-rank {opts.node_rank} is not in [0, --num-nodes {opts.num_nodes})")
    if opts.seq_len < 2:
        raise BuildError(f"--seq-len {opts.seq_len}: a sequence needs at least 2 tokens (a token and the next one "
                         f"to predict); 512 to 8192 is usual")
    if opts.seq_len < SHORT_SEQ_LEN:
        print(f"shardgen: warning: --seq-len {opts.seq_len} is very short: a model sees at most {opts.seq_len - 1} "
              f"tokens of context (512 to 8192 is usual)", file=log)
    tok = load_tokenizer(opts.tokenizer, opts.eos_token, opts.bos_token, opts.add_bos)
    files, ignored = list_inputs(opts.inputs)
    if ignored:
        print(f"shardgen: ignored {len(ignored)} file(s) without an input suffix: "
              f"{', '.join(ignored[:3])}{' ...' if len(ignored) > 3 else ''}", file=log)
    tasks = plan_tasks(files, opts.task_bytes)
    doc = _settings(opts, tok, tasks, files)
    storage = open_storage(opts.output)
    try:
        with output_lock(storage, lock_name(opts.node_rank, opts.num_nodes), opts.break_lock, log):
            return _build(opts, Output(storage), tok, files, tasks, doc, log)
    finally:
        storage.close()


def _build(opts: BuildOptions, out: Output, tok, files, tasks, doc, log) -> BuildResult:
    doc = out.prepare(doc, opts.overwrite, opts.num_nodes)
    out.put_tokenizer(tok.json_text.encode())

    mine = [t for t in tasks if t.index % opts.num_nodes == opts.node_rank]
    records = out.read_records([t.index for t in mine], doc["fingerprint"])
    todo = [t for t in mine if t.index not in records]
    out.remove_temp_files(owned=lambda t: t % opts.num_nodes == opts.node_rank)
    s = doc["settings"]
    engine = "hf"
    if todo:
        engine, why = choose_engine(tok.json_text, opts.tokenizer_engine, _first_documents(todo[0], opts),
                                    tok.encoder)
        print(f"shardgen: {why}", file=log)
    ts = TaskSettings(output=opts.output, tokenizer_json=tok.json_text, seq_len=opts.seq_len, dtype=tok.dtype,
                      eos_id=tok.eos_id, bos_id=tok.bos_id, block_rows=s["block_rows"],
                      shard_bytes=opts.shard_bytes, zstd_level=opts.zstd_level, text_key=opts.text_key,
                      skip_bad=opts.skip_bad, fingerprint=doc["fingerprint"], engine=engine)
    node = f" node {opts.node_rank}/{opts.num_nodes}:" if opts.num_nodes > 1 else ""
    print(f"shardgen:{node} {len(files)} input files, {len(tasks)} tasks ({len(mine)} on this node, "
          f"{len(mine) - len(todo)} already done), {min(opts.workers, max(1, len(todo)))} workers", file=log)
    start = time.perf_counter()
    records.update(_run_pool(todo, ts, opts, log))
    elapsed = time.perf_counter() - start
    manifest = merge(out.storage, records) if opts.num_nodes == 1 else None
    _summary(log, [records[t.index] for t in mine], manifest, elapsed, opts, out.storage)
    return BuildResult(tasks=len(tasks), skipped=len(mine) - len(todo), ran=[t.index for t in todo],
                       records=[records[t.index] for t in mine], manifest=manifest)


def _first_documents(task, opts: BuildOptions, max_docs: int = 200, max_chars: int = 256 << 10) -> list[str]:
    """The first documents of a task (the last one cut to `max_chars` in all): the tokenizer engines are
    compared on them before the build."""
    docs, chars = [], 0
    for piece in task.pieces:
        for text in DocumentReader(piece, opts.text_key, opts.skip_bad):
            docs.append(text[:max_chars - chars])
            chars += len(docs[-1])
            if len(docs) >= max_docs or chars >= max_chars:
                return docs
    return docs


def _run_pool(todo, ts: TaskSettings, opts: BuildOptions, log) -> dict:
    if not todo:
        return {}
    bar = Progress(sum(t.nbytes for t in todo), "shardgen", unit="B", stream=log, enabled=opts.progress)
    seen = {"docs": 0, "tokens": 0}

    def on_progress(nbytes, docs, tokens):
        seen["docs"] += docs
        seen["tokens"] += tokens
        rate = seen["tokens"] / max(time.perf_counter() - bar.start, 1e-9)
        bar.update(nbytes, f"{human(seen['docs'])} docs | {human(seen['tokens'])} tokens {human(rate)} tok/s")

    done = run_tasks(todo, ts, opts.workers, on_progress)
    bar.close()
    return done


def _summary(log, records, manifest, elapsed, opts, storage) -> None:
    st = {k: sum(r["stats"][k] for r in records) for k in
          ("documents", "empty_documents", "bad_records", "bad_files", "dropped_tokens", "input_bytes")}
    shards = [x for r in records for x in r["shards"]]
    tokens = sum(x["tokens"] for x in shards)
    nbytes = sum(x["bytes"] for x in shards)
    rate = f", {human(st['input_bytes'] / elapsed)}B/s" if elapsed > 0.5 else ""
    print(f"shardgen: {len(shards)} shards, {human(sum(x['sequences'] for x in shards))} sequences of "
          f"{opts.seq_len}, {human(tokens)} tokens, {human(st['documents'])} documents; skipped "
          f"{st['empty_documents']} empty, {st['bad_records']} bad records, {st['bad_files']} bad files; "
          f"dropped {st['dropped_tokens']} tail tokens; {human(nbytes)}B written; {elapsed:.1f} s{rate}", file=log)
    if st["dropped_tokens"] > 0.05 * (tokens + st["dropped_tokens"]):
        print(f"shardgen: warning: {st['dropped_tokens'] / (tokens + st['dropped_tokens']):.0%} of the tokens were "
              f"dropped as task tails (each task drops its last < --seq-len {opts.seq_len} tokens); a larger "
              f"--task-bytes or a smaller --seq-len keeps more", file=log)
    if manifest is not None:
        print(f"shardgen: wrote {storage.where(MANIFEST_NAME)}", file=log)
    else:
        print(f"shardgen: node {opts.node_rank} done; when every node is done run "
              f"`python -m shardgen merge {opts.output}`", file=log)


def node_from_env(env=os.environ, node_rank: int | None = None, num_nodes: int | None = None) -> tuple[int, int]:
    """(node rank, node count): each from its flag when given, else from SLURM or torchrun-style
    variables; (0, 1) when none are set."""
    for rank_key, size_keys in (("SLURM_PROCID", ("SLURM_NTASKS",)), ("NODE_RANK", ("NNODES", "NUM_NODES")),
                                ("GROUP_RANK", ("GROUP_WORLD_SIZE",))):
        if rank_key in env:
            size = next((env[k] for k in size_keys if k in env), None)
            if size is None and num_nodes is None:
                raise BuildError(f"{rank_key} is set but none of {', '.join(size_keys)}: pass --num-nodes")
            return (int(env[rank_key]) if node_rank is None else node_rank,
                    int(size) if num_nodes is None else num_nodes)
    return 0 if node_rank is None else node_rank, 1 if num_nodes is None else num_nodes
