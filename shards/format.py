"""The shard format: the one definition that the writer (shardgen) and the reader (trainer.data) share.

A dataset is a directory (or an object-store prefix) holding

    manifest.json          written last, atomically: without it the directory is not a dataset
    tokenizer.json         the tokenizer the tokens came from
    <shard>.tar            plain POSIX (ustar) tar files

Each shard member is one *block*: `<shard-stem>/<block:06d>.tokens.zst`, a single zstd frame
(content size and checksum in the frame header) holding a C-order, little-endian array of the
manifest's dtype with shape [rows, seq_len]. A shard's sequence order is member order, then row
order. The manifest records, for every block, the byte offset and length of its data inside the
tar, its row count and the CRC32 of its compressed bytes, so a reader can fetch one block alone.

Decoding a shard needs nothing of ours (see README):

    for sample in webdataset.WebDataset(url):
        rows = np.frombuffer(zstandard.decompress(sample["tokens.zst"]), "<u2").reshape(-1, seq_len)
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import zstandard

from shards.errors import UserError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
BLOCK_SUFFIX = ".tokens.zst"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
DEFAULT_BLOCK_BYTES = 256 * 1024  # raw bytes per block: one read unit for the loader


class FormatError(UserError):
    """A dataset, shard or block that does not match the format. The message names it and the fix."""


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def block_member_name(shard_stem: str, block: int) -> str:
    return f"{shard_stem}/{block:06d}{BLOCK_SUFFIX}"


def rows_per_block(seq_len: int, dtype: str, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    return max(1, block_bytes // (seq_len * DTYPES[dtype].itemsize))


@dataclass(frozen=True)
class Block:
    """Where one block lives: the tar member's data range, its rows and the CRC32 of its bytes."""
    offset: int
    length: int
    rows: int
    crc32: int


@dataclass
class ShardInfo:
    name: str
    sequences: int
    tokens: int
    documents: int  # separators (EOS) inside the shard: documents that end here
    bytes: int
    sha256: str
    blocks: list[Block] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"name": self.name, "sequences": self.sequences, "tokens": self.tokens,
                "documents": self.documents, "bytes": self.bytes, "sha256": self.sha256,
                "blocks": [[b.offset, b.length, b.rows, b.crc32] for b in self.blocks]}

    @classmethod
    def from_json(cls, d: dict) -> "ShardInfo":
        return cls(name=d["name"], sequences=int(d["sequences"]), tokens=int(d["tokens"]),
                   documents=int(d["documents"]), bytes=int(d["bytes"]), sha256=d["sha256"],
                   blocks=[Block(*map(int, b)) for b in d["blocks"]])


@dataclass
class Manifest:
    seq_len: int
    dtype: str
    eos_id: int
    bos_id: int | None
    tokenizer: dict  # {"source", "sha256", "vocab_size"}
    shards: list[ShardInfo]
    settings: dict = field(default_factory=dict)  # the shardgen settings that shaped the bytes
    stats: dict = field(default_factory=dict)  # input-side counts: dropped tail, skipped documents
    format_version: int = FORMAT_VERSION

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    def totals(self) -> dict:
        s = self.shards
        return {"shards": len(s), "blocks": sum(len(x.blocks) for x in s),
                "sequences": sum(x.sequences for x in s), "tokens": sum(x.tokens for x in s),
                "documents": sum(x.documents for x in s), "bytes": sum(x.bytes for x in s)}

    def to_json(self) -> dict:
        return {"format_version": self.format_version, "seq_len": self.seq_len, "dtype": self.dtype,
                "byte_order": "little", "eos_id": self.eos_id, "bos_id": self.bos_id,
                "tokenizer": self.tokenizer, "settings": self.settings, "stats": self.stats,
                "totals": self.totals(), "shards": [s.to_json() for s in self.shards]}

    def to_bytes(self) -> bytes:
        # Canonical: sorted keys, fixed separators, so equal content gives equal bytes (and hash).
        return (json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")) + "\n").encode()

    def content_hash(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "Manifest":
        try:
            d = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{where}: not valid JSON ({e}); the manifest is damaged: "
                              f"rerun `python -m shardgen merge` or shardgen with the same arguments") from None
        if not isinstance(d, dict) or "format_version" not in d:
            raise FormatError(f"{where}: not a shardgen manifest (no format_version)")
        if d["format_version"] != FORMAT_VERSION:
            raise FormatError(f"{where}: format_version {d['format_version']} is not supported "
                              f"(this reader knows {FORMAT_VERSION}); regenerate the shards or upgrade")
        try:
            m = cls(seq_len=int(d["seq_len"]), dtype=d["dtype"], eos_id=int(d["eos_id"]),
                    bos_id=None if d.get("bos_id") is None else int(d["bos_id"]), tokenizer=d["tokenizer"],
                    shards=[ShardInfo.from_json(s) for s in d["shards"]], settings=d.get("settings", {}),
                    stats=d.get("stats", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: missing or malformed field {e}") from None
        if m.dtype not in DTYPES:
            raise FormatError(f"{where}: dtype {m.dtype!r} is not one of {sorted(DTYPES)}")
        for s in m.shards:
            if sum(b.rows for b in s.blocks) != s.sequences:
                raise FormatError(f"{where}: shard {s.name}: block rows do not add up to its {s.sequences} sequences")
        return m


def encode_block(rows: np.ndarray, level: int = 3) -> bytes:
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cctx.compress(np.ascontiguousarray(rows).tobytes())


def decode_block(data: bytes, block: Block, manifest: Manifest, where: str) -> np.ndarray:
    """Bytes of one block -> array [rows, seq_len]. Any damage raises FormatError naming `where`."""
    if len(data) != block.length:
        raise FormatError(f"{where}: got {len(data)} bytes, the manifest says {block.length} "
                          f"(truncated or replaced shard; run `python -m shardgen verify`)")
    if zlib.crc32(data) != block.crc32:
        raise FormatError(f"{where}: CRC32 mismatch (corrupt shard; run `python -m shardgen verify` "
                          f"and regenerate it)")
    want = block.rows * manifest.seq_len * manifest.np_dtype.itemsize
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=want)
    except zstandard.ZstdError as e:
        raise FormatError(f"{where}: zstd frame does not decode ({e})") from None
    if len(raw) != want:
        raise FormatError(f"{where}: decoded {len(raw)} bytes, expected {want}")
    return np.frombuffer(raw, dtype=manifest.np_dtype).reshape(block.rows, manifest.seq_len)


class ShardWriter:
    """Writes one shard: a plain ustar tar, one zstd member per block, recording each block's range.

    Headers are fixed (mtime 0, root owner, mode 0644) so the same blocks give the same bytes.
    """

    def __init__(self, fileobj: BinaryIO, name: str, seq_len: int, dtype: str, level: int = 3):
        self.name, self.seq_len, self.dtype, self.level = name, seq_len, DTYPES[dtype], level
        self.stem = name[:-4] if name.endswith(".tar") else name
        self._hasher = _HashingWriter(fileobj)
        self._tar = tarfile.open(fileobj=self._hasher, mode="w", format=tarfile.USTAR_FORMAT)
        self.blocks: list[Block] = []
        self.sequences = self.tokens = self.documents = 0

    def add_block(self, rows: np.ndarray, eos_id: int) -> Block:
        assert rows.ndim == 2 and rows.shape[1] == self.seq_len and rows.shape[0] > 0
        rows = rows.astype(self.dtype, copy=False)
        data = encode_block(rows, self.level)
        info = tarfile.TarInfo(block_member_name(self.stem, len(self.blocks)))
        info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        # tarfile's running offset now sits after this member's data, padded to 512 bytes.
        offset = self._tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        block = Block(offset=offset, length=len(data), rows=int(rows.shape[0]), crc32=zlib.crc32(data))
        self.blocks.append(block)
        self.sequences += block.rows
        self.tokens += rows.size
        self.documents += int(np.count_nonzero(rows == eos_id))
        return block

    def close(self) -> ShardInfo:
        self._tar.close()
        return ShardInfo(name=self.name, sequences=self.sequences, tokens=self.tokens, documents=self.documents,
                         bytes=self._hasher.size, sha256=self._hasher.sha.hexdigest(), blocks=self.blocks)


class _HashingWriter(io.RawIOBase):
    """File-like that forwards writes and keeps a running sha256 and byte count."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.size += len(b)
        return len(b)

    def tell(self) -> int:
        return self.size


def read_manifest(storage) -> Manifest:
    """The manifest of a dataset at `storage` (a shards.storage.Storage); clear error if absent."""
    if not storage.exists(MANIFEST_NAME):
        raise FormatError(f"{storage.where(MANIFEST_NAME)} not found: {storage} is not a shardgen dataset "
                          f"(the manifest is written last, so an interrupted shardgen leaves none: rerun it "
                          f"with the same arguments, or run `python -m shardgen merge` after a multi-node run)")
    return Manifest.from_bytes(storage.read(MANIFEST_NAME), storage.where(MANIFEST_NAME))
