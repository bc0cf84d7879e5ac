"""One task, start to finish, inside a worker process: read its pieces, tokenize in batches, pack
into seq_len rows, write shards, publish them, and write the task's completion record last.
A shard is published with its block index (`<shard>.blocks`) beside it, the shard first.

A task's bytes depend only on the task and the settings, so any worker (or node) can run it, and a
rerun of an unfinished task rewrites the same bytes. Shards are built under `_tmp/` and published
atomically (Storage.put_file); the record `_tasks/<task>.json` is written after every shard of the
task is published, so a record means the task is complete.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import chain

import numpy as np

from shards.format import DTYPES, ShardInfo, ShardWriter
from shardgen.inputs import Task
from shardgen.output import Output, shard_name
from shardgen.readers import Counts, DocumentReader
from shards.backends import open_storage

BATCH_CHARS = 1 << 20  # text per encode_batch call: large enough to amortize the call, small in memory
BATCH_DOCS = 4096


@dataclass(frozen=True)
class TaskSettings:
    """What a worker needs to turn a task into bytes (everything here shapes the bytes)."""
    output: str
    tokenizer_json: str
    seq_len: int
    dtype: str
    eos_id: int
    bos_id: int | None
    block_rows: int
    shard_bytes: int
    zstd_level: int
    text_key: str
    skip_bad: bool
    fingerprint: str
    engine: str = "hf"  # "hf" or "tiktoken": the same tokens either way, so not part of the fingerprint


class Packer:
    """Concatenated token stream -> blocks of `block_rows` rows of `seq_len` tokens, in order."""

    def __init__(self, seq_len: int, block_rows: int, sink):
        self.seq_len, self.block_tokens, self.sink = seq_len, seq_len * block_rows, sink
        self.pending: list[np.ndarray] = []
        self.n = 0

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.n += len(tokens)
        if self.n >= self.block_tokens:
            buf = np.concatenate(self.pending)
            full = len(buf) // self.block_tokens * self.block_tokens
            for i in range(0, full, self.block_tokens):
                self.sink(buf[i:i + self.block_tokens].reshape(-1, self.seq_len))
            self.pending = [buf[full:].copy()]
            self.n = len(self.pending[0])

    def finish(self) -> int:
        """Write the last, shorter block; return the dropped tail (< seq_len tokens)."""
        buf = np.concatenate(self.pending) if self.pending else np.zeros(0, np.uint32)
        rows = len(buf) // self.seq_len
        if rows:
            self.sink(buf[:rows * self.seq_len].reshape(rows, self.seq_len))
        self.pending, self.n = [], 0
        return len(buf) - rows * self.seq_len


class TaskShards:
    """The shards of one task: `<task>-000.tar`, `<task>-001.tar`, ... each closed once it reaches
    `shard_bytes`, built in the staging directory and published atomically."""

    def __init__(self, out: Output, task: int, s: TaskSettings):
        self.out, self.task, self.s = out, task, s
        self.infos: list[ShardInfo] = []
        self.writer: ShardWriter | None = None
        self.file = self.tmp_path = None

    def add_block(self, rows: np.ndarray) -> None:
        if self.writer is None:
            name = shard_name(self.task, len(self.infos))
            self.tmp_path = self.out.staging_path(name)
            self.file = open(self.tmp_path, "wb")
            self.writer = ShardWriter(self.file, name, self.s.seq_len, self.s.dtype, self.s.zstd_level)
        self.writer.add_block(rows, self.s.eos_id)
        last = self.writer.blocks[-1]
        if last.offset + last.length >= self.s.shard_bytes:
            self._publish()

    def _publish(self) -> None:
        info = self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.out.publish_shard(info.name, self.tmp_path, self.writer.index_bytes)
        self.infos.append(info)
        self.writer = self.file = self.tmp_path = None

    def close(self) -> list[ShardInfo]:
        if self.writer is not None:
            self._publish()
        return self.infos


class Worker:
    """Per-process state: the tokenizer is built once per worker, not once per task."""

    def __init__(self, s: TaskSettings, progress_queue=None):
        from shardgen.tokenizer import document_encoder, document_splitter
        self.s, self.queue = s, progress_queue
        self.encode_texts = document_encoder(s.tokenizer_json, s.engine)
        self.split = document_splitter(s.tokenizer_json, BATCH_CHARS)  # bounds the memory of a long document
        self.dtype = DTYPES[s.dtype]
        self.out = Output(open_storage(s.output))

    def encode(self, texts: list[str], ends: list[tuple[bool, bool]]) -> np.ndarray:
        """Texts -> one array: [bos] tokens eos for each document in order; a document cut in parts has
        its (first, last) flags in `ends`: bos before its first part, eos after its last."""
        ids = self.encode_texts(texts)
        bos = () if self.s.bos_id is None else (self.s.bos_id,)
        eos = (self.s.eos_id,)
        seps = [(bos if first else (), eos if last else ()) for first, last in ends]
        n = sum(map(len, ids)) + sum(len(h) + len(t) for h, t in seps)
        return np.fromiter(chain.from_iterable(chain.from_iterable((h, x, t) for (h, t), x in zip(seps, ids))),
                           self.dtype, count=n)

    def report(self, nbytes: int, docs: int, tokens: int) -> None:
        if self.queue is not None and (nbytes or docs or tokens):
            self.queue.put(("progress", nbytes, docs, tokens))

    def run(self, task: Task) -> dict:
        s = self.s
        shards = TaskShards(self.out, task.index, s)
        packer = Packer(s.seq_len, s.block_rows, shards.add_block)
        counts, batch, ends, chars, reported = Counts(), [], [], 0, 0

        def flush():
            nonlocal batch, ends, chars
            if batch:
                tokens = self.encode(batch, ends)
                packer.add(tokens)
                self.report(0, sum(last for _, last in ends), len(tokens))
                batch, ends, chars = [], [], 0

        for piece in task.pieces:
            reader, reported = DocumentReader(piece, s.text_key, s.skip_bad), 0
            for text in reader:
                cuts, start = self.split(text), 0
                for k, end in enumerate(cuts):
                    batch.append(text[start:end])  # the text itself when it is not cut
                    ends.append((k == 0, k == len(cuts) - 1))
                    chars += end - start
                    start = end
                    if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
                        flush()
                        self.report(reader.bytes_done - reported, 0, 0)
                        reported = reader.bytes_done
            self.report(reader.bytes_done - reported, 0, 0)
            counts.add(reader.counts)
        flush()
        counts.dropped_tokens = packer.finish()
        infos = shards.close()
        record = {"task": task.index, "fingerprint": s.fingerprint, "pieces": task.to_json(),
                  "shards": [i.to_json() for i in infos], "stats": counts.to_json()}
        self.out.write_record(record)
        return record
