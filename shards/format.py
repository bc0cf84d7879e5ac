"""The shard format: the one definition that the writer (shardgen) and the reader (trainer.data) share.

A dataset is a directory (or an object-store prefix) holding

    manifest.json          written last, atomically: without it the directory is not a dataset
    tokenizer.json         the tokenizer the tokens came from
    <shard>.tar            plain POSIX (ustar) tar files
    <shard>.blocks         the shard's block index (format 2): where each block of the tar lies

Each shard member is one *block*: `<shard-stem>/<block:06d>.tokens.zst`, a single zstd frame
(content size and checksum in the frame header) holding a C-order, little-endian array of the
manifest's dtype with shape [rows, seq_len]. A shard's sequence order is member order, then row
order.

Format 2 (this writer): the manifest holds one summary row per shard (counts, sha256, block count,
rows per block and the last block's rows, the CRC32 of its index), so it grows with shards, not
blocks, and the plan needs nothing else. Each block's byte offset and length inside the tar, rows
and CRC32 of its compressed bytes live in `<shard-stem>.blocks` beside the shard: INDEX_MAGIC, the
block count (u8), then one INDEX_DTYPE record per block, little-endian. A reader fetches it in one
read the first time it needs a block of that shard. The index is a side file, not a tar member, so
the tar holds only blocks (every WebDataset sample has its `tokens.zst`) and upgrading a format-1
dataset writes small files instead of rewriting every shard (objects in S3 cannot be appended to).
Format 1 kept every block's [offset, length, rows, crc32] in the manifest (236 MB at 1T tokens);
it still loads, slowly; `python -m shardgen upgrade DIR` converts it in place.

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

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
BLOCK_SUFFIX = ".tokens.zst"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
DEFAULT_BLOCK_BYTES = 256 * 1024  # raw bytes per block: one read unit for the loader
INDEX_SUFFIX = ".blocks"
INDEX_MAGIC = b"TOKBLKS\x02"
INDEX_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u4"), ("rows", "<u4"), ("crc32", "<u4")])
INDEX_HEADER = len(INDEX_MAGIC) + 8
# The columns of a shard's summary row in a format-2 manifest.
SHARD_COLUMNS = ("name", "sequences", "tokens", "documents", "bytes", "sha256", "blocks", "rows_per_block",
                 "last_block_rows", "varying_rows", "index_crc32")


class FormatError(UserError):
    """A dataset, shard or block that does not match the format. The message names it and the fix."""


def canonical_json(obj, *, ascii_only: bool = False, newline: bool = True) -> bytes:
    """The one canonical JSON: sorted keys, no spaces, so equal content gives equal bytes (and hashes). The
    flags keep the bytes that manifests (ascii_only) and build plans (ascii_only, no newline) were hashed from."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=ascii_only)
    return (text + "\n" if newline else text).encode()


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


def index_name(shard_name: str) -> str:
    """`00012-003.tar` -> `00012-003.blocks`: the shard's block index, beside it."""
    return (shard_name[:-4] if shard_name.endswith(".tar") else shard_name) + INDEX_SUFFIX


def encode_block_index(blocks: list[Block]) -> bytes:
    table = np.array([(b.offset, b.length, b.rows, b.crc32) for b in blocks], dtype=INDEX_DTYPE)
    return INDEX_MAGIC + len(blocks).to_bytes(8, "little") + table.tobytes()


@dataclass
class ShardInfo:
    """One shard's summary: what the plan and the resume fingerprint need, O(1) per shard. All its
    blocks hold `rows_per_block` rows but the last, which holds `last_block_rows` (shardgen packs
    full blocks and ends a task with a shorter one). A shard written otherwise has `rows_per_block` 0
    and lists every block's rows in `varying_rows` (shardgen never writes such shards; tests and other
    writers may). `blocks` is every block, in memory, only while writing and for a format-1 manifest."""
    name: str
    sequences: int
    tokens: int
    documents: int  # separators (EOS) inside the shard: documents that end here
    bytes: int
    sha256: str
    num_blocks: int
    rows_per_block: int
    last_block_rows: int
    varying_rows: list[int] | None = None
    index_crc32: int | None = None  # CRC32 of the `.blocks` file (format 2)
    blocks: list[Block] | None = field(default=None, repr=False)

    @classmethod
    def from_blocks(cls, name: str, tokens: int, documents: int, bytes: int, sha256: str,
                    blocks: list[Block], with_index: bool = True) -> "ShardInfo":
        rows = [b.rows for b in blocks]
        first = rows[0] if rows else 0
        regular = all(r == first for r in rows[:-1])
        return cls(name=name, sequences=sum(rows), tokens=tokens, documents=documents, bytes=bytes, sha256=sha256,
                   num_blocks=len(blocks), rows_per_block=first if regular else 0,
                   last_block_rows=rows[-1] if rows else 0, varying_rows=None if regular else rows,
                   index_crc32=zlib.crc32(encode_block_index(blocks)) if with_index else None, blocks=blocks)

    @property
    def block_rows(self) -> list[int]:
        """Rows of every block (O(blocks): for tools and format-1 shards whose rows vary)."""
        if self.blocks is not None:
            return [b.rows for b in self.blocks]
        if self.varying_rows is not None:
            return list(self.varying_rows)
        return [self.rows_per_block] * (self.num_blocks - 1) + [self.last_block_rows] * (self.num_blocks > 0)

    def to_row(self) -> list:
        return [getattr(self, "num_blocks" if c == "blocks" else c) for c in SHARD_COLUMNS]

    def to_json(self) -> dict:
        """The summary as a dict (task records)."""
        return dict(zip(SHARD_COLUMNS, self.to_row()))

    @classmethod
    def from_json(cls, d: dict) -> "ShardInfo":
        if "rows_per_block" not in d:  # a format-1 entry: every block listed
            return cls.from_blocks(d["name"], int(d["tokens"]), int(d["documents"]), int(d["bytes"]), d["sha256"],
                                   [Block(*map(int, b)) for b in d["blocks"]], with_index=False)
        return cls.from_row([d[c] for c in SHARD_COLUMNS])

    @classmethod
    def from_row(cls, row: list) -> "ShardInfo":
        name, seqs, tokens, docs, size, sha, blocks, rpb, last, varying, crc = row
        return cls(name=name, sequences=int(seqs), tokens=int(tokens), documents=int(docs), bytes=int(size),
                   sha256=sha, num_blocks=int(blocks), rows_per_block=int(rpb), last_block_rows=int(last),
                   varying_rows=None if varying is None else [int(x) for x in varying], index_crc32=int(crc))

    def to_json_v1(self) -> dict:
        return {"name": self.name, "sequences": self.sequences, "tokens": self.tokens,
                "documents": self.documents, "bytes": self.bytes, "sha256": self.sha256,
                "blocks": [[b.offset, b.length, b.rows, b.crc32] for b in self.blocks]}

    def check(self, where: str) -> None:
        if self.blocks is not None:
            if sum(b.rows for b in self.blocks) != self.sequences:
                raise FormatError(f"{where}: shard {self.name}: block rows do not add up to its {self.sequences} "
                                  f"sequences")
            return
        if self.varying_rows is not None:
            rows = self.varying_rows
            if (len(rows) != self.num_blocks or self.rows_per_block != 0 or min(rows, default=0) < 1
                    or sum(rows) != self.sequences or rows[-1] != self.last_block_rows):
                raise FormatError(f"{where}: shard {self.name}: varying_rows do not match its {self.num_blocks} "
                                  f"blocks and {self.sequences} sequences")
            return
        if (self.num_blocks < 1 or self.rows_per_block < 1 or not 1 <= self.last_block_rows
                or (self.num_blocks - 1) * self.rows_per_block + self.last_block_rows != self.sequences):
            raise FormatError(f"{where}: shard {self.name}: {self.num_blocks} blocks of {self.rows_per_block} rows "
                              f"(the last {self.last_block_rows}) do not make its {self.sequences} sequences")


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
    # {"format_version": 1, "manifest_sha256": ...} after `shardgen upgrade`: the same data order, so a
    # checkpoint taken on the format-1 manifest resumes on this one.
    upgraded_from: dict | None = None
    _stored_sha256: str | None = field(default=None, repr=False, compare=False)

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    def totals(self) -> dict:
        s = self.shards
        return {"shards": len(s), "blocks": sum(x.num_blocks for x in s),
                "sequences": sum(x.sequences for x in s), "tokens": sum(x.tokens for x in s),
                "documents": sum(x.documents for x in s), "bytes": sum(x.bytes for x in s)}

    def to_json(self) -> dict:
        d = {"format_version": self.format_version, "seq_len": self.seq_len, "dtype": self.dtype,
             "byte_order": "little", "eos_id": self.eos_id, "bos_id": self.bos_id,
             "tokenizer": self.tokenizer, "settings": self.settings, "stats": self.stats, "totals": self.totals()}
        if self.format_version == 1:
            d["shards"] = [s.to_json_v1() for s in self.shards]
        else:  # one row per shard under a header: the keys are not repeated 10,000 times
            d["shard_columns"] = list(SHARD_COLUMNS)
            d["shards"] = [s.to_row() for s in self.shards]
            if self.upgraded_from is not None:
                d["upgraded_from"] = self.upgraded_from
        return d

    def to_bytes(self) -> bytes:
        # Canonical: sorted keys, fixed separators, so equal content gives equal bytes (and hash).
        return canonical_json(self.to_json(), ascii_only=True)

    def content_hash(self) -> str:
        """The resume guard: sha256 of the canonical manifest. In format 2 it covers every shard's sha256
        and index CRC32, so it still changes with any byte of the data, at O(shards) cost; a format-2
        manifest read from storage is hashed as stored (shardgen stores the canonical bytes)."""
        return self._stored_sha256 or hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "Manifest":
        try:
            d = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{where}: not valid JSON ({e}); the manifest is damaged: "
                              f"rerun `python -m shardgen merge` or shardgen with the same arguments") from None
        if not isinstance(d, dict) or "format_version" not in d:
            raise FormatError(f"{where}: not a shardgen manifest (no format_version)")
        version = d["format_version"]
        if version not in READABLE_VERSIONS:
            raise FormatError(f"{where}: format_version {version} is not supported (this reader knows "
                              f"{', '.join(map(str, READABLE_VERSIONS))}): use a newer trainer, or regenerate the shards")
        try:
            if version == 1:
                shards = [ShardInfo.from_json(s) for s in d["shards"]]
            else:
                if tuple(d["shard_columns"]) != SHARD_COLUMNS:
                    raise FormatError(f"{where}: shard_columns {d['shard_columns']} are not {list(SHARD_COLUMNS)}")
                shards = [ShardInfo.from_row(r) for r in d["shards"]]
            m = cls(seq_len=int(d["seq_len"]), dtype=d["dtype"], eos_id=int(d["eos_id"]),
                    bos_id=None if d.get("bos_id") is None else int(d["bos_id"]), tokenizer=d["tokenizer"],
                    shards=shards, settings=d.get("settings", {}), stats=d.get("stats", {}), format_version=version,
                    upgraded_from=d.get("upgraded_from"))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: missing or malformed field {e}") from None
        if version >= 2:
            m._stored_sha256 = hashlib.sha256(data).hexdigest()
        if m.dtype not in DTYPES:
            raise FormatError(f"{where}: dtype {m.dtype!r} is not one of {sorted(DTYPES)}")
        for s in m.shards:
            s.check(where)
        return m


def decode_block_index(data: bytes, shard: ShardInfo, where: str) -> np.ndarray:
    """The bytes of a `.blocks` file -> INDEX_DTYPE records, checked against the shard's summary."""
    fix = ("the index is damaged: restore it, or rebuild it from the shard with `python -m shardgen upgrade "
           "DATASET --reindex`")
    want = INDEX_HEADER + shard.num_blocks * INDEX_DTYPE.itemsize
    if len(data) != want:
        raise FormatError(f"{where}: block index of shard {shard.name} is {len(data)} bytes, {want} expected for "
                          f"the {shard.num_blocks} blocks the manifest gives it: the index is truncated or replaced, "
                          f"or the manifest.json is not this dataset's (edited, or copied from another dataset: then "
                          f"restore the dataset's own manifest.json); else {fix}")
    if zlib.crc32(data) != shard.index_crc32 or data[:len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise FormatError(f"{where}: block index of shard {shard.name} does not match the manifest's CRC32 "
                          f"(corrupt, or from another build); {fix}")
    table = np.frombuffer(data, dtype=INDEX_DTYPE, offset=INDEX_HEADER)
    rows = table["rows"]
    expect = (np.asarray(shard.varying_rows) if shard.varying_rows is not None else
              np.r_[np.full(shard.num_blocks - 1, shard.rows_per_block), shard.last_block_rows])
    if int.from_bytes(data[len(INDEX_MAGIC):INDEX_HEADER], "little") != shard.num_blocks or (rows != expect).any():
        raise FormatError(f"{where}: block index of shard {shard.name} disagrees with the manifest's block "
                          f"counts; {fix}")
    return table


def read_block_index(storage, shard: ShardInfo) -> np.ndarray:
    """A shard's block table: from the manifest (format 1) or its `.blocks` file in one read."""
    if shard.blocks is not None:
        return np.array([(b.offset, b.length, b.rows, b.crc32) for b in shard.blocks], dtype=INDEX_DTYPE)
    from shards.storage import StorageError
    name = index_name(shard.name)
    try:
        data = storage.read(name)
    except StorageError:
        if storage.exists(name):
            raise
        raise FormatError(f"{storage.where(name)}: block index of shard {shard.name} is missing; restore it, or "
                          f"rebuild it from the shard with `python -m shardgen upgrade DATASET --reindex`") from None
    return decode_block_index(data, shard, storage.where(name))


def block_at(table: np.ndarray, j: int) -> Block:
    r = table[j]
    return Block(int(r["offset"]), int(r["length"]), int(r["rows"]), int(r["crc32"]))


def read_blocks(storage, shard: ShardInfo) -> list[Block]:
    """Every block of a shard (tools and tests; the loader reads only the tables of the shards it touches)."""
    table = read_block_index(storage, shard)
    return [block_at(table, j) for j in range(len(table))]


def encode_block(rows: np.ndarray, level: int = 3) -> bytes:
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cctx.compress(np.ascontiguousarray(rows).tobytes())


VERIFY_HINT = "run `python -m shardgen verify` on the dataset, then regenerate it"


def decode_block(data: bytes, block: Block, manifest: Manifest, where: str, fix: str = VERIFY_HINT) -> np.ndarray:
    """Bytes of one block -> array [rows, seq_len]. Any damage raises FormatError naming `where` and `fix` (what to
    do: readers point at verify; verify itself, which is already that check, says to regenerate)."""
    if len(data) != block.length:
        raise FormatError(f"{where}: got {len(data)} bytes, the manifest says {block.length} "
                          f"(truncated or replaced shard; {fix})")
    if zlib.crc32(data) != block.crc32:
        raise FormatError(f"{where}: CRC32 mismatch (corrupt shard; {fix})")
    want = block.rows * manifest.seq_len * manifest.np_dtype.itemsize

    def not_described(size: int) -> FormatError:
        # the bytes are the ones the index names (length and CRC32 agree), so the manifest's shape is what is off
        return FormatError(f"{where}: the block holds {size} bytes, but {block.rows} rows of seq_len "
                           f"{manifest.seq_len} in {manifest.dtype} are {want}: the manifest does not describe this "
                           f"shard (a manifest.json edited, or copied from another dataset); restore the dataset's "
                           f"own manifest.json, or regenerate the dataset")
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise FormatError(f"{where}: zstd frame does not decode ({e})") from None
    if size >= 0 and size != want:
        raise not_described(size)
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=want)
    except zstandard.ZstdError as e:
        raise FormatError(f"{where}: zstd frame does not decode ({e})") from None
    if len(raw) != want:
        raise not_described(len(raw))
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
        """Finish the tar; the shard's block index is then `self.index_bytes` (write it beside the shard)."""
        self._tar.close()
        info = ShardInfo.from_blocks(self.name, self.tokens, self.documents, self._hasher.size,
                                     self._hasher.sha.hexdigest(), self.blocks)
        self.index_bytes = encode_block_index(self.blocks)
        return info


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
