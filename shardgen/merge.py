"""Task records -> the one manifest. Run by a one-node build at its end, or by
`python -m shardgen merge OUT` after a multi-node build."""
from __future__ import annotations

import hashlib

from shards.format import MANIFEST_NAME, TOKENIZER_NAME, Manifest, ShardInfo
from shardgen.output import SETTINGS_NAME, TASKS_DIR, BuildError, Output
from shardgen.readers import Counts
from shards.storage import Storage


def _ranges(ids: list[int]) -> str:
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(out)


def build_manifest(out: Output, doc: dict, known: dict[int, dict] | None = None) -> Manifest:
    """The manifest from every task's record: those in `known` (read or written by this process
    already, for these settings), the rest read from storage."""
    s, fp = doc["settings"], doc["fingerprint"]
    known = known or {}
    rest = [t for t in range(s["num_tasks"]) if t not in known]
    found = {**(out.read_records(rest, fp) if rest else {}), **known}
    missing = [t for t in range(s["num_tasks"]) if t not in found]
    if missing:
        raise BuildError(f"{out}: {len(missing)} of {s['num_tasks']} tasks have no completion record "
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


def _refuse_empty(out: Output, m: Manifest) -> None:
    """A dataset of no sequence gets no manifest (a reader would only fail later, less clearly): say why it is empty."""
    if any(x.sequences for x in m.shards):
        return
    st = m.stats
    if not st["documents"]:
        why = (f"no document in the input: {st['empty_documents']} empty, {st['bad_records']} bad records and "
               f"{st['bad_files']} bad files skipped")
    else:
        why = (f"its {st['documents']} documents gave {st['dropped_tokens']} tokens, every one in a task's tail "
               f"shorter than --seq-len {m.seq_len} (each task drops its last < seq-len tokens): use a smaller "
               f"--seq-len, or a larger --task-bytes so that a task holds whole sequences")
    raise BuildError(f"{out}: the dataset would hold no sequence, so no manifest was written: {why}. A rerun with "
                     f"other settings needs --overwrite")


def merge(storage: Storage, known: dict[int, dict] | None = None) -> Manifest:
    """Check every task record and the tokenizer, then write manifest.json (last, atomically).
    `known`: records this process holds already (see build_manifest)."""
    out = Output(storage)
    doc = out.read_settings()
    if doc is None:
        raise BuildError(f"{storage}: no {SETTINGS_NAME}: nothing was built here (run shardgen with "
                         f"--output {storage} first)")
    manifest = build_manifest(out, doc, known)
    _refuse_empty(out, manifest)
    want = doc["tokenizer"]["sha256"]
    if not storage.exists(TOKENIZER_NAME) or hashlib.sha256(storage.read(TOKENIZER_NAME)).hexdigest() != want:
        raise BuildError(f"{storage.where(TOKENIZER_NAME)} is missing or is not the tokenizer the shards were "
                         f"made with (sha256 {want}); rerun shardgen with the same arguments")
    storage.put_bytes(MANIFEST_NAME, manifest.to_bytes())
    out.remove_temp_files()
    return manifest
