"""`verify` (every checksum and the tar structure, against the manifest) and `inspect` (a summary)."""
from __future__ import annotations

import hashlib
import tarfile

import numpy as np

from shards.format import (TOKENIZER_NAME, Block, FormatError, Manifest, ShardInfo, block_at, block_member_name,
                           decode_block, read_block_index, read_manifest)
from shards.progress import Progress, human
from shards.storage import Storage

CHUNK = 8 << 20


def _member_problem(where: str, i: int, head: bytes, prev: Block | None, b: Block, stem: str) -> str | None:
    """What is wrong with the bytes before block i's data, if anything: they must be the previous
    block's padding, then one ustar header naming this block with its length (so a plain tar reader
    finds exactly the manifest's blocks, in order, at the recorded offsets)."""
    want = (-prev.length % tarfile.BLOCKSIZE if prev else 0) + tarfile.BLOCKSIZE
    if len(head) != want:
        return (f"{where} block {i}: {len(head)} bytes between the block before and this one's data, a tar "
                f"member header takes {want}")
    try:
        m = tarfile.TarInfo.frombuf(head[-tarfile.BLOCKSIZE:], tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as e:
        return f"{where} block {i}: no valid tar header before its data ({e})"
    if m.name != block_member_name(stem, i) or m.size != b.length:
        return (f"{where} block {i}: tar member {m.name!r} ({m.size} bytes) is not where the manifest puts it "
                f"({b.offset}, {b.length} bytes)")
    return None


def verify_shard(storage: Storage, m: Manifest, shard: ShardInfo, progress: Progress) -> None:
    where = storage.where(shard.name)
    if not storage.exists(shard.name):
        raise FormatError(f"{where}: missing (the manifest lists it); regenerate the dataset")
    size = storage.size(shard.name)
    table = read_block_index(storage, shard)  # checked against the manifest's CRC32 and counts
    blocks = [block_at(table, j) for j in range(len(table))]
    if size != shard.bytes:
        first = next((i for i, b in enumerate(blocks) if b.offset + b.length > size), None)
        hint = f"; block {first} onward is cut off" if first is not None else ""
        raise FormatError(f"{where}: {size} bytes, the manifest says {shard.bytes} (truncated or replaced "
                          f"shard{hint}); regenerate it")
    # One pass over the file: each read is a block with the tar header before it, hashed in file order.
    # A tar structure problem is reported after the sha256 (a changed byte is named as such first).
    stem = shard.name[:-4] if shard.name.endswith(".tar") else shard.name
    tokens = documents = pos = 0
    sha, problem, prev = hashlib.sha256(), None, None
    for i, b in enumerate(blocks):
        if b.offset < pos:
            raise FormatError(f"{where} block {i}: the index puts it at {b.offset}, inside the block before "
                              f"(ends at {pos}); regenerate the dataset")
        data = storage.read_range(shard.name, pos, b.offset + b.length - pos)
        sha.update(data)
        problem = problem or _member_problem(where, i, data[:b.offset - pos], prev, b, stem)
        rows = decode_block(data[b.offset - pos:], b, m, f"{where} block {i}", fix="regenerate the dataset")
        pos, prev = b.offset + b.length, b
        tokens += rows.size
        documents += int(np.count_nonzero(rows == m.eos_id))
        progress.update(len(data))
    if tokens != shard.tokens or documents != shard.documents:
        raise FormatError(f"{where}: blocks hold {tokens} tokens and {documents} separators, the manifest "
                          f"says {shard.tokens} and {shard.documents}")
    for off in range(pos, size, CHUNK):  # padding and the end-of-archive: zeros only
        chunk = storage.read_range(shard.name, off, min(CHUNK, size - off))
        sha.update(chunk)
        progress.update(len(chunk))
        if chunk.count(0) != len(chunk):
            problem = problem or f"{where}: more tar members after the index's {len(blocks)} blocks"
    if sha.hexdigest() != shard.sha256:
        raise FormatError(f"{where}: sha256 mismatch outside the block data (tar headers or padding changed); "
                          f"regenerate it")
    if problem:
        raise FormatError(problem)


def verify(storage: Storage, progress: bool = True, log=None) -> Manifest:
    """Raise FormatError naming the first bad shard or block; return the manifest when all is well."""
    m = read_manifest(storage)
    want = m.tokenizer.get("sha256")
    if want and not storage.exists(TOKENIZER_NAME):
        raise FormatError(f"{storage.where(TOKENIZER_NAME)} is missing: copy the tokenizer.json the shards were made "
                          f"with there (the manifest names sha256 {want})")
    if want and hashlib.sha256(storage.read(TOKENIZER_NAME)).hexdigest() != want:
        raise FormatError(f"{storage.where(TOKENIZER_NAME)} is not the tokenizer the manifest names (sha256 {want}): "
                          f"either tokenizer.json was replaced, or manifest.json is another dataset's (edited or "
                          f"copied); restore the dataset's own files, or regenerate the dataset")
    bar = Progress(sum(s.bytes for s in m.shards), "verify", unit="B", stream=log, enabled=progress)
    for shard in m.shards:
        verify_shard(storage, m, shard, bar)
    bar.close()
    return m


def summary(storage: Storage) -> dict:
    m = read_manifest(storage)
    t = m.totals()
    raw = t["tokens"] * m.np_dtype.itemsize
    # zstd bytes, without tar headers and padding (reads every shard's block index)
    packed = sum(int(read_block_index(storage, s)["length"].sum()) for s in m.shards)
    return {"dataset": str(storage), "format_version": m.format_version, "seq_len": m.seq_len, "dtype": m.dtype,
            **t, "raw_bytes": raw, "block_bytes": packed,
            "compression_ratio": round(raw / packed, 3) if packed else None,
            "eos_id": m.eos_id, "bos_id": m.bos_id, "tokenizer": m.tokenizer, "stats": m.stats,
            "settings": m.settings, "manifest_sha256": m.content_hash()}


def format_summary(s: dict) -> str:
    tok, st = s["tokenizer"], s["stats"]
    lines = [
        f"dataset      {s['dataset']}",
        f"shards       {s['shards']} ({s['blocks']} blocks)",
        f"sequences    {s['sequences']:,} x {s['seq_len']} tokens ({s['dtype']})",
        f"tokens       {s['tokens']:,}",
        f"documents    {s['documents']:,} separators in the shards ({st.get('documents', 0):,} documents read;"
        f" skipped {st.get('empty_documents', 0)} empty, {st.get('bad_records', 0)} bad records, "
        f"{st.get('bad_files', 0)} bad files; {st.get('dropped_tokens', 0):,} tail tokens dropped)",
        f"bytes        {s['bytes']:,} in shards, {s['block_bytes']:,} of zstd blocks from {s['raw_bytes']:,} raw: "
        f"compression ratio {s['compression_ratio']}",
        f"input        {st.get('input_files', '?')} files, {human(st.get('input_bytes', 0))}B, "
        f"{st.get('tasks', '?')} tasks",
        f"tokenizer    {tok.get('source')} (vocab {tok.get('vocab_size')}, eos {tok.get('eos_token')!r}="
        f"{s['eos_id']}, " + (f"bos {tok.get('bos_token')!r}={s['bos_id']}" if s["bos_id"] is not None else "no bos")
        + f", sha256 {str(tok.get('sha256'))[:12]})",
        f"manifest     sha256 {s['manifest_sha256']}",
    ]
    return "\n".join(lines)
