"""Lines of a .jsonl.gz / .jsonl.zst file, whole or one piece of it.

A compressed file has no random access, so a piece of one (compressed bytes [start, end), both
multiples of GRAIN) is read by decompressing the file from its beginning, GRAIN compressed bytes at a
time, and the piece owns the lines that *start* in the output of its own chunks: every reader feeds
the same chunks, so the lines split the same way whichever task (and worker, and node) reads which
piece, and each line belongs to exactly one piece. The price: the pieces of one file decompress
1 + 2 + ... + K pieces' worth in all, which inputs.MAX_COMPRESSED_PIECES bounds.

A stream that ends inside a zstd frame or gzip member is damaged (zstandard's and zlib's streaming
objects return a silent short read for it). Damage is reported by the piece whose chunks hold it;
a later piece that meets it while skipping returns nothing (the earlier piece stops the run or, with
--skip-bad, counts it).
"""
from __future__ import annotations

import zlib
from typing import Iterator

import zstandard

DAMAGE = (OSError, EOFError, zlib.error, zstandard.ZstdError)


class ZstdFeed:
    """Concatenated zstd frames, fed in chunks."""

    def __init__(self):
        self.dctx = zstandard.ZstdDecompressor()
        self.obj, self.in_frame = self.dctx.decompressobj(), False

    def feed(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            self.in_frame = True
            out.append(self.obj.decompress(chunk))
            chunk = b""
            if self.obj.eof:
                chunk, self.obj, self.in_frame = self.obj.unused_data, self.dctx.decompressobj(), False
        return b"".join(out)

    def finish(self) -> None:
        if self.in_frame:
            raise zstandard.ZstdError("truncated: the stream ends inside a zstd frame")


class GzipFeed:
    """Concatenated gzip members (zero bytes between members skipped, as the gzip module does), fed in chunks."""

    def __init__(self):
        self.obj, self.in_member, self.members = zlib.decompressobj(31), False, 0

    def feed(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            if not self.in_member:
                chunk = chunk.lstrip(b"\0") if self.members else chunk
                if not chunk:
                    break
                self.in_member = True
            out.append(self.obj.decompress(chunk))
            chunk = b""
            if self.obj.eof:
                chunk, self.obj = self.obj.unused_data, zlib.decompressobj(31)
                self.in_member, self.members = False, self.members + 1
        return b"".join(out)

    def finish(self) -> None:
        if self.in_member or not self.members:
            raise EOFError("truncated: the stream ends inside a gzip member")


def feeder(kind: str):
    return ZstdFeed() if kind == ".jsonl.zst" else GzipFeed()


def piece_lines(reader, kind: str, start: int, end: int, size: int, grain: int,
                progress=None) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of the lines that start in the output of compressed bytes [start, end) of a
    file of `size` bytes; `reader` is the file, at offset 0. `progress(n)`: the piece's bytes read so far."""
    dec = feeder(kind)
    lineno, pos, part, open_line, owned = 0, 0, [], False, False
    while True:
        if pos >= end and not (open_line and owned) and end < size:  # the last piece reads on to check the end
            return
        chunk = reader.read(grain)
        c, pos = pos, pos + len(chunk)
        mine = start <= c < end
        try:
            if not chunk:
                dec.finish()
            data = dec.feed(chunk)
        except DAMAGE:
            if mine or not chunk and start < c <= end:
                raise  # ours to report
            return  # before the piece (an earlier piece reports it) or after its last line (a later one does)
        if progress is not None:
            progress(max(0, min(pos, end) - start))
        if not chunk:
            if open_line and owned:
                yield lineno, b"".join(part)
            return
        i = 0
        if open_line and data:  # the line running into this chunk
            j = data.find(b"\n")
            if j < 0:
                if owned:
                    part.append(data)
                continue
            if owned:
                part.append(data[:j + 1])
                yield lineno, b"".join(part)
                part = []
            i, open_line = j + 1, False
        if i == len(data) or not mine:  # lines starting outside [start, end): counted, not kept
            if i < len(data):
                lineno += data.count(b"\n", i) + (not data.endswith(b"\n"))
                open_line, owned = not data.endswith(b"\n"), False
            continue
        lines = data[i:].split(b"\n")  # the last one is the part of a line that goes on (b"" if none)
        for line in lines[:-1]:
            lineno += 1
            yield lineno, line + b"\n"
        if lines[-1]:
            lineno += 1
            open_line, owned, part = True, True, [lines[-1]]
