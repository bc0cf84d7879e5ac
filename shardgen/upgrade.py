"""`python -m shardgen upgrade DIR`: a format-1 dataset becomes format 2 in place, shards untouched.

Format 1 listed every block in manifest.json; format 2 keeps per-shard summaries there and each
shard's block table in `<shard>.blocks`. The upgrade writes those files from the old manifest, then
the new manifest (last, atomically: until then the dataset stays a complete format-1 one, so an
interrupted upgrade is simply run again). The shards, hence the data order, do not change; the new
manifest records the old one's hash, so a checkpoint taken on the format-1 manifest still resumes.

`--reindex` rebuilds the `.blocks` files of a format-2 dataset from the shards themselves (one
sequential read of each), for an index that was lost or damaged; each rebuilt index must match the
CRC32 the manifest holds, so a shard that changed is reported, not papered over.
"""
from __future__ import annotations

import io
import tarfile
import zlib

import zstandard

from shards.format import (MANIFEST_NAME, Block, FormatError, Manifest, ShardInfo, encode_block_index, index_name,
                           read_manifest)
from shards.storage import Storage

READ_CHUNK = 8 << 20


def upgrade(storage: Storage, reindex: bool = False, log=None) -> tuple[Manifest, str]:
    """Upgrade (or reindex) the dataset at `storage`; returns the manifest and what was done."""
    m = read_manifest(storage)
    if m.format_version >= 2:
        if not reindex:
            return m, f"{storage} is format {m.format_version} already: nothing to do"
        for shard in m.shards:
            data = encode_block_index(rebuild_blocks(storage, m, shard))
            if zlib.crc32(data) != shard.index_crc32:
                raise FormatError(f"{storage.where(shard.name)}: the index rebuilt from the shard does not match "
                                  f"the manifest's CRC32 (the shard changed): regenerate the dataset")
            storage.put_bytes(index_name(shard.name), data)
            _note(log, f"reindexed {shard.name}")
        return m, f"{storage}: rebuilt the block index of {len(m.shards)} shards"
    old_hash = m.content_hash()
    shards = []
    for shard in m.shards:
        data = encode_block_index(shard.blocks)
        storage.put_bytes(index_name(shard.name), data)
        s = ShardInfo.from_blocks(shard.name, shard.tokens, shard.documents, shard.bytes, shard.sha256, shard.blocks)
        s.blocks = None  # a summary now: the table is in the file just written
        shards.append(s)
    new = Manifest(seq_len=m.seq_len, dtype=m.dtype, eos_id=m.eos_id, bos_id=m.bos_id, tokenizer=m.tokenizer,
                   shards=shards, settings=m.settings, stats=m.stats,
                   upgraded_from={"format_version": m.format_version, "manifest_sha256": old_hash})
    storage.put_bytes(MANIFEST_NAME, new.to_bytes())
    return new, (f"{storage}: format {m.format_version} -> {new.format_version}: wrote {len(shards)} block "
                 f"indexes and manifest.json ({len(new.to_bytes()):,} bytes); shards unchanged")


def rebuild_blocks(storage: Storage, m: Manifest, shard: ShardInfo) -> list[Block]:
    """A shard's blocks from its tar: each member's data range, CRC32 and rows (zstd content size)."""
    where = storage.where(shard.name)
    row_bytes = m.seq_len * m.np_dtype.itemsize
    blocks = []
    with tarfile.open(fileobj=_RangeStream(storage, shard.name), mode="r|") as tar:
        for member in tar:
            data = tar.extractfile(member).read()
            size = zstandard.frame_content_size(data)
            if size <= 0 or size % row_bytes:
                raise FormatError(f"{where}: member {member.name} is not a block of whole rows; regenerate it")
            blocks.append(Block(member.offset_data, len(data), size // row_bytes, zlib.crc32(data)))
    return blocks


class _RangeStream(io.RawIOBase):
    """A Storage object read front to back in large ranged reads (tarfile's streaming mode needs only read)."""

    def __init__(self, storage: Storage, name: str):
        self.storage, self.name = storage, name
        self.size, self.pos = storage.size(name), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.size - self.pos, READ_CHUNK)
        if n <= 0:
            return 0
        b[:n] = self.storage.read_range(self.name, self.pos, n)
        self.pos += n
        return n


def _note(log, msg: str) -> None:
    if log is not None:
        print(msg, file=log)
