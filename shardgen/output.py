"""The layout and lifecycle of one shardgen output (a local directory or an s3:// prefix).

    manifest.json           written last, by the merge: its presence makes the output a dataset
    tokenizer.json          the tokenizer the shards were made with
    00012-000.tar ...       shards: <task>-<k>.tar, published atomically once complete
    00012-000.blocks ...    each shard's block index, published right after its shard
    _tasks/settings.json    the build's settings and fingerprint (a rerun with other settings is refused)
    _tasks/00012.json       task 12's completion record, written after all its shards are published
    <staging>/_tmp/         shards being built (Storage.staging_dir(): the output itself when local)

A record means its task is complete; everything else a killed run leaves is either complete and
verifiable (published shards) or a temporary file that the next run removes.
"""
from __future__ import annotations

import json
import os
import re

from shards.errors import UserError
from shards.format import MANIFEST_NAME, TOKENIZER_NAME, canonical_json, index_name
from shards.storage import Storage, unlink_quiet

TASKS_DIR = "_tasks"
TMP_DIR = "_tmp"
SETTINGS_NAME = f"{TASKS_DIR}/settings.json"
SHARD_RE = re.compile(r"^\d{5,}-\d{3,}\.(tar|blocks)$")  # shards and their block indexes


class BuildError(UserError):
    """An output directory that cannot be built into or merged; the message says what to do."""


def record_name(task: int) -> str:
    return f"{TASKS_DIR}/{task:05d}.json"


def shard_name(task: int, k: int) -> str:
    return f"{task:05d}-{k:03d}.tar"


class Output:
    """One output: where each of its files goes, and the steps of its life (prepare, record, merge,
    clear, clean up after a killed run)."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def __str__(self) -> str:
        return str(self.storage)

    # --- settings
    def read_settings(self) -> dict | None:
        if not self.storage.exists(SETTINGS_NAME):
            return None
        return json.loads(self.storage.read(SETTINGS_NAME))

    def prepare(self, doc: dict, overwrite: bool, num_nodes: int) -> dict:
        """Make the output ready for a build with settings `doc`: resume one with the same fingerprint
        (or the same inputs named another way: then its recorded settings are the ones to build with),
        replace one that finished nothing, refuse one with other settings unless `overwrite`. Returns
        the settings to build with."""
        storage = self.storage
        old = self.read_settings()
        if old is not None and (old["fingerprint"] == doc["fingerprint"] or _same_build(old, doc)):
            return old
        finished = [n for n in storage.list(TASKS_DIR + "/") if n != SETTINGS_NAME]
        if old is not None and not finished and not storage.exists(MANIFEST_NAME):
            # An earlier run with other settings finished nothing (e.g. it stopped on bad input): replace it,
            # and its shards (published before their task's record) with it, when no other node can be writing.
            if num_nodes == 1:
                self.clear()
        elif old is not None or storage.exists(MANIFEST_NAME):
            why = (f"was built with other settings ({_differences(old, doc)})" if old is not None else
                   "holds a dataset without shardgen task records")
            if not overwrite:
                raise BuildError(f"{storage} {why}. Rerun with the same arguments to resume, choose another "
                                 f"--output, or pass --overwrite to delete it and start again")
            if num_nodes > 1:
                raise BuildError(f"{storage} {why}. --overwrite is refused with --num-nodes > 1 (one node would "
                                 f"delete another's work): empty the output first, then start all nodes")
            self.clear()
        storage.put_bytes(SETTINGS_NAME, canonical_json(doc))
        return doc

    def put_tokenizer(self, data: bytes) -> None:
        if not self.storage.exists(TOKENIZER_NAME) or self.storage.read(TOKENIZER_NAME) != data:
            self.storage.put_bytes(TOKENIZER_NAME, data)

    # --- task records
    def read_records(self, tasks, fingerprint: str) -> dict[int, dict]:
        """{task: completion record} for those of `tasks` whose record is present and of these settings.
        One listing of the records, then one read per record (not an existence check per task)."""
        present = set(self.storage.list(TASKS_DIR + "/"))
        records = {}
        for task in tasks:
            if record_name(task) not in present:
                continue
            try:
                rec = json.loads(self.storage.read(record_name(task)))
            except ValueError:
                continue  # cannot happen with atomic writes; treat as not done
            if rec.get("fingerprint") == fingerprint and rec.get("task") == task:
                records[task] = rec
        return records

    def write_record(self, record: dict) -> None:
        """Last step of a task, after every shard of it is published."""
        self.storage.put_bytes(record_name(record["task"]), canonical_json(record))

    # --- shards
    def staging_path(self, name: str) -> str:
        """The local file where shard `name` is built before publish_shard."""
        tmp = os.path.join(self.storage.staging_dir(), TMP_DIR)
        os.makedirs(tmp, exist_ok=True)
        return os.path.join(tmp, name + ".tmp")

    def publish_shard(self, name: str, path: str, index: bytes) -> None:
        """The shard, then its block index (put_file too: a rerun after a kill skips what S3 holds already)."""
        self.storage.put_file(name, path)
        index_path = self.staging_path(index_name(name))
        with open(index_path, "wb") as f:
            f.write(index)
        self.storage.put_file(index_name(name), index_path)

    # --- clearing and cleaning up
    def clear(self) -> None:
        """Delete what shardgen wrote (manifest first, so the directory stops being a dataset at once)."""
        storage = self.storage
        storage.delete(MANIFEST_NAME)
        for name in storage.list(TASKS_DIR + "/"):
            storage.delete(name)
        for name in storage.list():
            if SHARD_RE.match(name):
                storage.delete(name)
        storage.delete(TOKENIZER_NAME)
        self.remove_temp_files()

    def remove_temp_files(self, owned=None) -> int:
        """Delete what a killed run left half-written: shards in the staging area and the temporary files
        of atomic writes (`_tasks/.00012.json.*.tmp`), for the tasks that `owned` accepts, or all of them
        and the staging folder itself (only when no other node can be writing: at merge)."""
        storage, n = self.storage, 0
        for name in storage.list(TASKS_DIR + "/"):  # a local directory lists these; an object store has none
            base = name.rsplit("/", 1)[-1]
            head = base[1:].split(".", 1)[0]
            if base.startswith(".") and base.endswith(".tmp") and (
                    owned is None or head.isdigit() and owned(int(head))):
                storage.delete(name)
                n += 1
        if owned is None:
            for name in storage.list("."):
                if name.endswith(".tmp") and name.startswith((f".{MANIFEST_NAME}.", f".{TOKENIZER_NAME}.")):
                    storage.delete(name)
                    n += 1
        tmp = os.path.join(storage.staging_dir(), TMP_DIR)
        if not os.path.isdir(tmp):
            return n
        for name in os.listdir(tmp):
            head = name.split("-", 1)[0]
            if head.isdigit() and (owned is None or owned(int(head))):
                unlink_quiet(os.path.join(tmp, name))
                n += 1
        if owned is None and not os.listdir(tmp):
            os.rmdir(tmp)
        return n


def _same_build(old: dict, new: dict) -> bool:
    """The same settings and tokenizer, with the inputs named another way (relative vs absolute paths)."""
    if old.get("resolved") is None or old["resolved"] != new.get("resolved") or old["tokenizer"] != new["tokenizer"]:
        return False
    spelled = ("inputs", "plan_sha256")
    return ({k: v for k, v in old["settings"].items() if k not in spelled} ==
            {k: v for k, v in new["settings"].items() if k not in spelled})


def _differences(old: dict, new: dict) -> str:
    diffs = []
    for part in ("settings", "tokenizer"):
        a, b = old.get(part, {}), new[part]
        diffs += [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs)[:600] or "fingerprint differs"
