"""Documents out of one input piece, in file order, with bad input reported or counted.

Every format yields plain `str` documents. Empty and whitespace-only documents are skipped and
counted. A bad record (invalid JSON, missing or non-string text field, invalid UTF-8, null) is an
InputError naming file and line, or with `skip_bad` a counted skip. A damaged file (corrupt or
truncated gzip/zstd, unreadable parquet) stops that file: an error, or with `skip_bad` a counted
skip of the rest of the file.
"""
from __future__ import annotations

import codecs
import gzip
import io
import json
from dataclasses import dataclass, fields
from typing import Callable, Iterator

from shardgen.compressed import DAMAGE, ZstdFeed, piece_lines
from shardgen.inputs import GRAIN, READ_BUFFER, InputError, Piece, open_input

SKIP_RECORD = "pass --skip-bad to skip bad records"
SKIP_FILE = "pass --skip-bad to skip the rest of a damaged file"


@dataclass
class Counts:
    """Input-side counts of one task (summed into manifest.stats)."""
    documents: int = 0  # documents packed
    empty_documents: int = 0  # empty or whitespace-only, skipped
    bad_records: int = 0  # skipped with --skip-bad
    bad_files: int = 0  # damaged files whose rest was skipped with --skip-bad
    input_bytes: int = 0
    dropped_tokens: int = 0  # the task's tail, shorter than one sequence

    def add(self, other: "Counts") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _ZstdStream(io.RawIOBase):
    """Decompresses concatenated zstd frames; a stream that ends inside a frame is an error
    (zstandard's stream_reader returns a silent short read for a truncated file)."""

    def __init__(self, f):
        self.f, self.dec, self.buf = f, ZstdFeed(), b""

    def readable(self):
        return True

    def readinto(self, b):
        while not self.buf:
            chunk = self.f.read(1 << 20)
            if not chunk:
                self.dec.finish()
                return 0
            self.buf = self.dec.feed(chunk)
        n = min(len(b), len(self.buf))
        b[:n], self.buf = self.buf[:n], self.buf[n:]
        return n


def _lone_surrogate(text: str) -> int | None:
    """Index of the first unpaired surrogate in `text`, or None when it is valid Unicode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


class DocumentReader:
    """Iterate the documents of `piece`; `counts` and `bytes_done` advance as it goes."""

    def __init__(self, piece: Piece, text_key: str = "text", skip_bad: bool = False):
        self.piece, self.key, self.skip_bad = piece, text_key, skip_bad
        self.counts = Counts()
        self.bytes_done = 0

    def __iter__(self) -> Iterator[str]:
        p = self.piece
        if p.kind == ".txt":
            gen = self._txt()
        elif p.kind == ".parquet":
            gen = self._parquet()
        else:
            gen = self._jsonl()
        for text in gen:
            if not text or text.isspace():
                self.counts.empty_documents += 1
                continue
            self.counts.documents += 1
            yield text
        self.bytes_done = p.nbytes
        self.counts.input_bytes += p.nbytes

    # --- bad input
    def _bad_record(self, where: str | Callable[[], str], what: str) -> None:
        """`where` may be a function: it runs only for the error (finding a line number can read the file)."""
        if not self.skip_bad:
            raise InputError(f"{where() if callable(where) else where}: {what}; fix the input or {SKIP_RECORD}")
        self.counts.bad_records += 1

    def _bad_file(self, where: str, what: str) -> None:
        if not self.skip_bad:
            raise InputError(f"{where}: {what}; re-create the file or {SKIP_FILE}")
        self.counts.bad_files += 1

    # --- formats
    def _txt(self) -> Iterator[str]:
        reader, _ = open_input(self.piece.url)
        with reader:
            data = reader.read()
        # A byte order mark is an encoding mark, not text: dropped here as json.loads drops it on a .jsonl line.
        data = data.removeprefix(codecs.BOM_UTF8)
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            self._bad_record(f"{self.piece.url}:{line}", f"invalid UTF-8 at byte {e.start} "
                                                          f"({data[e.start:e.start + 4]!r})")

    def _lines(self, reader, size: int) -> Iterator[tuple[int | None, bytes]]:
        """(line number or None where unknown, line) of the piece. A byte-range piece owns the lines
        that start inside [start, end); its line numbers are found only when an error needs one.
        A piece of a compressed file: see shardgen/compressed.py."""
        p = self.piece
        if p.kind != ".jsonl" and (p.start > 0 or p.end < size):
            yield from piece_lines(reader, p.kind, p.start, p.end, size, GRAIN,
                                   lambda n: setattr(self, "bytes_done", n))
            return
        if p.kind != ".jsonl":
            raw = reader
            stream = gzip.GzipFile(fileobj=reader) if p.kind == ".jsonl.gz" else \
                io.BufferedReader(_ZstdStream(reader), 1 << 20)
            for n, line in enumerate(stream, 1):
                self.bytes_done = raw.tell()
                yield n, line
            return
        pos, n = p.start, 1 if p.start == 0 else None
        if p.start > 0:
            reader.seek(p.start - 1)
            pos += len(reader.readline()) - 1  # the line running into the range belongs to the previous piece
        while pos < p.end:
            line = reader.readline()
            if not line:
                return
            yield (n if n is not None else -pos), line
            pos += len(line)
            self.bytes_done = pos - p.start
            if n is not None:
                n += 1

    def _where(self, n: int) -> str:
        if n >= 0:
            return f"{self.piece.url}:{n}"
        reader, _ = open_input(self.piece.url)  # only on error: count lines up to the byte offset
        line, left = 1, -n
        with reader:
            while left > 0 and (chunk := reader.read(min(left, READ_BUFFER))):
                line += chunk.count(b"\n")
                left -= len(chunk)
        return f"{self.piece.url}:{line}"

    def _jsonl(self) -> Iterator[str]:
        key, n = self.key, 0
        where = lambda: self._where(n)  # noqa: E731 - the line of the current record, found only for an error
        reader, size = open_input(self.piece.url)
        with reader:
            try:
                for n, line in self._lines(reader, size):
                    if not line.strip():
                        continue  # blank line: no record
                    try:
                        rec = json.loads(line)
                    except UnicodeDecodeError as e:
                        self._bad_record(where, f"invalid UTF-8 ({e.reason} at byte {e.start} of the line)")
                        continue
                    except json.JSONDecodeError as e:
                        self._bad_record(where, f"invalid JSON ({e.msg} at column {e.colno})")
                        continue
                    text = rec.get(key) if isinstance(rec, dict) else None
                    if isinstance(text, str) and (bad := _lone_surrogate(text)) is not None:
                        # JSON's \ud800 escapes decode to text that no tokenizer can take (a TypeError)
                        self._bad_record(where, f"field {key!r} holds a lone surrogate (U+{ord(text[bad]):04X} at "
                                                f"character {bad}): not valid Unicode")
                    elif isinstance(text, str):
                        yield text
                    elif not isinstance(rec, dict):
                        self._bad_record(where, f"a JSON {type(rec).__name__}, not an object")
                    elif key not in rec:
                        self._bad_record(where, f"no field {key!r} (fields: {', '.join(list(rec)[:8])}; "
                                                f"--text-key names the text field)")
                    else:
                        self._bad_record(where, f"field {key!r} is {type(text).__name__}, not a string")
            except DAMAGE as e:
                after = f" after line {n}" if n and n > 0 else ""
                self._bad_file(self.piece.url, f"damaged {self.piece.kind} stream{after} ({e})")

    def _parquet(self) -> Iterator[str]:
        reader, _ = open_input(self.piece.url)
        with reader:  # closed on every path, the early returns and errors included
            yield from self._parquet_rows(reader)

    def _parquet_rows(self, reader) -> Iterator[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq
        p, key = self.piece, self.key
        try:
            pf = pq.ParquetFile(reader)
            schema = pf.schema_arrow
        except (pa.ArrowException, OSError) as e:
            self._bad_file(p.url, f"not a readable parquet file ({e})")
            return
        if key not in schema.names:
            raise InputError(f"{p.url}: no column {key!r} (columns: {', '.join(schema.names[:8])}); "
                             f"--text-key names the text column")
        typ = schema.field(key).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)):
            raise InputError(f"{p.url}: column {key!r} is {typ}, not a string column; --text-key names the "
                             f"text column")
        end = pf.metadata.num_row_groups if p.end < 0 else p.end
        for g in range(p.start, end):
            try:
                values = pf.read_row_group(g, columns=[key]).column(0).to_pylist()
            except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
                self._bad_file(p.url, f"row group {g} does not read ({e})")
                return
            for r, text in enumerate(values):
                if text is None:
                    self._bad_record(f"{p.url}: row group {g} row {r}", f"{key!r} is null")
                else:
                    yield text
            rg = pf.metadata.row_group(g)  # progress in the same unit as the plan: compressed bytes
            self.bytes_done += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
