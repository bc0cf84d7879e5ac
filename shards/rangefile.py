"""A seekable, read-only file over one object of a Storage, read with Storage.read_range (pread locally,
ranged GETs on S3). shardgen reads its inputs through it, and the trainer its checkpoints in object storage."""
from __future__ import annotations

import io

from shards.storage import Storage


class RangeFile(io.RawIOBase):
    """Reads of an object of known size.

    block=0: every read is one read_range of what was asked (wrap it in an io.BufferedReader for small reads).
    block>0: small reads come from aligned `block`-byte ranges, the last `blocks_kept` kept (a reader that
    goes back and forth near one place, as torch.load does, costs one request per block); a read of a block
    or more goes straight to one read_range of up to `max_get` bytes, for the bytes no kept block holds.
    close_storage: closing the file closes the storage too (it was opened for this file alone)."""

    def __init__(self, storage: Storage, name: str, size: int, *, block: int = 0, blocks_kept: int = 8,
                 max_get: int = 64 << 20, close_storage: bool = False):
        self.storage, self.name, self.size, self.pos = storage, name, size, 0
        self.block, self.blocks_kept, self.max_get, self.close_storage = block, blocks_kept, max_get, close_storage
        self.blocks: dict[int, bytes] = {}  # block index -> bytes, least recently used first

    def close(self):
        if not self.closed and self.close_storage:
            self.storage.close()  # LocalStorage keeps an open descriptor per file it has read
        super().close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"{self.storage.where(self.name)}: seek to a negative position")
        self.pos = base + offset
        return self.pos

    def _block(self, i: int) -> bytes:
        data = self.blocks.pop(i, None)
        if data is None:
            start = i * self.block
            data = self.storage.read_range(self.name, start, min(self.block, self.size - start))
            while len(self.blocks) >= self.blocks_kept:
                del self.blocks[next(iter(self.blocks))]
        self.blocks[i] = data  # most recently used last
        return data

    def readinto(self, b) -> int:
        out = memoryview(b).cast("B")
        n = min(len(out), self.size - self.pos)
        if n <= 0:
            return 0
        if not self.block:
            out[:n] = self.storage.read_range(self.name, self.pos, n)
        else:
            i, off = divmod(self.pos, self.block)
            if n >= self.block and i not in self.blocks:  # large: one read up to the next kept block, not kept
                end = self.pos + min(n, self.max_get)
                end = min([j * self.block for j in self.blocks if self.pos < j * self.block < end] + [end])
                n = end - self.pos
                out[:n] = self.storage.read_range(self.name, self.pos, n)
            else:  # up to the end of this block
                block = self._block(i)
                n = min(n, len(block) - off)
                out[:n] = block[off:off + n]
        self.pos += n
        return n
