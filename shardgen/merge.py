"""Task records -> the one manifest. Run by a one-node build at its end, or by
`python -m shardgen merge OUT` after a multi-node build."""
from __future__ import annotations

import hashlib
import json
import os

from shards.format import MANIFEST_NAME, TOKENIZER_NAME, Manifest, ShardInfo
from shardgen.readers import Counts
from shards.storage import Storage
from shardgen.tasks import TASKS_DIR, TMP_DIR, record_name

SETTINGS_NAME = f"{TASKS_DIR}/settings.json"


class BuildError(Exception):
    """An output directory that cannot be built into or merged; the message says what to do."""


def read_settings(storage: Storage) -> dict | None:
    if not storage.exists(SETTINGS_NAME):
        return None
    return json.loads(storage.read(SETTINGS_NAME))


def read_records(storage: Storage, tasks, fingerprint: str) -> dict[int, dict]:
    """{task: completion record} for those of `tasks` whose record is present and of these settings.
    One listing of the records, then one read per record (not an existence check per task)."""
    present = set(storage.list(TASKS_DIR + "/"))
    records = {}
    for task in tasks:
        if record_name(task) not in present:
            continue
        try:
            rec = json.loads(storage.read(record_name(task)))
        except ValueError:
            continue  # cannot happen with atomic writes; treat as not done
        if rec.get("fingerprint") == fingerprint and rec.get("task") == task:
            records[task] = rec
    return records


def _ranges(ids: list[int]) -> str:
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(out)


def build_manifest(storage: Storage, doc: dict, known: dict[int, dict] | None = None) -> Manifest:
    """The manifest from every task's record: those in `known` (read or written by this process
    already, for these settings), the rest read from storage."""
    s, fp = doc["settings"], doc["fingerprint"]
    known = known or {}
    rest = [t for t in range(s["num_tasks"]) if t not in known]
    found = {**(read_records(storage, rest, fp) if rest else {}), **known}
    missing = [t for t in range(s["num_tasks"]) if t not in found]
    if missing:
        raise BuildError(f"{storage}: {len(missing)} of {s['num_tasks']} tasks have no completion record "
                         f"in {TASKS_DIR}/: tasks {_ranges(missing)}. With --num-nodes n, task t belongs to "
                         f"node t % n: rerun the nodes that own them with the same arguments, then merge again")
    stats = Counts()
    shards: list[ShardInfo] = []
    for rec in (found[t] for t in range(s["num_tasks"])):
        stats.add(Counts(**rec["stats"]))
        shards.extend(ShardInfo.from_json(x) for x in rec["shards"])
    return Manifest(seq_len=s["seq_len"], dtype=s["dtype"], eos_id=s["eos_id"], bos_id=s["bos_id"],
                    tokenizer=doc["tokenizer"], shards=shards, settings=s,
                    stats={**stats.to_json(), "input_files": doc["input_files"], "tasks": s["num_tasks"]})


def merge(storage: Storage, known: dict[int, dict] | None = None) -> Manifest:
    """Check every task record and the tokenizer, then write manifest.json (last, atomically).
    `known`: records this process holds already (see build_manifest)."""
    doc = read_settings(storage)
    if doc is None:
        raise BuildError(f"{storage}: no {SETTINGS_NAME}: nothing was built here (run shardgen with "
                         f"--output {storage} first)")
    manifest = build_manifest(storage, doc, known)
    want = doc["tokenizer"]["sha256"]
    if not storage.exists(TOKENIZER_NAME) or hashlib.sha256(storage.read(TOKENIZER_NAME)).hexdigest() != want:
        raise BuildError(f"{storage.where(TOKENIZER_NAME)} is missing or is not the tokenizer the shards were "
                         f"made with (sha256 {want}); rerun shardgen with the same arguments")
    storage.put_bytes(MANIFEST_NAME, manifest.to_bytes())
    remove_temp_files(storage)
    return manifest


def remove_temp_files(storage: Storage, owned=None) -> int:
    """Delete what a killed run left half-written: shards in the staging area and the temporary files
    of atomic writes (`_tasks/.00012.json.*.tmp`), for the tasks that `owned` accepts, or all of them
    and the staging folder itself (only when no other node can be writing: at merge)."""
    n = 0
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
            os.unlink(os.path.join(tmp, name))
            n += 1
    if owned is None and not os.listdir(tmp):
        os.rmdir(tmp)
    return n
